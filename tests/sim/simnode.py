"""One simulated member: the real Membership and ClusterState, driven the way
cluster/gossip.py and cluster/replication.py drive them, but over the world's
simulated network instead of gRPC and over an in-memory catalog instead of LMDB.

A `Disk` is what survives a crash (the catalog: known manifests, which of them
are held, the incarnation counter). A `Process` is one run of the node, from boot
to crash: its member table, its timers and its requests in flight die with it.

Where the runtime's order of steps matters for safety (trim reads the study
record and its ids, asks the replica set one node after another, then unholds
those ids if the study did not change), the order here is the same, so a race in
that order shows up in the simulation too. Change both together.
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from cluster import antientropy, repair
from cluster.membership import (
    ClusterSettings,
    Effect,
    GossipMessage,
    LeftTimedOut,
    Member,
    Membership,
    MemberState,
    SendGossip,
    StateChanged,
)
from cluster.peers import RPC_TIMEOUT_S
from cluster.replication import FETCH_BATCH_MANIFESTS_MAX, NOT_HELD_SCAN_MAX, SCAN_INTERVAL_S
from cluster.safety import Holding
from cluster.state import ClusterState, Snapshot
from node.catalog import EMPTY_DIGEST, digest_add

# FetchWorker.idle_s: how often an idle fetch worker looks again.
FETCH_INTERVAL_S = 1.0
# FetchWorker pops this many candidates per step before it stops looking.
FETCH_CANDIDATES_MAX = FETCH_BATCH_MANIFESTS_MAX * 4


@dataclass(frozen=True)
class Timing:
    """The runtime's intervals, as cluster/member.py derives them from the config."""

    gossip_interval_s: float = 1.0
    dead_after_s: float = 30.0
    rpc_timeout_s: float = RPC_TIMEOUT_S
    fetch_interval_s: float = FETCH_INTERVAL_S

    @property
    def background_s(self) -> float:
        """Anti-entropy and trim: a few gossip rounds apart (cluster/member.py)."""
        return max(1.0, 5 * self.gossip_interval_s)


@dataclass(frozen=True, slots=True)
class SimManifest:
    """The parts of a manifest the cluster code looks at."""

    mid: bytes
    study_uid: str
    origin: str
    partition: int


# Messages. Each request gets at most one reply, as a unary gRPC call does.


@dataclass(frozen=True, slots=True)
class Announce:
    manifests: tuple[SimManifest, ...]


@dataclass(frozen=True, slots=True)
class FetchAsk:
    mids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class FetchGive:
    mids: tuple[bytes, ...]  # the asked ones the peer holds: their chunks, verified


@dataclass(frozen=True, slots=True)
class DigestsAsk:
    pass


@dataclass(frozen=True, slots=True)
class DigestsGive:
    parts: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True, slots=True)
class StudyDigestsAsk:
    partitions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StudyDigestsGive:
    studies: tuple[tuple[str, bytes, int], ...]


@dataclass(frozen=True, slots=True)
class IdsAsk:
    studies: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IdsGive:
    mids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ManifestsAsk:
    mids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ManifestsGive:
    manifests: tuple[SimManifest, ...]


@dataclass(frozen=True, slots=True)
class HoldingsAsk:
    study_uid: str


@dataclass(frozen=True, slots=True)
class HoldingsGive:
    holding: Holding
    replica: bool  # the answerer places the study on itself (Replicator.own_holdings)


Request: TypeAlias = (
    GossipMessage | Announce | FetchAsk | DigestsAsk | StudyDigestsAsk | IdsAsk | ManifestsAsk
    | HoldingsAsk
)
Reply: TypeAlias = (
    GossipMessage | FetchGive | DigestsGive | StudyDigestsGive | IdsGive | ManifestsGive
    | HoldingsGive | None
)
OnReply: TypeAlias = Callable[[Reply], None]
OnTimeout: TypeAlias = Callable[[], None]


