"""Relaying chunks between the replicas of one study, and counting what crosses
each link.

When several replicas need the same new chunks from one source (the ingest site),
each draws its share over the source's link (cluster/fetch.py `relay_for`) and
asks the others for theirs. A share may still be on its way to its feeder when it
is asked for, so the feeder answers relay requests as its chunks arrive:
`Arrivals` is how the answering stream learns that a chunk came in, and whether
one it lacks is coming at all (it is only worth waiting for a chunk the node is
fetching itself right now).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

RELAY_WAIT_MAX_S = 60.0  # longest a relay request may wait for a chunk to arrive here
# A relay request may come in just before this node has planned the same batch (both
# heard the announcement at about the same time): chunks it does not expect yet are
# waited for this long before the asker is told to fetch them elsewhere.
RELAY_GRACE_S = 2.0
RATE_WINDOW_S = 10.0  # bytes per second over this window


class Arrivals:
    """Chunks this node is fetching now, and a signal when any chunk arrives (for the
    streams answering relay requests on the event loop; fed from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: collections.Counter[bytes] = collections.Counter()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def expect(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            self._expected.update(keys)

    def settle(self, keys: Iterable[bytes]) -> None:
        """These fetches ended (got or given up): stop waiting for them."""
        with self._lock:
            self._expected.subtract(keys)
            for key in [k for k, n in self._expected.items() if n <= 0]:
                del self._expected[key]
        self.arrived()

    def expected(self, key: bytes) -> bool:
        return self._expected.get(key, 0) > 0

    def arrived(self) -> None:
        """Something arrived or settled (any thread): wake every waiting stream."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def changed(self, timeout_s: float) -> None:
        """Return after the next arrival, or after `timeout_s`."""
        event = asyncio.Event()
        with self._lock:
            self._waiters.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout_s)
        except TimeoutError:
            with self._lock:
                self._waiters = [w for w in self._waiters if w[1] is not event]


@dataclass
class LinkCounter:
    """Wire bytes to or from one peer: totals, and a recent rate."""

    total: int = 0
    _recent: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=4096))

    def add(self, nbytes: int, now: float) -> None:
        self.total += nbytes
        self._recent.append((now, nbytes))

    def rate(self, now: float) -> float:
        """Bytes per second over the last RATE_WINDOW_S."""
        cut = now - RATE_WINDOW_S
        return sum(n for t, n in self._recent if t >= cut) / RATE_WINDOW_S


class LinkStats:
    """Per peer: chunk bytes we sent it and received from it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, LinkCounter] = {}
        self.received: dict[str, LinkCounter] = {}

    def on_sent(self, peer: str, nbytes: int) -> None:
        with self._lock:
            self.sent.setdefault(peer, LinkCounter()).add(nbytes, time.monotonic())

    def on_received(self, peer: str, nbytes: int) -> None:
        with self._lock:
            self.received.setdefault(peer, LinkCounter()).add(nbytes, time.monotonic())

    def snapshot(self) -> dict[str, tuple[int, float, int, float]]:
        """peer -> (sent bytes, sent bytes/s, received bytes, received bytes/s)."""
        now = time.monotonic()
        with self._lock:
            peers = sorted(set(self.sent) | set(self.received))
            out = {}
            for p in peers:
                s, r = self.sent.get(p), self.received.get(p)
                out[p] = (s.total if s else 0, s.rate(now) if s else 0.0,
                          r.total if r else 0, r.rate(now) if r else 0.0)
            return out

    def receiving_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(c.rate(now) for c in self.received.values())
