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
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from pacsmesh.cluster import fetch
from pacsmesh.cluster.announce import AnnounceQueue
from pacsmesh.cluster.antientropy import root_of
from pacsmesh.cluster.fetch import FETCH_SETTLE_ROUNDS, Candidate, FetchPlanner
from pacsmesh.cluster.holdings_cache import PeerHoldings
from pacsmesh.cluster.membership import ADDRESS_LENGTH_MAX
from pacsmesh.cluster.messages import HeldRootGive, PartDigest, StudyHeld
from pacsmesh.cluster.peers import CHUNK_BATCH_BYTES_MAX, RPC_TIMEOUT_S, Peers
from pacsmesh.cluster.safety import Holding, Position
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.trim import Challenge
from pacsmesh.node import manifest as mf
from pacsmesh.node.catalog import partition_of
from pacsmesh.node.chunking import CHUNK_PLAIN_MAX
from pacsmesh.node.chunkstore import decompress
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing, PacsmeshError
from pacsmesh.node.hashing import content_hash, possession_proof
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.packs import FLAG_ZSTD
from pacsmesh.node.store import Store
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
        self.fetched_manifests = 0
        self.fetched_bytes = 0
        self.trimmed_studies = 0
        # who we are to the peers answering our challenges: our certificate's id, or
        # nobody on plaintext (set by the composition root)
        self.proof_identity = ""
        # peer -> (failures, last study, unix time): claims it could not prove; replaced
        self.failed_proofs: dict[str, tuple[int, str, float]] = {}
        self.future_refused = 0
        # source -> refusals; replaced, never mutated (API threads read it)
        self.future_refusals: dict[str, FutureRefusals] = {}
        self._future_lock = threading.Lock()

    # ---- hooks ----------------------------------------------------------------------

    def on_stored(self, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest) -> None:
        """An instance became durable here (event loop): tell the peers at once."""
        self.announce.on_stored(raw)
        self.held_changed({m.study_instance_uid})
        self.wakeup.set()

    def held_changed(self, studies: set[str]) -> None:
        """Our holding of these studies changed (any thread): push it to peers soon."""
        with self._held_lock:
            self._held_changed |= studies

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
                                 last_scrub_started_ms=self.last_scrub_started_ms())

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
        snap = self.state.snapshot
        alive: dict[str, str] = {p.node_id: p.address for p in snap.alive_peers(self.node_id)}
        partition = partition_of(m.study_instance_uid, self.store.catalog.partitions)
        holders = [h.node_id for h in self.holdings.for_study(m.study_instance_uid, partition,
                                                                sorted(alive))
                   if h.held_instances > 0]
        random.shuffle(holders)  # spread the load over the holders
        return [alive[n] for n in fetch.source_order(m.origin_node, holders, sorted(alive))]

    # ---- fetching chunks -------------------------------------------------------------------

    def fetch_batch(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]]) -> int:
        """Pull the chunks of several manifests and commit them as held (worker thread).
        Returns how many manifests are now held."""
        started = time.monotonic()
        sizes: dict[bytes, int] = {}
        for _, _, m in wanted:
            for c in m.chunks:
                sizes[c.hash] = c.size
        need = set(self.store.chunks.missing(list(sizes)))
        tried: set[str] = set()
        for _, _, m in wanted:
            for address in self._sources(m):
                if not need:
                    break
                if address in tried:
                    continue
                tried.add(address)
                need -= self._fetch_from(address, need, sizes)
        fetched_at = time.monotonic()
        held = 0
        futures = []
        for mid, raw, m in wanted:
            if not any(c.hash in need for c in m.chunks):
                futures.append(self.store.submit(mid, raw, m, held=True))
        for fut in futures:
            try:
                fut.result()
                held += 1
            except PacsmeshError as exc:
                LOGGER.error("could not commit a replica: %s", exc)
        self.fetched_manifests += held
        self.held_changed({m.study_instance_uid for _, _, m in wanted})
        LOGGER.debug("replicated %d of %d instances (%d chunks fetched) in %.2f s + commit "
                     "%.2f s", held, len(wanted), len(sizes) - len(need),
                     fetched_at - started, time.monotonic() - fetched_at)
        if need:
            LOGGER.info("%d chunks of %d manifests not found on any reachable peer yet",
                        len(need), len(wanted) - held)
        return held

    def _fetch_from(self, address: str, need: set[bytes], sizes: dict[bytes, int]) -> set[bytes]:
        got: set[bytes] = set()
        keys = sorted(need)
        batches: list[list[bytes]] = [[]]
        batch_bytes = 0
        for key in keys:
            if batch_bytes + sizes[key] > CHUNK_BATCH_BYTES_MAX and batches[-1]:
                batches.append([])
                batch_bytes = 0
            batches[-1].append(key)
            batch_bytes += sizes[key]
        stub = self.peers.blocking_stub(address)
        for batch in batches:
            try:
                for chunk in stub.FetchChunks(peer_pb2.FetchChunksRequest(hashes=batch),
                                              timeout=RPC_TIMEOUT_S * 6):
                    if chunk.missing or chunk.hash not in need:
                        continue
                    if self._store_chunk(chunk, sizes[chunk.hash], address):
                        got.add(chunk.hash)
            except grpc.RpcError as exc:
                LOGGER.info("fetching chunks from %s failed: %s", address, exc.code().name)
                break
        return got

    def _store_chunk(self, chunk: peer_pb2.ChunkData, size: int, source: str) -> bool:
        """Verify a chunk from a peer before it touches the store."""
        if chunk.plain_len != size or size > CHUNK_PLAIN_MAX:
            LOGGER.warning("chunk from %s has the wrong length", source)
            return False
        try:
            plain = (decompress(chunk.data, size) if chunk.flags & FLAG_ZSTD else chunk.data)
        except ChunkCorrupt:
            plain = b""
        if len(plain) != size or content_hash(plain) != chunk.hash:
            LOGGER.warning("chunk %s from %s failed verification; not stored",
                           chunk.hash.hex()[:16], source)
            return False
        self.fetched_bytes += self.store.chunks.put(chunk.hash, size, chunk.data,
                                                    chunk.flags & FLAG_ZSTD)
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
                    plain = decompress(chunk.data, size) if chunk.flags & FLAG_ZSTD else (
                        chunk.data)
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
                     "not counted for trims", peer, study_uid)

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
