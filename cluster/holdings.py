"""Holdings exchange, sans-IO: learn what every peer holds, verified, by digests.

`locate`, `status`, fetch sources and trim candidates need to know which node
holds which study. Pulling every peer's full list is O(archive) per round (and
passes the message cap near 150,000 studies), so a node keeps a cache of each
peer's holdings (cluster/holdings_cache.py, in LMDB) and refreshes it the way
anti-entropy works: compare the peer's root digest of held current versions
with the root of our cache for it; only when they differ, compare per-partition
digests; only partitions that differ are re-read, a page of studies at a time,
and replace our cache of that partition. At rest a round is one small message
per peer, whatever the archive holds.

The root answer also carries the peer's fetch backlog and its last scrub, for
status (re-protection progress and verification age).

`HoldingsRound` is one round against one peer, driven by the runtime
(cluster/workers.py) and the simulation alike: `start()`, then `on_reply()`
until the next request is None. `Replace` effects carry what to store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pacsmesh.cluster.antientropy import root_of
from pacsmesh.cluster.messages import (
    HeldPartitionsAsk,
    HeldPartitionsGive,
    HeldRootAsk,
    HeldRootGive,
    HeldStudiesAsk,
    HeldStudiesGive,
    PartDigest,
    Request,
    StudyHeld,
)

HELD_PAGE_MAX = 2000  # studies examined per page (~150 KB of answer at most)
PARTITIONS_PER_ROUND_MAX = 128  # partitions re-read per round; the rest next round


class HoldingsView(Protocol):
    """Our cache of one peer's holdings, per partition."""

    def partition_digests(self, peer: str) -> Sequence[PartDigest]: ...


@dataclass(frozen=True, slots=True)
class Replace:
    """Our cache of `peer`'s partition becomes exactly these studies."""

    peer: str
    partition: int
    studies: tuple[StudyHeld, ...]


@dataclass
class HoldingsRound:
    cache: HoldingsView
    peer: str
    report: HeldRootGive | None = None  # the peer's root answer, once it came
    _mine: Sequence[PartDigest] = ()
    _parts: list[int] = field(default_factory=list)
    _partition: int = -1
    _after: str = ""  # the partition's page asked for: after this study
    _collected: list[StudyHeld] = field(default_factory=list)
    changed_partitions: list[int] = field(default_factory=list)

    def start(self) -> Request:
        return HeldRootAsk()

    def on_reply(self, reply: object) -> tuple[Replace | None, Request | None]:
        match reply:
            case HeldRootGive(digest, count):
                self.report = reply
                self._mine = self.cache.partition_digests(self.peer)
                if (digest, count) == root_of(self._mine):
                    return None, None
                return None, HeldPartitionsAsk()
            case HeldPartitionsGive(parts):
                if len(parts) != len(self._mine):
                    return None, None  # a peer with other settings; membership refuses it
                self._parts = [p for p, (a, b) in enumerate(zip(self._mine, parts, strict=True))
                               if a != b][:PARTITIONS_PER_ROUND_MAX]
                return None, self._next_partition()
            case HeldStudiesGive(studies, last, more):
                self._collected += studies
                if more and last <= self._after:  # a page that does not advance: would
                    return None, self._next_partition()  # never end; keep the old cache
                if more:
                    self._after = last
                    return None, HeldStudiesAsk(self._partition, last, HELD_PAGE_MAX)
                done = Replace(self.peer, self._partition, tuple(self._collected))
                self.changed_partitions.append(self._partition)
                return done, self._next_partition()
        return None, None

    def _next_partition(self) -> Request | None:
        if not self._parts:
            return None
        self._partition = self._parts.pop(0)
        self._after, self._collected = "", []
        return HeldStudiesAsk(self._partition, "", HELD_PAGE_MAX)