class Net(Protocol):
    """What a process needs from the world."""

    now: float
    stats: collections.Counter[str]

    def call(self, proc: Process, dst: str, request: Request, on_reply: OnReply | None = None,
             on_timeout: OnTimeout | None = None) -> None: ...

    def every(self, proc: Process, interval_s: float, fn: Callable[[], None]) -> None: ...

    def node_at(self, address: str) -> str: ...

    def trimming(self, proc: Process, study_uid: str, mids: Sequence[bytes]) -> None:
        """Called just before a node drops copies: the world checks them first."""


@dataclass
class Disk:
    """The catalog of one node, with the AdHash digests node/catalog.py keeps."""

    partitions: int
    incarnation: int = 0  # the one of the last boot, persisted (cluster/member.py)
    manifests: dict[bytes, SimManifest] = field(default_factory=dict)
    held: set[bytes] = field(default_factory=set)
    by_study: dict[str, list[bytes]] = field(default_factory=dict)
    all_digest: dict[str, bytes] = field(default_factory=dict)
    held_digest: dict[str, bytes] = field(default_factory=dict)
    held_count: dict[str, int] = field(default_factory=dict)
    by_partition: dict[int, list[str]] = field(default_factory=dict)
    part_digest: list[bytes] = field(default_factory=list)
    part_count: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.part_digest = [EMPTY_DIGEST] * self.partitions
        self.part_count = [0] * self.partitions

    def know(self, m: SimManifest) -> bool:
        """Record a manifest as known; False if it already was."""
        if m.mid in self.manifests:
            return False
        self.manifests[m.mid] = m
        study = m.study_uid
        if study not in self.by_study:
            self.by_study[study] = []
            self.by_partition.setdefault(m.partition, []).append(study)
        self.by_study[study].append(m.mid)
        self.all_digest[study] = digest_add(self.all_digest.get(study, EMPTY_DIGEST), m.mid)
        self.part_digest[m.partition] = digest_add(self.part_digest[m.partition], m.mid)
        self.part_count[m.partition] += 1
        return True

    def hold(self, mid: bytes) -> None:
        self._held(mid, 1)

    def unhold(self, mid: bytes) -> None:
        self._held(mid, -1)

    def _held(self, mid: bytes, sign: int) -> None:
        m = self.manifests[mid]
        if (mid in self.held) == (sign > 0):
            return
        if sign > 0:
            self.held.add(mid)
        else:
            self.held.discard(mid)
        study = m.study_uid
        self.held_digest[study] = digest_add(self.held_digest.get(study, EMPTY_DIGEST), mid, sign)
        self.held_count[study] = self.held_count.get(study, 0) + sign

    def holding(self, node_id: str, study_uid: str) -> Holding:
        return Holding(node_id, self.held_count.get(study_uid, 0),
                       self.held_digest.get(study_uid, EMPTY_DIGEST))

    def study_digests(self, partitions: Sequence[int]) -> dict[str, tuple[bytes, int]]:
        return {s: (self.all_digest[s], len(self.by_study[s]))
                for p in partitions for s in self.by_partition.get(p, ())}


