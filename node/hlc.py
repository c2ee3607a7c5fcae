"""Hybrid logical clock: wall-clock milliseconds with a logical counter, so that
versions received on different nodes order sensibly and never tie within a node.
Encoded as one integer: ms << 16 | logical."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LOGICAL_BITS = 16
LOGICAL_MAX = (1 << LOGICAL_BITS) - 1


def encode(ms: int, logical: int) -> int:
    return (ms << LOGICAL_BITS) | logical


def decode(value: int) -> tuple[int, int]:
    return value >> LOGICAL_BITS, value & LOGICAL_MAX


def to_seconds(value: int) -> float:
    return (value >> LOGICAL_BITS) / 1000.0


class HybridClock:
    def __init__(self, wall_ms: Callable[[], int] | None = None) -> None:
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            last_ms, last_logical = decode(self._last)
            ms = self._wall_ms()
            if ms > last_ms:
                self._last = encode(ms, 0)
            elif last_logical < LOGICAL_MAX:
                self._last = encode(last_ms, last_logical + 1)
            else:  # counter exhausted within one ms: borrow the next ms
                self._last = encode(last_ms + 1, 0)
            return self._last

    def observe(self, remote: int) -> None:
        """Move past a timestamp seen from a peer so our next event orders after it."""
        with self._lock:
            self._last = max(self._last, remote)
