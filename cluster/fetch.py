"""Fetch planning, sans-IO: which manifests this node should pull chunks for next.

A node must hold every manifest of the partitions placement gives it. What it
knows but does not hold is indexed by partition (node/catalog.py `need`), so
the planner walks only this node's own partitions with a cursor: fresh
announcements first, then the cursor, page after page, partition after
partition, until the pass is done. Nothing re-reads the same window: manifests
of partitions placed elsewhere are never looked at, and a manifest whose chunks
are nowhere yet is passed by (the next pass retries it) instead of blocking the
ones behind it. That is what makes self-healing work at any size: after a node
dies, everything placement newly asks of us is reached in one pass.

Each call does bounded work (EXAMINE_MAX candidates at most). At rest, a pass
starts only every PASS_INTERVAL_S and finds nothing to do from the per-partition
backlog counts alone.

A new placement is acted on only once it has held for `settle_s` (a few gossip
rounds): while a booting node's member table fills, placement passes through
views in which it holds far more partitions than it will, and fetching for
those would copy data only to trim it again seconds later.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

BATCH_MAX = 64  # manifests whose chunks one fetch round asks for
EXAMINE_MAX = BATCH_MAX * 16  # candidates looked at per call
PAGE_MAX = 256  # need-index keys read per page
PASS_INTERVAL_S = 5.0  # a new pass over our partitions at least this often, when idle
FETCH_SETTLE_ROUNDS = 3  # gossip rounds a new placement must hold before we fetch for it
FRESH_MAX = 100_000  # announced ids remembered for priority; the cursor finds the rest


@dataclass(frozen=True, slots=True)
class Candidate:
    mid: bytes
    study_uid: str
    partition: int
    origin: str


class NeedIndex(Protocol):
    """What the planner reads of this node's catalog."""

    def need_totals(self) -> Mapping[int, tuple[int, int]]: ...
    def need_page(self, partition: int, after: bytes, limit: int) -> list[bytes]: ...
    def candidate(self, mid: bytes) -> Candidate | None: ...  # known, not held


class FetchPlanner:
    def __init__(self, settle_s: float = 0.0) -> None:
        self.settle_s = settle_s
        self.fresh: collections.deque[bytes] = collections.deque(maxlen=FRESH_MAX)
        self.mine: frozenset[int] = frozenset()  # partitions placed here
        self._placed_at = -1e18
        self._pass: list[int] = []  # partitions left in this pass, with a backlog
        self._after = b""
        self._pass_started = -1e18
        self._restart = True
        self.passes = 0

    def on_announced(self, mids: Iterable[bytes]) -> None:
        self.fresh.extend(mids)

    def on_placement(self, mine: Iterable[int], now: float) -> None:
        """Placement changed: walk our (new) partitions from the start once it settled."""
        self.mine = frozenset(mine)
        self._placed_at = now
        self._pass = []
        self._restart = True

    def backlog(self, index: NeedIndex) -> tuple[int, int]:
        """(instances, bytes) placed here and not held yet: P small reads at most."""
        totals = index.need_totals()
        n = b = 0
        for p in self.mine:
            if p in totals:
                n, b = n + totals[p][0], b + totals[p][1]
        return n, b

    def busy(self) -> bool:
        return bool(self.fresh or self._pass)

    def plan(self, index: NeedIndex, now: float) -> list[Candidate]:
        """Up to BATCH_MAX manifests to fetch now, fresh first; [] when nothing is due."""
        if now - self._placed_at < self.settle_s:
            return []  # announcements wait in `fresh`; the pass starts when it settled
        if not self._pass and (self._restart or now - self._pass_started >= PASS_INTERVAL_S):
            self._start_pass(index, now)
        out: list[Candidate] = []
        examined = 0
        while self.fresh and len(out) < BATCH_MAX and examined < EXAMINE_MAX:
            examined += 1
            c = index.candidate(self.fresh.popleft())
            if c is not None and c.partition in self.mine:
                out.append(c)
        taken = {c.mid for c in out}
        while self._pass and len(out) < BATCH_MAX and examined < EXAMINE_MAX:
            partition = self._pass[0]
            page = index.need_page(partition, self._after,
                                   min(PAGE_MAX, BATCH_MAX - len(out)))
            if not page:
                self._pass.pop(0)
                self._after = b""
                continue
            self._after = page[-1]
            for mid in page:
                examined += 1
                if mid in taken:
                    continue
                c = index.candidate(mid)
                if c is not None and c.partition in self.mine:
                    out.append(c)
        return out

    def _start_pass(self, index: NeedIndex, now: float) -> None:
        self._restart = False
        self._pass_started = now
        totals = index.need_totals()
        self._pass = sorted(p for p in self.mine if p in totals)
        self._after = b""
        self.passes += 1


def source_order(origin: str, holders: Sequence[str], alive: Sequence[str]) -> list[str]:
    """Whom to ask for a manifest's chunks, best first: peers known to hold its study
    (the caller shuffles them to spread load), its origin, then anyone alive."""
    alive_set = set(alive)
    order = [*holders, origin, *sorted(alive)]
    return [n for n in dict.fromkeys(order) if n in alive_set]


def relay_for(me: str, feeders: Sequence[str], chunk: bytes) -> str | None:
    """Who brings this chunk across the source's link, when several replicas need it
    from one source: the feeder ranked first for the chunk (rendezvous hashing, so all
    replicas agree without talking). None: this node fetches it from the source itself;
    otherwise it takes the chunk from that feeder, which is fetching it at the same time.

    Each of k feeders draws 1/k of the chunks over the source's uplink and passes them
    on to the others, so the source sends every chunk once instead of k times: the
    slow WAN link is crossed once, the far sites feed each other."""
    if me not in feeders or len(feeders) < 2:
        return None
    best = max(feeders, key=lambda n: hashlib.blake2b(chunk + n.encode(), digest_size=8)
               .digest())
    return None if best == me else best