class Process:
    """One run of a node: gossip, announce, fetch, anti-entropy and trim."""

    def __init__(self, net: Net, me: Member, disk: Disk, seeds: Sequence[str],
                 settings: ClusterSettings, timing: Timing, rng_seed: str) -> None:
        self.net = net
        self.node_id = str(me.node_id)
        self.disk = disk
        self.settings = settings
        self.timing = timing
        self.up = True
        self.membership = Membership(
            me, settings, seeds, rng=random.Random(f"{rng_seed}/gossip"),
            gossip_interval_s=timing.gossip_interval_s, dead_after_s=timing.dead_after_s)
        self.state = ClusterState(self.node_id, settings.partitions, settings.copies,
                                  settings.min_distance_miles, timing.dead_after_s)
        self.rng = random.Random(f"{rng_seed}/work")
        self.fresh: collections.deque[bytes] = collections.deque()
        self.scan: collections.deque[bytes] = collections.deque()
        self.rescan = True
        self.scanned_at = -SCAN_INTERVAL_S
        self.fetching = False
        self.syncing = False
        self.trimming: set[str] = set()

    def start(self) -> None:
        self.publish()
        t = self.timing
        self.net.every(self, t.gossip_interval_s, self.gossip_step)
        self.net.every(self, t.fetch_interval_s, self.fetch_step)
        self.net.every(self, t.background_s, self.sync_step)
        self.net.every(self, t.background_s, self.trim_step)

    # ---- gossip (cluster/gossip.py) -------------------------------------------------

    def gossip_step(self) -> None:
        self.apply(self.membership.tick(self.net.now))

    def apply(self, effects: list[Effect]) -> None:
        changed = False
        for effect in effects:
            if isinstance(effect, SendGossip):
                self.net.call(self, self.net.node_at(effect.address), effect.message,
                              self._gossip_answered)
            changed = changed or isinstance(effect, StateChanged | LeftTimedOut)
        # GossipWorker publishes after every batch; what placement and the workers
        # read (who is placeable, alive, where) changes only with these effects, and
        # publishing is a third of the simulation's time.
        if changed:
            self.publish()

    def _gossip_answered(self, reply: Reply) -> None:
        if isinstance(reply, GossipMessage):
            self.apply(self.membership.on_reply(reply, self.net.now))

    def publish(self) -> None:
        now = self.net.now
        members = self.membership.members()
        silent: dict[str, float] = {m.node_id: self.membership.time_since_heard(m.node_id, now)
                  for m in members if m.state == MemberState.LEFT}
        if self.state.publish(members, silent):
            self.rescan = True  # Replicator.on_placement_change

    def leave(self) -> None:
        """A clean shutdown: tell some peers we left, wait for no answer."""
        for effect in self.membership.leave(self.net.now):
            if isinstance(effect, SendGossip):
                self.net.call(self, self.net.node_at(effect.address), effect.message)

    # ---- serving peers (cluster/peer_service.py) ------------------------------------

    def serve(self, request: Request) -> Reply:
        disk = self.disk
        match request:
            case GossipMessage():
                reply, effects = self.membership.on_gossip(request, self.net.now)
                self.apply(effects)
                return reply
            case Announce(manifests):
                self.accept(manifests)
                return None
            case FetchAsk(mids):
                return FetchGive(tuple(mid for mid in mids if mid in disk.held))
            case DigestsAsk():
                return DigestsGive(tuple(zip(disk.part_digest, disk.part_count, strict=True)))
            case StudyDigestsAsk(partitions):
                studies = disk.study_digests(partitions)
                return StudyDigestsGive(tuple((s, d, c) for s, (d, c) in studies.items()))
            case IdsAsk(studies):
                return IdsGive(tuple(mid for s in studies for mid in disk.by_study.get(s, ())))
            case ManifestsAsk(mids):
                return ManifestsGive(tuple(disk.manifests[m] for m in mids if m in disk.manifests))
            case HoldingsAsk(study_uid):
                placement = self.state.placement(study_uid)
                replica = placement is not None and self.node_id in placement.replicas
                return HoldingsGive(disk.holding(self.node_id, study_uid), replica)
        raise AssertionError(f"unknown request {request!r}")

    # ---- ingest and announce (Replicator.on_stored, AnnounceWorker) -----------------

    def ingest(self, m: SimManifest) -> None:
        """A modality stored an instance here: durable, so acknowledged; tell everyone."""
        self.disk.know(m)
        self.disk.hold(m.mid)
        for peer in self.state.snapshot.alive_peers(self.node_id):
            self.net.call(self, peer.node_id, Announce((m,)))

    def accept(self, manifests: Sequence[SimManifest]) -> None:
        for m in manifests:
            if self.disk.know(m):
                self.fresh.append(m.mid)

    # ---- fetch (FetchWorker, Replicator.fetch_batch) ---------------------------------

    def fetch_step(self) -> None:
        if self.fetching:
            return
        wanted = self._wanted()
        if not wanted:
            return
        self.fetching = True
        self._fetch_from(self._sources(wanted), set(wanted))

    def _wanted(self) -> list[SimManifest]:
        now = self.net.now
        if not self.scan and (self.rescan or now - self.scanned_at > SCAN_INTERVAL_S):
            self.rescan = False
            self.scanned_at = now
            not_held = (mid for mid in self.disk.manifests if mid not in self.disk.held)
            self.scan.extend(itertools.islice(not_held, NOT_HELD_SCAN_MAX))
        wanted: list[SimManifest] = []
        for _ in range(FETCH_CANDIDATES_MAX):
            if not (self.fresh or self.scan) or len(wanted) >= FETCH_BATCH_MANIFESTS_MAX:
                break
            m = self._want(self.fresh.popleft() if self.fresh else self.scan.popleft())
            if m is not None:
                wanted.append(m)
        return wanted

    def _want(self, mid: bytes) -> SimManifest | None:
        m = self.disk.manifests.get(mid)
        if m is None or mid in self.disk.held:
            return None
        placement = self.state.placement(m.study_uid)
        if placement is None or not repair.should_fetch(self.node_id, placement.replicas, False):
            return None
        return m

    def _sources(self, wanted: Sequence[SimManifest]) -> list[str]:
        """Replicator._sources without a holdings cache: the origin, then everyone alive."""
        alive = sorted(p.node_id for p in self.state.snapshot.alive_peers(self.node_id))
        order = [wanted[0].origin, *alive]
        return [n for n in dict.fromkeys(order) if n in alive]

    def _fetch_from(self, sources: list[str], need: set[SimManifest]) -> None:
        if not sources or not need:
            self.fetching = False
            return
        source, rest = sources[0], sources[1:]
        asked = tuple(sorted(m.mid for m in need))

        def got(reply: Reply) -> None:
            if isinstance(reply, FetchGive):
                self._fetched(reply.mids, need)
            self._fetch_from(rest, need)

        self.net.call(self, source, FetchAsk(asked), got, lambda: self._fetch_from(rest, need))

    def _fetched(self, mids: Sequence[bytes], need: set[SimManifest]) -> None:
        for mid in mids:
            m = self.disk.manifests[mid]
            if m in need:
                need.discard(m)
                self.disk.hold(mid)  # every chunk verified on arrival
                self.net.stats["fetched"] += 1

    # ---- anti-entropy (AntiEntropyWorker.sync_with) ----------------------------------

    def sync_step(self) -> None:
        peers = self.state.snapshot.alive_peers(self.node_id)
        if self.syncing or not peers:
            return
        self.syncing = True
        _SyncRound(self, self.rng.choice(peers).node_id).start()

    # ---- trim (TrimWorker) -----------------------------------------------------------

    def trim_step(self) -> None:
        if self.state.snapshot.table is None:
            return
        for study in self._trim_candidates():
            self._maybe_trim(study)

    def _trim_candidates(self) -> list[str]:
        out = []
        for study, count in self.disk.held_count.items():
            if count == 0 or study in self.trimming:
                continue
            placement = self.state.placement(study)
            if placement is not None and self.node_id not in placement.replicas:
                out.append(study)
        return out

    def _maybe_trim(self, study: str) -> None:
        disk = self.disk
        # What the answers will cover. Every version is current here, so the study's
        # digest of all manifests is also its current digest.
        mids = tuple(disk.by_study[study])
        instances, current_digest = len(mids), disk.all_digest[study]
        placement = self.state.placement(study)
        if placement is None or not placement.replicas:
            return
        if any(disk.manifests[mid].origin == self.node_id for mid in mids):
            return  # a site keeps what it received itself
        snap = self.state.snapshot
        alive = {p.node_id for p in snap.alive_peers(self.node_id)}
        if any(node_id not in alive for node_id in placement.replicas):
            return
        self.trimming.add(study)
        _TrimRound(self, study, placement.replicas, mids, instances, current_digest, snap).ask()

    def decide_trim(self, trim: _TrimRound) -> None:
        self.trimming.discard(trim.study)
        if not repair.may_trim(self.node_id, "", trim.replicas, trim.instances,
                               trim.current_digest, trim.holdings, trim.snapshot.positions(),
                               self.settings.copies, self.settings.min_distance_miles):
            return
        # Store.unhold_unchanged: only what the answers covered, and only if nothing
        # reached the study meanwhile (an instance stored here may be its only copy).
        if self.disk.all_digest[trim.study] != trim.current_digest:
            return
        mids = [mid for mid in trim.mids if mid in self.disk.held]
        self.net.trimming(self, trim.study, mids)
        for mid in mids:
            self.disk.unhold(mid)
        self.net.stats["trims"] += 1


