"""Anti-entropy by digests, sans-IO: compare, descend where different, pull what is missing.

Every node holds every manifest (they are small; chunks are what placement
spreads), so any two nodes can compare. The tree has four levels:
root -> partition -> study -> manifest ids. The root (one digest and a count)
answers "nothing differs" in one small message, so a round at rest costs the
same at 100 studies as at 10,000,000. Only partitions whose digests differ are
opened, then only studies whose digests differ, so the cost follows the
difference, and a difference reads as "study X: 3 manifests missing here" in
the log. A partition this node knows nothing of is pulled whole, a page of
studies at a time (how an empty node learns the catalog).

`SyncRound` is one round against one peer. The runtime (cluster/workers.py) and
the simulation (tests/sim) drive the same object: `start()` gives the first
request, `on_reply(reply)` gives the manifests to accept and the next request,
until the next request is None. One request is in flight at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol

from pacsmesh.cluster.messages import (
    IdsAsk,
    IdsGive,
    M,
    ManifestsAsk,
    ManifestsGive,
    PartDigest,
    PartitionDigestsAsk,
    PartitionDigestsGive,
    PartitionManifestsAsk,
    PartitionManifestsGive,
    Request,
    RootAsk,
    RootGive,
    StudyDigestsAsk,
    StudyDigestsGive,
)

LOGGER = logging.getLogger(__name__)
ADHASH_MOD = 1 << 256
PARTITIONS_PER_ROUND_MAX = 64  # partitions opened per round: bounds one round's work
STUDY_PAGE_MAX = 1000  # study digests per page (~100 KB)
IDS_STUDIES_MAX = 64  # studies whose ids one request asks for
IDS_PER_ASK_MAX = 100_000  # ids one request may bring back (~3.4 MB); a bigger study alone
MANIFESTS_PER_ASK_MAX = 1000  # manifests per request (~300 KB)
BULK_PAGE_MANIFESTS = 2000  # manifests per page when a whole partition is pulled


def root_of(parts: Iterable[PartDigest]) -> tuple[bytes, int]:
    """The digest of a whole set from its partitions' AdHash digests (a sum)."""
    total = count = 0
    for digest, n in parts:
        total += int.from_bytes(digest, "big")
        count += n
    return (total % ADHASH_MOD).to_bytes(32, "big"), count


def differing_partitions(mine: Sequence[PartDigest], theirs: Sequence[PartDigest]) -> list[int]:
    """Partitions where the peer may hold manifests we lack (a set only grows: a
    peer with no manifests in a partition has nothing for us there)."""
    if len(mine) != len(theirs):
        raise ValueError(f"partition counts differ: {len(mine)} != {len(theirs)}")
    return [p for p, (a, b) in enumerate(zip(mine, theirs, strict=True))
            if a[0] != b[0] and b[1] > 0]


def differing_studies(mine: Mapping[str, tuple[bytes, int]],
                      theirs: Iterable[tuple[str, bytes, int]]) -> list[str]:
    return [study for study, digest, count in theirs
            if count > 0 and mine.get(study, (b"", 0))[0] != digest]


def missing(mine: set[bytes], theirs: Iterable[bytes]) -> list[bytes]:
    return [i for i in theirs if i not in mine]


class ManifestSet(Protocol):
    """What a round reads of this node's own catalog (LMDB, or the simulation's disk)."""

    def partition_digests(self) -> Sequence[PartDigest]: ...
    def study_digests(self, studies: Sequence[str]) -> Mapping[str, tuple[bytes, int]]: ...
    def unknown(self, ids: Sequence[bytes]) -> list[bytes]: ...


