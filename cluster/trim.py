"""Trim, sans-IO: drop copies this node no longer has to hold, make before break.

A node holds copies outside its replica set after placement moved a partition
away (a healed outage, a new node). It may drop one only when the replica set,
without it, holds verified full copies at N distant sites, by fresh answers from
each replica (trimming on stale news is how data dies), counting only replicas
that place the study on themselves too (two nodes whose views differ would
otherwise each trim counting on the other), and never what this site received
itself.

Work is driven by change, not by time: `TrimPlanner` queues the partitions
worth a look (placement moved them away from us, or a peer's holdings there
changed) and hands them out one at a time; a partition whose trim could not be
decided (a replica did not answer, or does not hold a full copy yet) is looked
at again after RETRY_S. At rest the queue is empty and trim costs nothing.

`TrimRound` is one study's decision: it asks the replicas one after another, as
the runtime and the simulation both do, so the first answer is the stalest
when it decides.

A replica's word is not enough: a member with a valid certificate could claim
copies it does not have, and every honest copy outside the replica set would
be trimmed on that claim. So each replica gets its own challenge (a fresh
nonce and chunks of the study, which this node holds and can check), and it
counts as a holder only if it proves possession of those bytes. A replica that
fails is named in `failed_proofs` for the runtime to raise.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pacsmesh.cluster import repair
from pacsmesh.cluster.messages import StudyHoldingAsk, StudyHoldingGive
from pacsmesh.cluster.safety import Holding, Position

# a partition whose trim was not decided is looked at again after this: six background
# intervals of the worker (30 s at the default gossip interval of 1 s)
RETRY_S = 30.0
RETRY_INTERVALS = 6
STUDIES_PER_STEP_MAX = 256  # studies of one partition examined per step


class TrimPlanner:
    def __init__(self, retry_s: float = RETRY_S) -> None:
        self.retry_s = retry_s
        self._queue: collections.deque[int] = collections.deque()
        self._queued: set[int] = set()
        self._later: dict[int, float] = {}  # partition -> when to look again
        self.cursor: dict[int, str] = {}  # partition -> last study examined

    def enqueue(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            if p not in self._queued:
                self._queued.add(p)
                self._queue.append(p)

    def retry_later(self, partition: int, now: float) -> None:
        again = now + self.retry_s
        self._later[partition] = min(self._later.get(partition, again), again)

    def next(self, now: float) -> int | None:
        if self._later:
            due = [p for p, t in self._later.items() if t <= now]
            for p in due:
                del self._later[p]
            self.enqueue(sorted(due))
        if not self._queue:
            return None
        p = self._queue.popleft()
        self._queued.discard(p)
        return p

    def pending(self) -> int:
        return len(self._queue) + len(self._later)


@dataclass(frozen=True, slots=True)
class TrimCase:
    """One study held here, as the catalog says at the start of the decision."""

    study_uid: str
    instances: int  # current versions
    current_digest: bytes
    all_digest: bytes  # of every version: unhold only if it did not change meanwhile
    mids: tuple[bytes, ...]  # every version: what the answers cover
    origin_here: bool  # a current version was received at this site


def eligible(me: str, case: TrimCase, replicas: Sequence[str], alive: Iterable[str]) -> bool:
    """Worth asking the replicas about at all."""
    if case.origin_here or me in replicas or not replicas or case.instances == 0:
        return False
    alive_set = set(alive)
    return all(r in alive_set for r in replicas)


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    chunks: tuple[bytes, ...]
    expected: tuple[bytes, ...]  # the proofs a holder of those chunks returns


@dataclass
class TrimRound:
    me: str
    case: TrimCase
    replicas: tuple[str, ...]
    positions: Mapping[str, Position]
    copies: int
    min_distance_miles: float
    challenges: Mapping[str, Challenge] = field(default_factory=dict)  # by replica
    holdings: list[Holding] = field(default_factory=list)
    answers: int = 0
    failed_proofs: list[str] = field(default_factory=list)

    def _ask(self, replica: str) -> tuple[str, StudyHoldingAsk]:
        c = self.challenges.get(replica)
        if c is None:
            return replica, StudyHoldingAsk(self.case.study_uid)
        return replica, StudyHoldingAsk(self.case.study_uid, c.nonce, c.chunks)

    def start(self) -> tuple[str, StudyHoldingAsk]:
        return self._ask(self.replicas[0])

    def on_reply(self, reply: object) -> tuple[str, StudyHoldingAsk] | bool:
        """The next replica to ask, or the verdict: True = drop our copy."""
        if not isinstance(reply, StudyHoldingGive):
            return False
        asked = self.replicas[self.answers]
        self.answers += 1
        challenge = self.challenges.get(asked)
        proven = challenge is None or (reply.proofs == challenge.expected
                                       and reply.node_id == asked)
        if not proven and reply.held_instances:
            self.failed_proofs.append(asked)  # claims copies it cannot show: a liar or rot
        if reply.replica and proven:  # a holder about to trim too must not be counted on
            self.holdings.append(Holding(reply.node_id, reply.held_instances, reply.held_digest))
        if self.answers < len(self.replicas):
            return self._ask(self.replicas[self.answers])
        return repair.may_trim(self.me, "", self.replicas, self.case.instances,
                               self.case.current_digest, self.holdings, self.positions,
                               self.copies, self.min_distance_miles)