@dataclass
class _TrimRound:
    """One study's trim decision: asks the replicas one after another, as
    TrimWorker does, so the first answer is the stalest when it decides."""

    proc: Process
    study: str
    replicas: tuple[str, ...]
    mids: tuple[bytes, ...]
    instances: int
    current_digest: bytes
    snapshot: Snapshot
    holdings: list[Holding] = field(default_factory=list)
    answers: int = 0

    def ask(self) -> None:
        # ask now: trimming on stale news is how data dies
        node_id = self.replicas[self.answers]
        self.proc.net.call(self.proc, node_id, HoldingsAsk(self.study), self._answered,
                           self._failed)

    def _answered(self, reply: Reply) -> None:
        if not isinstance(reply, HoldingsGive):
            return self._failed()
        self.answers += 1
        if reply.replica:  # a holder about to trim too must not be counted on
            self.holdings.append(reply.holding)
        if self.answers < len(self.replicas):
            return self.ask()
        return self.proc.decide_trim(self)

    def _failed(self) -> None:
        self.proc.trimming.discard(self.study)


@dataclass
class _SyncRound:
    """One anti-entropy round with one peer: partitions, then studies, then ids."""

    proc: Process
    peer: str
    partitions: tuple[int, ...] = ()

    def start(self) -> None:
        self._ask(DigestsAsk(), self._digests)

    def _ask(self, request: Request, then: OnReply) -> None:
        self.proc.net.call(self.proc, self.peer, request, then, self._finish)

    def _finish(self) -> None:
        self.proc.syncing = False

    def _digests(self, reply: Reply) -> None:
        disk = self.proc.disk
        if not isinstance(reply, DigestsGive):
            return self._finish()
        mine = list(zip(disk.part_digest, disk.part_count, strict=True))
        self.partitions = tuple(antientropy.differing_partitions(mine, reply.parts))
        if not self.partitions:
            return self._finish()
        return self._ask(StudyDigestsAsk(self.partitions), self._study_digests)

    def _study_digests(self, reply: Reply) -> None:
        if not isinstance(reply, StudyDigestsGive):
            return self._finish()
        mine = self.proc.disk.study_digests(self.partitions)
        studies = antientropy.differing_studies(mine, reply.studies)
        if not studies:
            return self._finish()
        return self._ask(IdsAsk(tuple(studies)), self._ids)

    def _ids(self, reply: Reply) -> None:
        if not isinstance(reply, IdsGive):
            return self._finish()
        lacking = antientropy.missing(set(self.proc.disk.manifests), reply.mids)
        if not lacking:
            return self._finish()
        return self._ask(ManifestsAsk(tuple(lacking)), self._manifests)

    def _manifests(self, reply: Reply) -> None:
        if isinstance(reply, ManifestsGive):
            self.proc.accept(reply.manifests)
            self.proc.net.stats["synced"] += len(reply.manifests)
        self._finish()