@dataclass
class SyncRound(Generic[M]):
    """One anti-entropy round against one peer, bounded: at most
    PARTITIONS_PER_ROUND_MAX partitions are opened by study; the rest wait for the
    next round. Partitions we know nothing of are pulled whole, page by page (every
    call still does bounded work)."""

    local: ManifestSet
    peer: str
    first_partition: int = 0  # where to start among differing partitions (rotates)
    received_bytes: int = 0  # filled in by the driver, for the benchmark
    pulled: int = 0
    _mine: Sequence[PartDigest] = ()
    _parts: list[int] = field(default_factory=list)
    _partition: int = -1
    _studies: list[tuple[str, int]] = field(default_factory=list)  # differing: (uid, count)
    _page_more: bool = False
    _page_after: str = ""
    _ids: list[bytes] = field(default_factory=list)  # unknown here, not asked yet
    _asked: tuple[bytes, ...] = ()  # the ids of the ManifestsAsk in flight

    def start(self) -> Request:
        return RootAsk()

    def on_reply(self, reply: object) -> tuple[tuple[M, ...], Request | None]:
        """The manifests to accept and the next request (None: the round is over)."""
        match reply:
            case RootGive(digest, count):
                self._mine = self.local.partition_digests()
                if (digest, count) == root_of(self._mine) or count == 0:
                    return (), None
                return (), PartitionDigestsAsk()
            case PartitionDigestsGive(parts):
                if len(parts) != len(self._mine):
                    return (), None  # a peer with other settings; membership refuses it
                differ = differing_partitions(self._mine, parts)
                if differ:  # rotate, so a large difference is worked through over rounds
                    k = self.first_partition % len(differ)
                    differ = differ[k:] + differ[:k]
                # partitions we know nothing of are a join, pulled whole and not counted
                # against the bound: an empty node learns the catalog in one round
                empty = [p for p in differ if self._mine[p][1] == 0]
                opened = [p for p in differ if self._mine[p][1] != 0]
                self._parts = empty + opened[:PARTITIONS_PER_ROUND_MAX]
                return (), self._next()
            case StudyDigestsGive(studies, more):
                mine = self.local.study_digests([s for s, _, _ in studies])
                counts = {s: n for s, _, n in studies}
                self._studies += [(s, counts[s]) for s in differing_studies(mine, studies)]
                # a page that does not advance would be asked for again and again
                self._page_more = more and bool(studies) and studies[-1][0] > self._page_after
                self._page_after = studies[-1][0] if studies else ""
                return (), self._next()
            case IdsGive(ids):
                self._ids += self.local.unknown(list(ids))
                return (), self._next()
            case ManifestsGive(manifests, covered):
                self.pulled += len(manifests)
                if 0 < covered < len(self._asked):  # the answer was full: ask the rest
                    self._ids = list(self._asked[covered:]) + self._ids
                return manifests, self._next()
            case PartitionManifestsGive(manifests, last, more):
                self.pulled += len(manifests)
                nxt: Request | None
                if more and manifests and last > self._page_after:  # (advancing, as above)
                    self._page_after = last
                    nxt = PartitionManifestsAsk(self._partition, last, BULK_PAGE_MANIFESTS)
                else:
                    nxt = self._next_partition()
                return manifests, nxt
        return (), None  # no answer or a wrong one: the round ends, the next one retries

    def _next(self) -> Request | None:
        if self._ids:
            batch, self._ids = (self._ids[:MANIFESTS_PER_ASK_MAX],
                                self._ids[MANIFESTS_PER_ASK_MAX:])
            self._asked = tuple(batch)
            return ManifestsAsk(self._asked)
        if self._studies:
            take = total = 0
            for _, n in self._studies[:IDS_STUDIES_MAX]:
                if take and total + n > IDS_PER_ASK_MAX:
                    break
                take, total = take + 1, total + n
            batch_s, self._studies = self._studies[:take], self._studies[take:]
            return IdsAsk(tuple(s for s, _ in batch_s))
        if self._page_more:
            self._page_more = False
            return StudyDigestsAsk(self._partition, self._page_after, STUDY_PAGE_MAX)
        return self._next_partition()

    def _next_partition(self) -> Request | None:
        if not self._parts:
            return None
        self._partition, self._page_after = self._parts.pop(0), ""
        if self._mine[self._partition][1] == 0:  # we know nothing here: take it whole
            return PartitionManifestsAsk(self._partition, "", BULK_PAGE_MANIFESTS)
        return StudyDigestsAsk(self._partition, "", STUDY_PAGE_MAX)
