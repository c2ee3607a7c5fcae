"""Moving manifests and chunks between nodes: the IO the protocol machines ask for.

The decisions live in sans-IO machines (cluster/announce.py, fetch.py,
antientropy.py, holdings.py, trim.py) that the simulation drives too; the
workers in cluster/workers.py drive them over gRPC and use this module to
receive manifests and to pull, verify and commit chunks.

Every manifest reaches every node (they are small); chunks go to the replica
set. Receivers verify everything: a manifest's id is recomputed from its bytes,
every chunk is decompressed and hashed before it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from pacsmesh.cluster import fetch
from pacsmesh.cluster.announce import AnnounceQueue
from pacsmesh.cluster.antientropy import root_of
from pacsmesh.cluster.bandwidth import Limits, Shaper
from pacsmesh.cluster.fetch import FETCH_SETTLE_ROUNDS, Candidate, FetchPlanner
from pacsmesh.cluster.holdings_cache import PeerHoldings
from pacsmesh.cluster.membership import ADDRESS_LENGTH_MAX
from pacsmesh.cluster.messages import HeldRootGive, PartDigest, StudyHeld
from pacsmesh.cluster.peers import CHUNK_BATCH_BYTES_MAX, RPC_TIMEOUT_S, Peers
from pacsmesh.cluster.relay import RELAY_WAIT_MAX_S, Arrivals, LinkCounter, LinkStats
from pacsmesh.cluster.safety import Holding, Position
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.trim import Challenge
from pacsmesh.node import codec
from pacsmesh.node import manifest as mf
from pacsmesh.node.catalog import partition_of
from pacsmesh.node.chunking import CHUNK_PLAIN_MAX
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing, PacsmeshError
from pacsmesh.node.hashing import content_hash, possession_proof
from pacsmesh.node.hlc import HybridClock, to_seconds
from pacsmesh.node.logsetup import Tally
from pacsmesh.node.store import Store
from pacsmesh.node.telemetry import Telemetry
from pacsmesh.proto import node_pb2, peer_pb2

LOGGER = logging.getLogger(__name__)
GET_MANIFESTS_MAX = 1000  # per GetManifests request
REPLY_BYTES_MAX = 8 << 20  # manifests per reply stop here: half the message cap
CHALLENGE_CHUNKS = 2  # chunks a replica must prove it holds before we trim on its word
CHALLENGE_NONCE_BYTES = 16
# A peer stamping versions too far ahead is told to the operator once a minute, not
# once per manifest; sources are whatever peers call themselves, so keep a few.
FUTURE_LOG_REPEAT_S = 60.0
FUTURE_SOURCES_TRACKED_MAX = 64
FETCH_TIMEOUT_S = 120.0  # one FetchChunks stream (a sender ends it early when limited)
BATCH_THREADS = 6  # fetch batches in flight: one commits while the next is on the wire
FETCH_STREAMS_MAX = 16  # relay streams (batches in flight x other feeders)
FRESH_S_DEFAULT = 3600.0  # manifests younger than this are fresh ingest
DEFERRED = "deferred"  # a ChunkData.reason prefix: the sender's limits, try later
WIRE_ZSTD_LEVEL_DEFAULT = 0  # as stored: see [transfer] wire_zstd_level
SLOW_LINK_BYTES_PER_S = 40e6  # below this a link is worth compressing harder for
WAITING_MEMORY_S = 60.0  # a sender's deferral explains our backlog this long
UNFETCHED_TRACKED_MAX = 100_000
# When our own share is in, a feeder's stream gets this long (at least the minimum, else
# that fraction of the time our share took) before we take the rest of its share from
# the sources: equal links finish together, a slower feeder is overtaken.
STEAL_GRACE_MIN_S = 2.0
STEAL_GRACE_FRACTION = 1.0
STEAL_BATCH_BYTES = 4 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class FutureRefusals:
    """Manifests from one source refused for a stamp too far ahead of our clock."""

    count: int
    ahead_s: float  # of the latest one
    last_at: float  # wall time of the latest refusal
    logged_at: float  # wall time of the latest log line


class Replicator:
    """This node's side of replication: its catalog as the machines read it, the
    cache of what peers hold, and the chunk transfers."""

    def __init__(self, store: Store, state: ClusterState, peers: Peers, node_id: str,
                 address: str, clock: HybridClock, pool: ThreadPoolExecutor) -> None:
        self.store, self.state, self.peers, self.node_id = store, state, peers, node_id
        self.address, self.clock, self.pool = address, clock, pool
        self.announce: AnnounceQueue[bytes] = AnnounceQueue()
        # placement must hold for a few gossip rounds before we fetch for it
        self.planner = FetchPlanner(settle_s=FETCH_SETTLE_ROUNDS * state.gossip_interval_s)
        self.holdings = PeerHoldings(store.env, store.catalog.partitions)
        self.wakeup = asyncio.Event()
        self.scrub_started_ms: Callable[[], int] | None = None  # last complete pass
        # peer -> its last held-root answer; replaced, never mutated (API threads read it)
        self.reports: dict[str, HeldRootGive] = {}
        self.on_holdings_changed: list[Callable[[str, list[int], set[str]], None]] = []
        self._held_lock = threading.Lock()
        self._held_changed: set[str] = set()
        self._held_wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self.fetched_manifests = 0
        self.fetched_bytes = 0
        self.trimmed_studies = 0
        # who we are to the peers answering our challenges: our certificate's id, or
        # nobody on plaintext (set by the composition root)
        self.proof_identity = ""
        # peer -> (failures, last study, unix time): claims it could not prove; replaced
        self.failed_proofs: dict[str, tuple[int, str, float]] = {}
        self.future_refused = 0
        self.deleted_refused = 0  # manifests of studies deleted here, offered again
        # source -> refusals; replaced, never mutated (API threads read it)
        self.future_refusals: dict[str, FutureRefusals] = {}
        self._future_lock = threading.Lock()
        self.arrivals = Arrivals()
        self.links = LinkStats()
        # fetch batches and their relay streams run here, not in the shared IO pool
        # (which serves our peers and clients): they wait on the network
        self.batch_pool = ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="fetch")
        self.streams = ThreadPoolExecutor(FETCH_STREAMS_MAX, thread_name_prefix="relay")
        self.fresh_s = FRESH_S_DEFAULT
        self.wire_zstd_level = WIRE_ZSTD_LEVEL_DEFAULT
        self.shaper = Shaper(Limits(), node_id)  # what we send; set from [transfer]
        # peer -> (why it deferred our request, when): shown in status and put --wait-safe
        self.deferred_by: dict[str, tuple[str, float]] = {}
        self.inflight: set[bytes] = set()  # manifests a fetch batch is working on
        self.stolen_chunks = 0  # relayed chunks we took from the sources after all
        self._calls_lock = threading.Lock()
        # manifest -> first received ms, for the age of our backlog: being fetched now,
        # and tried but not fetched yet (bounded; the pass finds the rest again)
        self.inflight_since: dict[bytes, int] = {}
        self.unfetched: dict[bytes, int] = {}
        self.plain_in = LinkCounter()  # plain bytes of chunks received: the drain rate
        self.telemetry = Telemetry()  # copies received; the daemon's, once composed
        # copies made here of studies older than the last placement change (repair or
        # rebalance), with the bytes fetched meanwhile by source; said by the fetch worker
        self.moved_here = Tally()

    async def close(self) -> None:
        self.batch_pool.shutdown(wait=False, cancel_futures=True)
        self.streams.shutdown(wait=False, cancel_futures=True)

    # ---- hooks ----------------------------------------------------------------------

    def on_stored(self, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest) -> None:
        """An instance became durable here (event loop): tell the peers at once."""
        self.announce.on_stored(raw)
        self.held_changed({m.study_instance_uid})
        self.wakeup.set()

    def held_changed(self, studies: set[str]) -> None:
        """Our holding of these studies changed (any thread): push it to peers now (a
        study is safe only once its holders' peers know)."""
        with self._held_lock:
            self._held_changed |= studies
            wake = self._held_wake
        if wake is not None:
            wake[0].call_soon_threadsafe(wake[1].set)

    async def held_news(self, timeout_s: float) -> None:
        """Return when holdings changed since the last call, or after `timeout_s`."""
        with self._held_lock:
            if self._held_wake is None:
                self._held_wake = (asyncio.get_running_loop(), asyncio.Event())
            event = self._held_wake[1]
            if self._held_changed:
                return
            event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=timeout_s)

    def take_held_delta(self, limit: int) -> list[peer_pb2.StudyHolding]:
        """Up to `limit` changed studies, as we hold them now (worker thread)."""
        with self._held_lock:
            studies = [self._held_changed.pop()
                       for _ in range(min(limit, len(self._held_changed)))]
        out = []
        for study in studies:
            rec = self.store.catalog.study_record(study)
            if rec is not None:
                out.append(peer_pb2.StudyHolding(study_uid=study,
                                                 held_instances=rec.held_instances,
                                                 held_digest=rec.held_digest))
        return out

    def on_placement_change(self) -> None:
        self.planner.on_placement(self.my_partitions(), time.monotonic())
        self.wakeup.set()

    def my_partitions(self) -> frozenset[int]:
        table = self.state.snapshot.table
        if table is None or not self.state.snapshot.placeable:
            return frozenset()
        return table.partitions_of(self.node_id)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- this node's catalog, as the machines read it (worker threads) ----------------

    def need_totals(self) -> Mapping[int, tuple[int, int]]:
        return self.store.catalog.need_totals()

    def need_page(self, partition: int, after: bytes, limit: int) -> list[bytes]:
        return self.store.catalog.need_page(partition, after, limit)

    def candidate(self, mid: bytes) -> Candidate | None:
        if mid in self.inflight:  # a batch in flight is fetching it already
            return None
        got = self.store.catalog.get(mid)
        if got is None or self.store.catalog.is_held(mid):
            return None
        m = got[1]
        return Candidate(mid, m.study_instance_uid,
                         partition_of(m.study_instance_uid, self.store.catalog.partitions),
                         m.origin_node)

    def partition_digests(self) -> Sequence[PartDigest]:
        return self.store.catalog.partition_digests()

    def study_digests(self, studies: Sequence[str]) -> Mapping[str, tuple[bytes, int]]:
        out = {}
        for study in studies:
            rec = self.store.catalog.study_record(study)
            if rec is not None:
                out[study] = (rec.all_digest, rec.manifests)
        return out

    def unknown(self, ids: Sequence[bytes]) -> list[bytes]:
        return self.store.catalog.unknown(list(ids))

    # ---- answering peers (worker threads) -----------------------------------------------

    def root(self) -> tuple[bytes, int]:
        return root_of(self.store.catalog.partition_digests())

    def held_root(self) -> peer_pb2.HeldRoot:
        digest, count = root_of(self.store.catalog.held_partition_digests())
        backlog, backlog_bytes = self.planner.backlog(self)
        return peer_pb2.HeldRoot(node_id=self.node_id, digest=digest, count=count,
                                 backlog_instances=backlog, backlog_bytes=backlog_bytes,
                                 last_scrub_started_ms=self.last_scrub_started_ms(),
                                 backlog_oldest_ms=self.backlog_oldest_ms() if backlog else 0,
                                 fetch_bytes_per_s=self.plain_in.rate(time.monotonic()),
                                 waiting=self.waiting() if backlog else "")

    def backlog_oldest_ms(self) -> int:
        """First received ms of the oldest manifest we tried and could not fetch yet, or
        are fetching now (0: none known; a pass reaches the rest)."""
        times = list(self.unfetched.values()) + list(self.inflight_since.values())
        return min(times, default=0)

    def waiting(self) -> str:
        """Why our backlog is not moving, as senders told us in the last minute."""
        now = time.time()
        return "; ".join(f"{why} ({peer})" for peer, (why, at) in sorted(self.deferred_by.items())
                         if now - at < WAITING_MEMORY_S)

    def held_studies(self, partition: int, after: str, limit: int
                     ) -> tuple[list[StudyHeld], str, bool]:
        recs = self.store.catalog.partition_study_page(partition, after, limit, held_only=True)
        held = [(r.study_uid, r.held_instances, r.held_digest) for r in recs
                if r.held_instances > 0]
        return held, (recs[-1].study_uid if recs else after), len(recs) >= limit

    def partition_manifests(self, partition: int, after: str, limit: int
                            ) -> tuple[list[bytes], str, bool]:
        """Raw manifests of whole studies of a partition after `after`, about `limit`."""
        out: list[bytes] = []
        last = after
        size = 0
        while len(out) < limit and size < REPLY_BYTES_MAX:
            recs = self.store.catalog.partition_study_page(partition, last, 64)
            if not recs:
                return out, last, False
            for rec in recs:
                for mid in self.store.catalog.study_manifest_ids(rec.study_uid):
                    got = self.store.catalog.get(mid)
                    if got is not None:
                        out.append(got[0])
                        size += len(got[0])
                last = rec.study_uid
                if len(out) >= limit or size >= REPLY_BYTES_MAX:
                    break
        return out, last, True

    # ---- receiving manifests ------------------------------------------------------------

    def accept_manifests(self, raws: Sequence[bytes], source: str) -> int:
        """Manifests from a peer (worker thread): verify, record as known-not-held, and
        queue the ones this node should hold. Returns how many were new."""
        source = source[:ADDRESS_LENGTH_MAX]  # the sender's words, logged per manifest
        futures = []
        for raw in raws:
            mid = content_hash(raw)
            if self.store.catalog.has(mid):
                continue
            try:
                m = mf.decode(raw)
            except Exception as exc:  # a malformed message harms nothing stored
                LOGGER.warning("manifest from %s does not decode: %s", source, exc)
                continue
            if why := mf.problem(m):
                LOGGER.warning("refusing a manifest from %s: %s", source, why)
                continue
            if self.store.catalog.refuses(m):
                # deleted here when its retention expired: a node that was away offers
                # it back until it deletes it too; never stored again
                self.deleted_refused += 1
                LOGGER.debug("refusing a manifest of deleted study %s from %s",
                             m.study_instance_uid, source, extra={"study": m.study_instance_uid})
                continue
            if not self.clock.observe(m.received_hlc):
                # Not stored: as the newest version of its instance, a stamp far in the
                # future would outrank every genuine version for good. A peer whose
                # clock merely runs fast is delayed, not lost: anti-entropy offers the
                # manifest again every round, and once our clock is within
                # max_clock_ahead_s of its stamp it is taken like any other.
                self._refuse_future(m, source)
                continue
            futures.append((mid, self.store.submit(mid, raw, m, held=False)))
        new: list[bytes] = []
        for mid, fut in futures:
            try:
                if fut.result():
                    new.append(mid)
            except PacsmeshError as exc:
                LOGGER.error("cannot record manifests from %s: %s", source, exc)
        self.planner.on_announced(new)
        return len(new)

    def _refuse_future(self, m: node_pb2.Manifest, source: str) -> None:
        ahead_s = self.clock.ahead_ms(m.received_hlc) / 1000
        now = time.time()
        with self._future_lock:
            self.future_refused += 1
            refusals = dict(self.future_refusals)
            old = refusals.pop(source, None)
            log = old is None or now - old.logged_at >= FUTURE_LOG_REPEAT_S
            count = 1 if old is None else old.count + 1
            refusals[source] = FutureRefusals(count, ahead_s, now,
                                              now if log or old is None else old.logged_at)
            while len(refusals) > FUTURE_SOURCES_TRACKED_MAX:
                del refusals[next(iter(refusals))]  # the least recently refused
            self.future_refusals = refusals
        if log:
            LOGGER.warning(
                "refusing manifests from %s stamped %.0f s ahead of our clock (more "
                "than max_clock_ahead_s %.0f s); %d so far: fix that peer's clock, or it is "
                "forging versions", source, ahead_s, self.clock.max_ahead_ms / 1000, count)

    def _sources(self, m: node_pb2.Manifest) -> list[str]:
        """Addresses to ask, best first: peers holding the study, its origin, anyone."""
        return [a for _, a in self._source_ids(m)]

    def _source_ids(self, m: node_pb2.Manifest) -> list[tuple[str, str]]:
        """(node id, address) to ask, best first: peers holding the study (fastest
        link first, ties shuffled to spread the load), its origin, then anyone."""
        snap = self.state.snapshot
        failed = self.failed_proofs
        alive: dict[str, str] = {p.node_id: p.address for p in snap.alive_peers(self.node_id)
                                 if p.node_id not in failed}
        partition = partition_of(m.study_instance_uid, self.store.catalog.partitions)
        holders = [h.node_id for h in self.holdings.for_study(m.study_instance_uid, partition,
                                                                sorted(alive))
                   if h.held_instances > 0]
        random.shuffle(holders)
        rates = self.links.snapshot()
        holders.sort(key=lambda n: -rates.get(n, (0, 0.0, 0, 0.0))[3])  # stable: ties stay
        return [(n, alive[n]) for n in fetch.source_order(m.origin_node, holders, sorted(alive))]

    def _feeders(self, m: node_pb2.Manifest) -> list[str]:
        """The alive replicas of the study other than its origin: they all need the new
        chunks from the origin and can feed each other (cluster/fetch.py relay_for)."""
        placement = self.state.placement(m.study_instance_uid)
        if placement is None:
            return []
        alive: set[str] = {p.node_id for p in self.state.snapshot.alive_peers(self.node_id)}
        alive.add(self.node_id)
        return [n for n in placement.replicas
                if n in alive and n != m.origin_node and n not in self.failed_proofs]

    def purpose_of(self, m: node_pb2.Manifest) -> int:
        """Fresh ingest, repair of a study short of copies, or rebalance (the sender's
        bandwidth limits and bulk window act on this)."""
        age_s = time.time() - to_seconds(m.received_hlc)
        if age_s < self.fresh_s:
            return peer_pb2.FRESH
        if self.store.catalog.study_unsafe(m.study_instance_uid):
            return peer_pb2.REPAIR
        return peer_pb2.REBALANCE

    def wire_level(self, peer: str) -> int:
        """The zstd level to ask `peer` for: higher than stored only on a link that has
        been slow lately (a busy WAN link), never on a fast one (CPU would be the wall)."""
        if not self.wire_zstd_level:
            return 0
        rate = self.links.snapshot().get(peer, (0, 0.0, 0, 0.0))[3]
        return self.wire_zstd_level if 0 < rate < SLOW_LINK_BYTES_PER_S else 0

    # ---- fetching chunks -------------------------------------------------------------------

    def fetch_batch(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]]) -> int:
        """Pull the chunks of several manifests and commit them as held (worker thread).
        Returns how many manifests are now held."""
        started = time.monotonic()
        for mid, _, m in wanted:
            self.inflight_since[mid] = int(to_seconds(m.received_hlc) * 1000)
        try:
            return self._fetch_and_commit(wanted, started)
        finally:
            for mid, _, _ in wanted:
                self.inflight_since.pop(mid, None)

    def _fetch_and_commit(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]],
                          started: float) -> int:
        by_purpose: dict[int, list[tuple[bytes, bytes, node_pb2.Manifest]]] = {}
        for item in wanted:
            by_purpose.setdefault(self.purpose_of(item[2]), []).append(item)
        missing: set[bytes] = set()
        for purpose in sorted(by_purpose):
            missing |= self._fetch_chunks(by_purpose[purpose], purpose)
        fetched_at = time.monotonic()
        held = held_bytes = 0
        futures = []
        for mid, raw, m in wanted:
            if not any(c.hash in missing for c in m.chunks):
                futures.append((self.store.submit(mid, raw, m, held=True), m))
                self.unfetched.pop(mid, None)
            elif len(self.unfetched) < UNFETCHED_TRACKED_MAX:
                self.unfetched[mid] = int(to_seconds(m.received_hlc) * 1000)
        changed_at = self.state.placement_changed.at_s
        for fut, m in futures:
            try:
                fut.result()
                held += 1
                held_bytes += m.size
            except PacsmeshError as exc:
                LOGGER.error("could not commit a replica: %s", exc,
                             extra={"instance": m.sop_instance_uid})
                continue
            if to_seconds(m.received_hlc) < changed_at:  # here because placement changed
                self.moved_here.add(m.study_instance_uid)
        self.fetched_manifests += held
        self.telemetry.replicated(held, held_bytes)
        self.held_changed({m.study_instance_uid for _, _, m in wanted})
        LOGGER.debug("replicated %d of %d instances in %.2f s + commit %.2f s", held,
                     len(wanted), fetched_at - started, time.monotonic() - fetched_at)
        if missing:
            LOGGER.info("%d chunks of %d manifests not found on any reachable peer yet",
                        len(missing), len(wanted) - held)
        return held

    def _fetch_chunks(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]],
                      purpose: int) -> set[bytes]:
        """Fetch what these manifests lack; returns the chunks still missing.

        Chunks this node draws from the source itself are fetched while, at the same
        time, the other feeders are asked for their shares (they are drawing them from
        the source now and pass them on as they arrive). A feeder on a slower link must
        not hold us back: once our own share is in and a grace has passed, we take the
        rest of its share from the sources too, from the tail (its stream serves the
        head), until the two meet. Whatever is still missing is fetched after all."""
        sizes: dict[bytes, int] = {}  # in manifest order: feeders fetch in the same order
        relay_of: dict[bytes, str | None] = {}
        for _, _, m in wanted:
            feeders = self._feeders(m)
            for c in m.chunks:
                if c.hash not in sizes:
                    sizes[c.hash] = c.size
                    relay_of[c.hash] = fetch.relay_for(self.node_id, feeders, c.hash)
        need = set(self.store.chunks.missing(list(sizes)))
        direct = [k for k in sizes if k in need and relay_of[k] is None]
        relayed: dict[str, list[bytes]] = {}
        for k in sizes:
            feeder = relay_of[k]
            if k in need and feeder is not None:
                relayed.setdefault(feeder, []).append(k)
        addresses: dict[str, str] = {m.node_id: m.address for m in self.state.snapshot.members}
        self.arrivals.expect(direct)
        all_in = threading.Event()  # every relayed chunk is here: end the relay streams
        started = time.monotonic()
        try:
            calls: list[Any] = []
            jobs = [self.streams.submit(self._fetch_from, addresses[f], keys, sizes,
                                        purpose, True, all_in, calls)
                    for f, keys in relayed.items() if f in addresses]
            need -= self._fetch_from_sources(wanted, direct, sizes, purpose)
        finally:
            self.arrivals.settle(direct)
        if jobs:
            own_s = time.monotonic() - started
            grace = max(STEAL_GRACE_MIN_S, STEAL_GRACE_FRACTION * own_s)
            futures.wait(jobs, timeout=grace)
            tail = [k for f, keys in relayed.items() for k in keys]
            slow = {addresses[f] for f in relayed if f in addresses}
            need -= self._steal(wanted, tail, sizes, purpose, jobs, slow)
            all_in.set()
            with self._calls_lock:  # a stalled feeder's stream must not hold us
                for call in calls:
                    call.cancel()
        for job in jobs:
            need -= job.result()
        if need:  # a feeder's share it could not give: draw it from the sources
            need -= self._fetch_from_sources(wanted, [k for k in sizes if k in need], sizes,
                                             purpose)
        return need

    def _steal(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]],
               relayed: list[bytes], sizes: dict[bytes, int], purpose: int,
               jobs: list[futures.Future[set[bytes]]], feeders: set[str]) -> set[bytes]:
        """Take relayed chunks still missing from the sources, last first, a small
        batch at a time, until the relay streams are done or everything is here."""
        got: set[bytes] = set()
        left = list(reversed(relayed))
        while left and not all(j.done() for j in jobs):
            left = self.store.chunks.missing(left)
            batch: list[bytes] = []
            size = 0
            while left and size < STEAL_BATCH_BYTES:
                batch.append(left.pop(0))
                size += sizes[batch[-1]]
            if not batch:
                break
            new = self._fetch_from_sources(wanted, batch, sizes, purpose, avoid=feeders)
            if not new:
                break  # the sources do not have them either: leave it to the feeders
            got |= new
            self.stolen_chunks += len(new)
        return got

    def _fetch_from_sources(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]],
                            keys: list[bytes], sizes: dict[bytes, int], purpose: int,
                            avoid: set[str] | None = None) -> set[bytes]:
        left = list(keys)
        got: set[bytes] = set()
        tried: set[str] = set(avoid or ())
        for _, _, m in wanted:
            for _, address in self._source_ids(m):
                if not left:
                    return got
                if address in tried:
                    continue
                tried.add(address)
                new = self._fetch_from(address, left, sizes, purpose)
                got |= new
                left = [k for k in left if k not in new]
        return got

    def _fetch_from(self, address: str, keys: Sequence[bytes] | set[bytes],
                    sizes: dict[bytes, int], purpose: int = peer_pb2.FRESH,
                    relay: bool = False, enough: threading.Event | None = None,
                    calls: list[Any] | None = None, replica: bool = True) -> set[bytes]:
        """Ask one peer for chunks, in batches; returns the ones stored. `relay`: the
        peer is fetching them itself now and sends them as they arrive. `enough`: stop
        early when it is set (what we asked for arrived another way)."""
        got: set[bytes] = set()
        need = set(keys)
        batches: list[list[bytes]] = [[]]
        batch_bytes = 0
        for key in keys:
            if batch_bytes + sizes[key] > CHUNK_BATCH_BYTES_MAX and batches[-1]:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(key)
            batch_bytes += sizes[key]
        stub = self.peers.blocking_stub(address)
        peer = self.state.id_at(address) or address
        wait_ms = int(RELAY_WAIT_MAX_S * 1000) if relay else 0
        level = self.wire_level(peer)
        for batch in batches:
            request = peer_pb2.FetchChunksRequest(
                hashes=batch, wait_ms=wait_ms, requester=self.node_id, zstd_level=level,
                purpose=peer_pb2.TransferPurpose.ValueType(purpose), replica=replica)
            try:
                stream = stub.FetchChunks(request, timeout=FETCH_TIMEOUT_S)
                if calls is not None:
                    with self._calls_lock:
                        if enough is not None and enough.is_set():
                            stream.cancel()
                        calls.append(stream)
                for chunk in stream:
                    if enough is not None and enough.is_set():
                        stream.cancel()
                        break
                    if chunk.missing:
                        if chunk.reason.startswith(DEFERRED):
                            self.deferred_by[peer] = (chunk.reason, time.time())
                        continue
                    if chunk.hash not in need:
                        continue
                    self.links.on_received(peer, len(chunk.data))
                    if self._store_chunk(chunk, sizes[chunk.hash], address):
                        got.add(chunk.hash)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    LOGGER.info("fetching chunks from %s failed: %s", address,
                                exc.code().name)
                break
            if enough is not None and enough.is_set():
                break
        return got

    def _store_chunk(self, chunk: peer_pb2.ChunkData, size: int, source: str) -> bool:
        """Verify a chunk from a peer before it touches the store."""
        if chunk.plain_len != size or size > CHUNK_PLAIN_MAX:
            LOGGER.warning("chunk from %s has the wrong length", source)
            return False
        try:
            plain = codec.decode(chunk.data, chunk.flags, size)
        except ChunkCorrupt:
            plain = b""
        if len(plain) != size or content_hash(plain) != chunk.hash:
            LOGGER.warning("chunk %s from %s failed verification; not stored",
                           chunk.hash.hex()[:16], source)
            return False
        self.fetched_bytes += self.store.chunks.put(chunk.hash, size, chunk.data,
                                                    chunk.flags)
        self.moved_here.add_by(self.state.id_at(source) or source, size)
        self.plain_in.add(size, time.monotonic())
        self.arrivals.arrived()  # a relay stream may be waiting for it
        return True

    def repair_chunk(self, key: bytes, users: list[bytes]) -> bool:
        """The scrubber found `key` damaged and dropped it (worker thread): fetch a good
        copy from a peer, verify it, and hold again the instances that need it."""
        wanted = [(mid, *got) for mid in users if (got := self.store.catalog.get(mid))]
        if not wanted:
            return False
        size = next(c.size for c in wanted[0][2].chunks if c.hash == key)
        for address in self._sources(wanted[0][2]):
            if self._fetch_from(address, {key}, {key: size}):
                break
        else:
            return False
        futures = [self.store.submit(mid, raw, m, held=True) for mid, raw, m in wanted
                   if not self.store.chunks.missing([c.hash for c in m.chunks])]
        for fut in futures:
            fut.result()
        try:
            self.store.chunks.read(key)  # a repair is only a repair if it reads back
        except (ChunkCorrupt, ChunkMissing) as exc:
            LOGGER.error("repaired chunk %s does not read back: %s", key.hex()[:16], exc)
            return False
        return True

    def read_remote(self, key: bytes, m: node_pb2.Manifest) -> bytes:
        """A verified chunk from any peer that has it (restores on a non-holder)."""
        size = next((c.size for c in m.chunks if c.hash == key), 0)
        for address in self._sources(m):
            try:
                for chunk in self.peers.blocking_stub(address).FetchChunks(
                        peer_pb2.FetchChunksRequest(hashes=[key]), timeout=RPC_TIMEOUT_S):
                    if chunk.missing or chunk.plain_len != size:
                        continue
                    plain = codec.decode(chunk.data, chunk.flags, size)
                    if content_hash(plain) == key:
                        return plain
            except (grpc.RpcError, ChunkCorrupt):
                continue
        raise ChunkMissing(f"chunk {key.hex()[:16]} is not held by any reachable node")

    # ---- holdings -------------------------------------------------------------------------

    def last_scrub_started_ms(self) -> int:
        return self.scrub_started_ms() if self.scrub_started_ms is not None else 0

    def positions(self) -> dict[str, Position]:
        """Members as holders count: a node that failed a proof of possession counts as
        holding nothing (as if down) until it is cleared, so status never counts its
        claims as copies."""
        positions = self.state.snapshot.positions()
        for node_id in self.failed_proofs:
            if node_id in positions:
                positions[node_id] = dataclasses.replace(positions[node_id], alive=False)
        return positions

    def note_failed_proof(self, peer: str, study_uid: str) -> None:
        count = self.failed_proofs.get(peer, (0, "", 0.0))[0] + 1
        self.failed_proofs = {**self.failed_proofs, peer: (count, study_uid, time.time())}
        LOGGER.error("node %s claims copies of study %s but could not prove it holds them: "
                     "not counted for trims", peer, study_uid, extra={"study": study_uid})

    def own_holdings(self, study_uids: list[str], nonce: bytes = b"",
                     chunks: Sequence[bytes] = (), asker: str = ""
                     ) -> list[peer_pb2.StudyHolding]:
        """`asker`: the caller's authenticated id ("" on plaintext), bound into proofs."""
        out = []
        records = [r for s in study_uids if (r := self.store.catalog.study_record(s))]
        proofs = [self._prove(nonce, asker, c) for c in chunks] if nonce else []
        for rec in records:
            placement = self.state.placement(rec.study_uid)
            replica = placement is not None and self.node_id in placement.replicas
            out.append(peer_pb2.StudyHolding(study_uid=rec.study_uid,
                                             held_instances=rec.held_instances,
                                             held_digest=rec.held_digest, replica=replica,
                                             proofs=proofs))
        return out

    def _prove(self, nonce: bytes, asker: str, chunk: bytes) -> bytes:
        try:
            return possession_proof(nonce, asker, self.store.chunks.read(chunk))
        except (ChunkMissing, ChunkCorrupt):
            return b""  # not held (or rotten) here: the asker must not count on us

    def challenge(self, study_uid: str, replicas: Sequence[str]) -> dict[str, Challenge] | None:
        """A fresh proof-of-possession challenge per replica over a few chunks of the
        study, with the answers an honest holder gives; None if we cannot read them."""
        chunks = sorted({ref.hash for _, _, m in self.store.catalog.current_manifests(study_uid)
                         for ref in m.chunks})
        if not chunks:
            return None
        picked = random.sample(chunks, min(CHALLENGE_CHUNKS, len(chunks)))
        try:
            plains = [self.store.chunks.read(c) for c in picked]
        except (ChunkMissing, ChunkCorrupt):
            return None  # our own copy is in doubt: no trim on it now
        out = {}
        for r in replicas:
            nonce = os.urandom(CHALLENGE_NONCE_BYTES)
            out[r] = Challenge(nonce, tuple(picked), tuple(
                possession_proof(nonce, self.proof_identity, p) for p in plains))
        return out

    def holdings_for(self, study_uid: str, peers: Iterable[str] | None = None
                     ) -> list[Holding]:
        """Holders of a study: `peers` (default: every member we know) from the cache,
        us fresh."""
        if peers is None:
            snap = self.state.snapshot
            peers = sorted(m.node_id for m in snap.members if m.node_id != self.node_id)
        partition = partition_of(study_uid, self.store.catalog.partitions)
        out = self.holdings.for_study(study_uid, partition, peers)
        own = self.local_holding(study_uid)
        if own is not None:
            out.append(own)
        return out

    def local_holding(self, study_uid: str) -> Holding | None:
        rec = self.store.catalog.study_record(study_uid)
        if rec is None or rec.held_instances == 0:
            return None
        return Holding(self.node_id, rec.held_instances, rec.held_digest)
