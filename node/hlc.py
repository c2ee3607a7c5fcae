"""Hybrid logical clock: wall-clock milliseconds with a logical counter, so that
versions received on different nodes order sensibly and never tie within a node.
Encoded as one integer: ms << 16 | logical, which must fit a uint64 (the wire
and the catalog keys).

A peer's timestamp moves our clock only when it is at most ``max_ahead_ms``
ahead of our wall clock: one forged value near 2**64 would otherwise put every
later version of ours behind it, and push the clock out of its encoding.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LOGICAL_BITS = 16
LOGICAL_MAX = (1 << LOGICAL_BITS) - 1
HLC_MAX = (1 << 64) - 1  # uint64 on the wire and in the catalog's version keys
MS_MAX = HLC_MAX >> LOGICAL_BITS  # about the year 10889
MAX_AHEAD_MS_DEFAULT = 300_000  # [cluster] max_clock_ahead_s = 300


def encode(ms: int, logical: int) -> int:
    return (ms << LOGICAL_BITS) | logical


def decode(value: int) -> tuple[int, int]:
    return value >> LOGICAL_BITS, value & LOGICAL_MAX


def to_seconds(value: int) -> float:
    return (value >> LOGICAL_BITS) / 1000.0


class HybridClock:
    def __init__(self, wall_ms: Callable[[], int] | None = None,
                 max_ahead_ms: int = MAX_AHEAD_MS_DEFAULT) -> None:
        if max_ahead_ms <= 0:
            raise ValueError(f"max_ahead_ms must be > 0, got {max_ahead_ms}")
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self.max_ahead_ms = max_ahead_ms
        self._last = 0
        self._lock = threading.Lock()

    def _wall(self) -> int:
        return min(max(0, self._wall_ms()), MS_MAX)

    def now(self) -> int:
        """A new timestamp, greater than every one before; never out of uint64."""
        with self._lock:
            last_ms, last_logical = decode(self._last)
            ms = self._wall()
            if ms > last_ms:
                self._last = encode(ms, 0)
            elif last_logical < LOGICAL_MAX:
                self._last = encode(last_ms, last_logical + 1)
            elif last_ms < MS_MAX:  # counter exhausted within one ms: borrow the next ms
                self._last = encode(last_ms + 1, 0)
            # else: the wall clock says year 10889; stay at HLC_MAX rather than overflow
            return self._last

    def too_far_ahead(self, remote: int) -> bool:
        """Whether a peer's timestamp is beyond what we accept (or not a uint64)."""
        return not 0 <= remote <= HLC_MAX or decode(remote)[0] > self._wall() + self.max_ahead_ms

    def ahead_ms(self, remote: int) -> int:
        """How far a timestamp is ahead of our wall clock (negative: behind)."""
        return decode(remote)[0] - self._wall()

    def observe(self, remote: int) -> bool:
        """Move past a timestamp seen from a peer so our next event orders after it.
        Returns False, and leaves the clock alone, when it is too far ahead."""
        with self._lock:
            if self.too_far_ahead(remote):
                return False
            self._last = max(self._last, remote)
            return True
