"""One simulated member: the real Membership, ClusterState and replication
machines (cluster/announce.py, fetch.py, antientropy.py, holdings.py, trim.py),
driven the way cluster/gossip.py and cluster/workers.py drive them, but over the
world's simulated network instead of gRPC and over an in-memory catalog instead
of LMDB. Only the driving is written here; every decision is the machines'.

A `Disk` is what survives a crash (the catalog: known manifests, which of them
are held, the cache of peers' holdings, the incarnation counter). A `Process`
is one run of the node, from boot to crash: its member table, its timers and
its requests in flight die with it.
"""

from __future__ import annotations

import bisect
import collections
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from pacsmesh.cluster.announce import AnnounceQueue
from pacsmesh.cluster.antientropy import SyncRound, root_of
from pacsmesh.cluster.fetch import FETCH_SETTLE_ROUNDS, Candidate, FetchPlanner, source_order
from pacsmesh.cluster.holdings import HoldingsRound
from pacsmesh.cluster.membership import (
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
from pacsmesh.cluster.messages import (
    HeldPartitionsAsk,
    HeldPartitionsGive,
    HeldPush,
    HeldRootAsk,
    HeldRootGive,
    HeldStudiesAsk,
    HeldStudiesGive,
    IdsAsk,
    IdsGive,
    ManifestsAsk,
    ManifestsGive,
    PartDigest,
    PartitionDigestsAsk,
    PartitionDigestsGive,
    PartitionManifestsAsk,
    PartitionManifestsGive,
    RootAsk,
    RootGive,
    StudyDigestsAsk,
    StudyDigestsGive,
    StudyHeld,
    StudyHoldingAsk,
    StudyHoldingGive,
)
from pacsmesh.cluster.messages import Request as ProtocolRequest
from pacsmesh.cluster.peers import RPC_TIMEOUT_S
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.trim import STUDIES_PER_STEP_MAX as STUDIES_PER_TRIM_STEP
from pacsmesh.cluster.trim import TrimCase, TrimPlanner, TrimRound, eligible
from pacsmesh.node.catalog import EMPTY_DIGEST, digest_add

# FetchWorker.idle_s: how often an idle fetch worker looks again.
FETCH_INTERVAL_S = 1.0
# The old names of the trim question, kept for the scenarios that script it.
HoldingsAsk = StudyHoldingAsk
HoldingsGive = StudyHoldingGive


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

    @property
    def holdings_s(self) -> float:
        return max(0.5, 2 * self.gossip_interval_s)


@dataclass(frozen=True, slots=True)
class SimManifest:
    """The parts of a manifest the cluster code looks at."""

    mid: bytes
    study_uid: str
    origin: str
    partition: int


# Messages the simulation adds to the protocol's: an announcement, and the chunk
# transfer (in the runtime a stream of chunk bytes, here the ids held).


@dataclass(frozen=True, slots=True)
class Announce:
    manifests: tuple[SimManifest, ...]


@dataclass(frozen=True, slots=True)
class FetchAsk:
    mids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class FetchGive:
    mids: tuple[bytes, ...]  # the asked ones the peer holds: their chunks, verified


Request: TypeAlias = GossipMessage | Announce | FetchAsk | HeldPush | ProtocolRequest
Reply: TypeAlias = object
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


HELD_BYTES = 1  # a simulated manifest's backlog bytes: counts are what matter here


def _sum(digests: Iterable[bytes]) -> bytes:
    return (sum(int.from_bytes(d, "big") for d in digests) % (1 << 256)).to_bytes(32, "big")


@dataclass
class Disk:
    """The catalog of one node, with the indexes and AdHash digests node/catalog.py
    keeps, and the cache of peers' holdings cluster/holdings_cache.py keeps.
    Per-study tuples are replaced, never mutated, so disks may share them."""

    partitions: int
    incarnation: int = 0  # the one of the last boot, persisted (cluster/member.py)
    manifests: dict[bytes, SimManifest] = field(default_factory=dict)
    held: set[bytes] = field(default_factory=set)
    by_study: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    all_digest: dict[str, bytes] = field(default_factory=dict)
    held_digest: dict[str, bytes] = field(default_factory=dict)
    held_count: dict[str, int] = field(default_factory=dict)
    by_partition: dict[int, list[str]] = field(default_factory=dict)  # sorted study uids
    held_by_partition: dict[int, list[str]] = field(default_factory=dict)  # held, sorted
    part_digest: list[bytes] = field(default_factory=list)
    part_count: list[int] = field(default_factory=list)
    part_held: list[bytes] = field(default_factory=list)
    part_held_count: list[int] = field(default_factory=list)
    need: dict[int, set[bytes]] = field(default_factory=dict)  # partition -> not held
    # peer -> partition -> study -> (held instances, held digest)
    peer_held: dict[str, dict[int, dict[str, tuple[int, bytes]]]] = field(
        default_factory=dict)
    peer_parts: dict[str, dict[int, PartDigest]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.part_digest:
            self.part_digest = [EMPTY_DIGEST] * self.partitions
            self.part_count = [0] * self.partitions
            self.part_held = [EMPTY_DIGEST] * self.partitions
            self.part_held_count = [0] * self.partitions

    def know(self, m: SimManifest) -> bool:
        """Record a manifest as known (not held); False if it already was."""
        if m.mid in self.manifests:
            return False
        self.manifests[m.mid] = m
        study = m.study_uid
        if study not in self.by_study:
            self.by_study[study] = ()
            studies = self.by_partition.setdefault(m.partition, [])
            bisect.insort(studies, study)
        self.by_study[study] = (*self.by_study[study], m.mid)
        self.all_digest[study] = digest_add(self.all_digest.get(study, EMPTY_DIGEST), m.mid)
        self.part_digest[m.partition] = digest_add(self.part_digest[m.partition], m.mid)
        self.part_count[m.partition] += 1
        self.need.setdefault(m.partition, set()).add(m.mid)
        return True

    def hold(self, mid: bytes) -> None:
        self._held(mid, 1)

    def unhold(self, mid: bytes) -> None:
        self._held(mid, -1)

    def _held(self, mid: bytes, sign: int) -> None:
        m = self.manifests[mid]
        if (mid in self.held) == (sign > 0):
            return
        need = self.need.setdefault(m.partition, set())
        if sign > 0:
            self.held.add(mid)
            need.discard(mid)
        else:
            self.held.discard(mid)
            need.add(mid)
        study = m.study_uid
        self.held_digest[study] = digest_add(self.held_digest.get(study, EMPTY_DIGEST), mid, sign)
        self.held_count[study] = self.held_count.get(study, 0) + sign
        held = self.held_by_partition.setdefault(m.partition, [])  # catalog.held_studies
        i = bisect.bisect_left(held, study)
        present = i < len(held) and held[i] == study
        if self.held_count[study] > 0 and not present:
            held.insert(i, study)
        elif self.held_count[study] == 0 and present:
            del held[i]
        p = m.partition
        self.part_held[p] = digest_add(self.part_held[p], mid, sign)
        self.part_held_count[p] += sign

    def holding(self, node_id: str, study_uid: str, replica: bool) -> StudyHoldingGive:
        return StudyHoldingGive(node_id, self.held_count.get(study_uid, 0),
                                self.held_digest.get(study_uid, EMPTY_DIGEST), replica)

    # ---- what the machines read (NeedIndex, ManifestSet) ------------------------------

    def need_totals(self) -> Mapping[int, tuple[int, int]]:
        return {p: (len(ids), len(ids) * HELD_BYTES) for p, ids in self.need.items() if ids}

    def need_page(self, partition: int, after: bytes, limit: int) -> list[bytes]:
        ids = sorted(self.need.get(partition, ()))
        start = bisect.bisect_right(ids, after) if after else 0
        return ids[start:start + limit]

    def candidate(self, mid: bytes) -> Candidate | None:
        m = self.manifests.get(mid)
        if m is None or mid in self.held:
            return None
        return Candidate(mid, m.study_uid, m.partition, m.origin)

    def partition_digests(self) -> Sequence[PartDigest]:
        return tuple(zip(self.part_digest, self.part_count, strict=True))

    def study_digests(self, studies: Sequence[str]) -> Mapping[str, tuple[bytes, int]]:
        return {s: (self.all_digest[s], len(self.by_study[s])) for s in studies
                if s in self.by_study}

    def unknown(self, ids: Sequence[bytes]) -> list[bytes]:
        return [i for i in ids if i not in self.manifests]

    def studies_page(self, partition: int, after: str, limit: int,
                     held_only: bool = False) -> list[str]:
        by = self.held_by_partition if held_only else self.by_partition
        studies = by.get(partition, [])
        start = bisect.bisect_right(studies, after) if after else 0
        return studies[start:start + limit]

    # ---- the holdings cache (HoldingsView) ---------------------------------------------

    def peer_partition_digests(self, peer: str) -> Sequence[PartDigest]:
        parts = self.peer_parts.get(peer, {})
        return [parts.get(p, (EMPTY_DIGEST, 0)) for p in range(self.partitions)]

    def apply_holdings(self, peer: str, deltas: Sequence[tuple[str, int, int, bytes]]
                       ) -> set[int]:
        """As PeerHoldings.apply: single studies updated, their partition sums kept."""
        changed = set()
        for study, p, n, d in deltas:
            part = self.peer_held.setdefault(peer, {}).setdefault(p, {})
            old = part.get(study, (0, EMPTY_DIGEST))
            new = (n, d) if n > 0 else (0, EMPTY_DIGEST)
            if old == new:
                continue
            if n > 0:
                part[study] = new
            else:
                part.pop(study, None)
            digest, count = self.peer_parts.setdefault(peer, {}).get(p, (EMPTY_DIGEST, 0))
            total = (int.from_bytes(digest, "big") - int.from_bytes(old[1], "big")
                     + int.from_bytes(new[1], "big")) % (1 << 256)
            self.peer_parts[peer][p] = (total.to_bytes(32, "big"), count - old[0] + new[0])
            changed.add(p)
        return changed

    def replace_holdings(self, peer: str, partition: int, studies: Sequence[StudyHeld]) -> None:
        """As cluster/holdings_cache.py: a partition replaced whole, its sum kept."""
        kept = {s: (n, d) for s, n, d in studies if n > 0}
        self.peer_held.setdefault(peer, {})[partition] = kept
        self.peer_parts.setdefault(peer, {})[partition] = (
            _sum(d for _, d in kept.values()), sum(n for n, _ in kept.values()))


class _PeerCache:
    """A Disk's holdings cache seen as the HoldingsView the machine reads."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk

    def partition_digests(self, peer: str) -> Sequence[PartDigest]:
        return self.disk.peer_partition_digests(peer)


class Process:
    """One run of a node: gossip, announce, fetch, anti-entropy, holdings and trim."""

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
                                  settings.min_distance_miles, timing.dead_after_s,
                                  timing.gossip_interval_s)
        self.rng = random.Random(f"{rng_seed}/work")
        self.announce: AnnounceQueue[SimManifest] = AnnounceQueue()
        self.planner = FetchPlanner(settle_s=FETCH_SETTLE_ROUNDS * timing.gossip_interval_s)
        self.trim = TrimPlanner()
        self.fetching = False
        self.syncing = False
        self.sync_rounds = 0
        self.holdings_busy: set[str] = set()
        self.trimming: set[str] = set()

    def start(self) -> None:
        self.publish()
        t = self.timing
        self.net.every(self, t.gossip_interval_s, self.gossip_step)
        self.net.every(self, t.fetch_interval_s, self.fetch_step)
        self.net.every(self, t.background_s, self.sync_step)
        self.net.every(self, t.holdings_s, self.holdings_step)
        self.net.every(self, t.background_s, self.trim_step)

    # ---- gossip (cluster/gossip.py) -------------------------------------------------

    def gossip_step(self) -> None:
        self.apply(self.membership.tick(self.net.now))
        # GossipWorker.keep_incarnation: a refuted incarnation outlives the process
        self.disk.incarnation = max(self.disk.incarnation, self.membership.me.incarnation)

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
            mine = self.my_partitions()
            self.planner.on_placement(mine, now)  # Replicator.on_placement_change
            self.trim.enqueue(p for p, n in enumerate(self.disk.part_held_count)
                              if n and p not in mine)  # TrimWorker.on_placement_change

    def my_partitions(self) -> frozenset[int]:
        table = self.state.snapshot.table
        if table is None or not self.state.snapshot.placeable:
            return frozenset()
        return table.partitions_of(self.node_id)

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
            case RootAsk():
                parts = disk.partition_digests()
                return RootGive(*root_of(parts))
            case PartitionDigestsAsk():
                return PartitionDigestsGive(tuple(disk.partition_digests()))
            case StudyDigestsAsk(partition, after, limit):
                studies = disk.studies_page(partition, after, limit)
                return StudyDigestsGive(tuple((s, disk.all_digest[s], len(disk.by_study[s]))
                                              for s in studies), len(studies) >= limit)
            case IdsAsk(studies):
                return IdsGive(tuple(mid for s in studies for mid in disk.by_study.get(s, ())))
            case ManifestsAsk(mids):
                return ManifestsGive(tuple(disk.manifests[m] for m in mids
                                           if m in disk.manifests), len(mids))
            case PartitionManifestsAsk(partition, after, limit):
                return self._partition_manifests(partition, after, limit)
            case HeldRootAsk():
                digest, count = root_of(zip(disk.part_held, disk.part_held_count, strict=True))
                backlog, backlog_bytes = self.planner.backlog(disk)
                return HeldRootGive(digest, count, backlog, backlog_bytes, 0)
            case HeldPartitionsAsk():
                return HeldPartitionsGive(tuple(zip(disk.part_held, disk.part_held_count,
                                                    strict=True)))
            case HeldStudiesAsk(partition, after, limit):
                studies = disk.studies_page(partition, after, limit, held_only=True)
                held = tuple((s, disk.held_count[s], disk.held_digest[s]) for s in studies
                             if disk.held_count.get(s, 0) > 0)
                return HeldStudiesGive(held, studies[-1] if studies else after,
                                       len(studies) >= limit)
            case HeldPush(node_id, studies):
                for partition in disk.apply_holdings(node_id, studies):
                    self._holdings_changed(partition)
                return None
            case StudyHoldingAsk(study_uid):
                placement = self.state.placement(study_uid)
                replica = placement is not None and self.node_id in placement.replicas
                return disk.holding(self.node_id, study_uid, replica)
        raise AssertionError(f"unknown request {request!r}")

    def _partition_manifests(self, partition: int, after: str, limit: int) -> Reply:
        disk = self.disk
        out: list[SimManifest] = []
        last = after
        for study in disk.studies_page(partition, after, limit):
            out += [disk.manifests[mid] for mid in disk.by_study[study]]
            last = study
            if len(out) >= limit:
                return PartitionManifestsGive(tuple(out), last, True)
        return PartitionManifestsGive(tuple(out), last, False)

    # ---- ingest and announce (Replicator.on_stored, AnnounceWorker) -----------------

    def ingest(self, m: SimManifest) -> None:
        """A modality stored an instance here: durable, so acknowledged; tell everyone."""
        self.disk.know(m)
        self.disk.hold(m.mid)
        self.push_held([m.study_uid])
        self.announce.on_stored(m)
        batch = self.announce.next_batch()
        for peer in self.state.snapshot.alive_peers(self.node_id):
            self.net.call(self, peer.node_id, Announce(tuple(batch)))

    def accept(self, manifests: Iterable[Any]) -> None:
        new = [m.mid for m in manifests if self.disk.know(m)]
        self.planner.on_announced(new)

    # ---- fetch (FetchWorker, Replicator.fetch_batch) ---------------------------------

    def fetch_step(self) -> None:
        if self.fetching:
            return
        wanted = self.planner.plan(self.disk, self.net.now)
        if not wanted:
            return
        self.fetching = True
        self._fetch_from(self._sources(wanted[0]), {c.mid for c in wanted})

    def _sources(self, c: Candidate) -> list[str]:
        """Replicator._sources: peers known to hold the study, its origin, anyone."""
        alive = sorted(p.node_id for p in self.state.snapshot.alive_peers(self.node_id))
        holders = [peer for peer in alive
                   if c.study_uid in self.disk.peer_held.get(peer, {}).get(c.partition, {})]
        self.rng.shuffle(holders)
        return source_order(c.origin, holders, alive)

    def _fetch_from(self, sources: list[str], need: set[bytes]) -> None:
        if not sources or not need:
            self.fetching = False
            return
        source, rest = sources[0], sources[1:]

        def got(reply: Reply) -> None:
            if isinstance(reply, FetchGive):
                held = [mid for mid in reply.mids if mid in need]
                for mid in held:
                    need.discard(mid)
                    self.disk.hold(mid)  # every chunk verified on arrival
                    self.net.stats["fetched"] += 1
                self.push_held(self.disk.manifests[mid].study_uid for mid in held)
            self._fetch_from(rest, need)

        self.net.call(self, source, FetchAsk(tuple(sorted(need))), got,
                      lambda: self._fetch_from(rest, need))

    # ---- anti-entropy (AntiEntropyWorker.sync_with) ----------------------------------

    def sync_step(self) -> None:
        peers = self.state.snapshot.alive_peers(self.node_id)
        if self.syncing or not peers:
            return
        self.syncing = True
        self.sync_rounds += 1
        peer = self.rng.choice(peers).node_id
        machine: SyncRound[SimManifest] = SyncRound(self.disk, peer,
                                                     first_partition=self.sync_rounds * 7919)
        self._sync_ask(machine, machine.start())

    def _sync_ask(self, machine: SyncRound[SimManifest], request: ProtocolRequest | None
                  ) -> None:
        if request is None:
            self.syncing = False
            return

        def answered(reply: Reply) -> None:
            manifests, nxt = machine.on_reply(reply)
            if manifests:
                self.accept(manifests)
                self.net.stats["synced"] += len(manifests)
            self._sync_ask(machine, nxt)

        self.net.call(self, machine.peer, request, answered, lambda: self._sync_ask(machine,
                                                                                    None))

    # ---- holdings (HoldingsWorker) ---------------------------------------------------

    def holdings_step(self) -> None:
        for peer in self.state.snapshot.alive_peers(self.node_id):
            if peer.node_id in self.holdings_busy:
                continue
            self.holdings_busy.add(peer.node_id)
            machine = HoldingsRound(_PeerCache(self.disk), peer.node_id)
            self._holdings_ask(machine, machine.start())

    def _holdings_ask(self, machine: HoldingsRound, request: ProtocolRequest | None) -> None:
        if request is None:
            self.holdings_busy.discard(machine.peer)
            return

        def answered(reply: Reply) -> None:
            replace, nxt = machine.on_reply(reply)
            if replace is not None:
                self.disk.replace_holdings(replace.peer, replace.partition, replace.studies)
                self._holdings_changed(replace.partition)
            self._holdings_ask(machine, nxt)

        self.net.call(self, machine.peer, request, answered,
                      lambda: self._holdings_ask(machine, None))

    def _holdings_changed(self, p: int) -> None:
        """TrimWorker.on_holdings_changed."""
        if p not in self.my_partitions() and self.disk.part_held_count[p]:
            self.trim.enqueue([p])

    def push_held(self, studies: Iterable[str]) -> None:
        """HeldDeltaWorker: our holding of these studies changed; tell every alive peer."""
        disk = self.disk
        deltas = tuple((s, disk.manifests[disk.by_study[s][0]].partition,
                        disk.held_count.get(s, 0), disk.held_digest.get(s, EMPTY_DIGEST))
                       for s in sorted(set(studies)))
        if deltas:
            for peer in self.state.snapshot.alive_peers(self.node_id):
                self.net.call(self, peer.node_id, HeldPush(self.node_id, deltas))

    # ---- trim (TrimWorker) -----------------------------------------------------------

    def trim_step(self) -> None:
        if self.state.snapshot.table is None:
            return
        partition = self.trim.next(self.net.now)
        if partition is None:
            return
        after = self.trim.cursor.pop(partition, "")
        studies = self.disk.studies_page(partition, after, STUDIES_PER_TRIM_STEP, held_only=True)
        if len(studies) >= STUDIES_PER_TRIM_STEP:
            self.trim.cursor[partition] = studies[-1]
            self.trim.enqueue([partition])
        for study in studies:
            if self.disk.held_count.get(study, 0) > 0 and study not in self.trimming:
                self._maybe_trim(partition, study)

    def _maybe_trim(self, partition: int, study: str) -> None:
        disk = self.disk
        # What the answers will cover. Every version is current here, so the study's
        # digest of all manifests is also its current digest.
        mids = disk.by_study[study]
        case = TrimCase(study, len(mids), disk.all_digest[study], disk.all_digest[study], mids,
                        any(disk.manifests[mid].origin == self.node_id for mid in mids))
        placement = self.state.placement(study)
        if placement is None:
            return
        if case.origin_here or self.node_id in placement.replicas:
            return  # nothing to decide: we keep it
        snap = self.state.snapshot
        if not eligible(self.node_id, case, placement.replicas,
                        [p.node_id for p in snap.alive_peers(self.node_id)]):
            self.trim.retry_later(partition, self.net.now)
            return
        self.trimming.add(study)
        machine = TrimRound(self.node_id, case, placement.replicas, snap.positions(),
                            self.settings.copies, self.settings.min_distance_miles)
        self._trim_ask(partition, machine, machine.start())

    def _trim_ask(self, partition: int, machine: TrimRound,
                  step: tuple[str, StudyHoldingAsk] | bool) -> None:
        study = machine.case.study_uid
        if isinstance(step, bool):
            self.trimming.discard(study)
            if not step:
                self.trim.retry_later(partition, self.net.now)
                return
            self._drop(machine)
            return
        node_id, ask = step

        def failed() -> None:
            self.trimming.discard(study)
            self.trim.retry_later(partition, self.net.now)

        self.net.call(self, node_id, ask,
                      lambda reply: self._trim_ask(partition, machine, machine.on_reply(reply)),
                      failed)

    def _drop(self, machine: TrimRound) -> None:
        # Store.unhold_unchanged: only what the answers covered, and only if nothing
        # reached the study meanwhile (an instance stored here may be its only copy).
        case = machine.case
        if self.disk.all_digest[case.study_uid] != case.all_digest:
            return
        mids = [mid for mid in case.mids if mid in self.disk.held]
        self.net.trimming(self, case.study_uid, mids)
        for mid in mids:
            self.disk.unhold(mid)
        self.push_held([case.study_uid])
        self.net.stats["trims"] += 1

