"""Outbound replication limits: a node's rate, per-peer overrides, and the bulk window.

Sites share their WAN link with clinical traffic. What a node sends to its peers
(chunks they fetch from it) obeys its own `[transfer]` settings:

- fresh ingest may always use up to `rate_mb_s` (0: unlimited);
- bulk traffic (repair of older data, then rebalance) flows only inside
  `bulk_window` (local time, e.g. "19:00-07:00"; empty: always), at most
  `bulk_rate_mb_s`, and only what fresh traffic leaves: a bulk sender waits
  while a more urgent one is waiting (strict priority: fresh, repair, rebalance);
- `peers = { seattle = 2.0 }` caps what goes to one peer, within the node's rate.

Outside its window a bulk request is not queued for hours: the sender says so at
once ("deferred: ...") and the asker tries again later (or another holder, whose
window may be open). The arithmetic (`Window`, `TokenBucket`, `Limits`) is free of
IO and clocks; `Shaper` is the async edge the chunk sender awaits.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

FRESH, REPAIR, REBALANCE = 0, 1, 2  # = peer.proto TransferPurpose
PURPOSE_NAMES = {FRESH: "fresh ingest", REPAIR: "repair", REBALANCE: "rebalance"}
BURST_S = 0.25  # a bucket holds this many seconds of its rate (at least one chunk)
BURST_MIN_BYTES = 1 << 20
PRIORITY_POLL_S = 0.02  # a lower-priority sender re-checks this often while blocked
MB = 1_000_000
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    """A daily local-time window [start, end), wrapping midnight when end < start."""

    start_min: int
    end_min: int

    def contains(self, minute_of_day: int) -> bool:
        if self.start_min <= self.end_min:
            return self.start_min <= minute_of_day < self.end_min
        return minute_of_day >= self.start_min or minute_of_day < self.end_min

    def minutes_until_open(self, minute_of_day: int) -> int:
        return 0 if self.contains(minute_of_day) else (self.start_min - minute_of_day) % 1440

    def __str__(self) -> str:
        return (f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-"
                f"{self.end_min // 60:02d}:{self.end_min % 60:02d}")


def parse_window(text: str) -> Window | None:
    """"19:00-07:00" -> Window; "" -> None (always open). ValueError says what is wrong."""
    if not text.strip():
        return None
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM (local time, e.g. \"19:00-07:00\")")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"{text!r}: hours are 00-23 (24:00 allowed as an end), minutes 00-59")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % 1440:
        raise ValueError(f"{text!r} is empty; leave bulk_window empty for \"always\"")
    return Window(start, end)


class TokenBucket:
    """Bytes per second with a small burst. Sends are charged after the fact (the
    level may go negative), so a chunk larger than the burst still goes, and the
    long-run rate is exact."""

    def __init__(self, rate_bps: float, now: float) -> None:
        self.rate = rate_bps
        self.burst = max(BURST_MIN_BYTES, rate_bps * BURST_S)
        self.level = self.burst
        self.at = now

    def _fill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now

    def delay(self, now: float) -> float:
        """Seconds until a send may start (the level is back to >= 0)."""
        self._fill(now)
        # (within a byte of zero counts as zero: float rounding must not leave a
        # delay too small to move the clock)
        return 0.0 if self.level > -1.0 else -self.level / self.rate

    def charge(self, nbytes: int, now: float) -> None:
        self._fill(now)
        self.level -= nbytes


@dataclass(frozen=True)
class Limits:
    rate_bps: float = 0.0  # 0: unlimited
    bulk_rate_bps: float = 0.0  # 0: as rate_bps
    bulk_window: Window | None = None
    peer_bps: Mapping[str, float] = field(default_factory=dict)

    @property
    def unlimited(self) -> bool:
        return not (self.rate_bps or self.bulk_rate_bps or self.bulk_window or self.peer_bps)

    def deferral(self, purpose: int, minute_of_day: int, clock_text: str, me: str) -> str:
        """Why a request of this purpose is not served now ("" if it is)."""
        w = self.bulk_window
        if purpose == FRESH or w is None or w.contains(minute_of_day):
            return ""
        wait = w.minutes_until_open(minute_of_day)
        return (f"deferred: {me} sends bulk data ({PURPOSE_NAMES[purpose]}) only in its bulk "
                f"window {w} local time; it is {clock_text} there, the window opens in "
                f"{wait // 60} h {wait % 60:02d} min")


class Shaper:
    """Paces the chunks this node sends, by the limits above (event loop only)."""

    def __init__(self, limits: Limits, me: str,
                 clock: Callable[[], float] = time.monotonic,
                 local_time: Callable[[], time.struct_time] = time.localtime,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.limits, self.me = limits, me
        self._clock, self._local, self._sleep = clock, local_time, sleep
        now = clock()
        self._node = TokenBucket(limits.rate_bps, now) if limits.rate_bps else None
        bulk = limits.bulk_rate_bps
        self._bulk = TokenBucket(bulk, now) if bulk else None
        self._peers = {p: TokenBucket(r, now) for p, r in limits.peer_bps.items() if r > 0}
        self._waiting = [0, 0, 0]  # senders blocked, per purpose
        self.sent = [0, 0, 0]  # bytes, per purpose

    def deferral(self, purpose: int) -> str:
        t = self._local()
        return self.limits.deferral(purpose, t.tm_hour * 60 + t.tm_min,
                                    f"{t.tm_hour:02d}:{t.tm_min:02d}", self.me)

    async def send(self, peer: str, purpose: int, nbytes: int) -> None:
        """Return when `nbytes` may go to `peer`; charges them."""
        purpose = min(max(purpose, FRESH), REBALANCE)
        self.sent[purpose] += nbytes
        if self.limits.unlimited:
            return
        peer_bucket = self._peers.get(peer)
        bulk = self._bulk if purpose != FRESH else None
        counted = False  # are we among the senders waiting for a shared bucket?
        try:
            while True:
                now = self._clock()
                if self._yields(purpose):
                    await self._sleep(PRIORITY_POLL_S)  # a more urgent sender goes first
                    continue
                shared = max(self._node.delay(now) if self._node else 0.0,
                             bulk.delay(now) if bulk else 0.0)
                delay = max(shared, peer_bucket.delay(now) if peer_bucket else 0.0)
                if delay <= 0:
                    for b in (self._node, bulk, peer_bucket):
                        if b is not None:
                            b.charge(nbytes, now)
                    return
                # Only a wait for a shared bucket holds back less urgent senders: one
                # waiting on its own peer's cap must not stall traffic to the others.
                if (shared > 0) != counted:
                    counted = shared > 0
                    self._waiting[purpose] += 1 if counted else -1
                await self._sleep(min(delay, 0.5))
        finally:
            if counted:
                self._waiting[purpose] -= 1

    def _yields(self, purpose: int) -> bool:
        """Must this sender wait for a more urgent one? Only where they share a bucket:
        everything shares the node's rate; repair and rebalance share the bulk rate."""
        if self._node is not None and any(self._waiting[p] for p in range(purpose)):
            return True
        return purpose == REBALANCE and self._bulk is not None and self._waiting[REPAIR] > 0


def limits_from_config(rate_mb_s: float, bulk_rate_mb_s: float, bulk_window: str,
                       peers: Mapping[str, float]) -> Limits:
    return Limits(rate_bps=rate_mb_s * MB, bulk_rate_bps=bulk_rate_mb_s * MB,
                  bulk_window=parse_window(bulk_window),
                  peer_bps={p: r * MB for p, r in peers.items()})
