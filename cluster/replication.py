"""Moving manifests and chunks between nodes until every study is where placement says.

    announce     fresh ingest: push new manifests to every alive peer at once
    fetch        pull the chunks of manifests this node should hold (fresh first,
                 then a scan of what is known but not held), verify, commit
    antientropy  compare digests with a random peer, pull manifests we lack
    holdings     refresh what each peer holds, for locate/status/trim
    trim         drop copies this node no longer has to hold, make before break

Every manifest reaches every node (they are small); chunks go to the replica
set. Receivers verify everything: a manifest's id is recomputed from its bytes,
every chunk is decompressed and hashed before it is stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from cluster import antientropy, repair
from cluster.peers import CHUNK_BATCH_BYTES_MAX, RPC_TIMEOUT_S, Peers
from cluster.safety import Holding
from cluster.state import ClusterState
from node import manifest as mf
from node.alerts import DISK_REFUSE_REPLICAS_FRACTION
from node.chunking import CHUNK_PLAIN_MAX
from node.chunkstore import decompress
from node.errors import ChunkCorrupt, ChunkMissing, PacsmeshError
from node.hashing import content_hash
from node.hlc import HybridClock
from node.packs import FLAG_ZSTD
from node.store import Store
from node.worker import Worker, WorkerState
from proto import node_pb2, peer_pb2

LOGGER = logging.getLogger(__name__)
ANNOUNCE_BATCH_MAX = 256  # manifests per Announce: ~300 KB
FETCH_BATCH_MANIFESTS_MAX = 64  # manifests whose chunks one fetch round asks for
FRESH_QUEUE_MAX = 100_000  # fresh manifests remembered for priority; the scan finds the rest
SCAN_INTERVAL_S = 5.0  # how often the known-but-not-held list is rescanned
NOT_HELD_SCAN_MAX = 10_000  # ids read per scan: bounds one scan's work
GET_MANIFESTS_MAX = 1000  # per GetManifests request


class Replicator:
    def __init__(self, store: Store, state: ClusterState, peers: Peers, node_id: str,
                 address: str, clock: HybridClock, pool: ThreadPoolExecutor) -> None:
        self.store, self.state, self.peers, self.node_id = store, state, peers, node_id
        self.address, self.clock, self.pool = address, clock, pool
        self.announce_queue: collections.deque[bytes] = collections.deque(maxlen=FRESH_QUEUE_MAX)
        self.fresh: collections.deque[bytes] = collections.deque(maxlen=FRESH_QUEUE_MAX)
        self.rescan = asyncio.Event()
        self.wakeup = asyncio.Event()
        self.scrub_started_ms: Callable[[], int] | None = None  # last complete pass
        self.verified_ms: dict[str, int] = {}  # peer -> start of its last complete scrub
        self.fetched_manifests = 0
        self.fetched_bytes = 0
        self.trimmed_studies = 0

    # ---- hooks ----------------------------------------------------------------------

    def on_stored(self, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest) -> None:
        """An instance became durable here (event loop): tell the peers at once."""
        self.announce_queue.append(raw)
        self.wakeup.set()

    def on_placement_change(self) -> None:
        self.rescan.set()
        self.wakeup.set()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- receiving manifests ------------------------------------------------------------

    def accept_manifests(self, raws: list[bytes], source: str) -> int:
        """Manifests from a peer (worker thread): verify, record as known-not-held, and
        queue the ones this node should hold. Returns how many were new."""
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
            self.clock.observe(m.received_hlc)
            futures.append((mid, self.store.submit(mid, raw, m, held=False)))
        new = 0
        for mid, fut in futures:
            try:
                if fut.result():
                    new += 1
                    self.fresh.append(mid)
            except PacsmeshError as exc:
                LOGGER.error("cannot record manifests from %s: %s", source, exc)
        return new

    # ---- fetching chunks -------------------------------------------------------------------

    def _want(self, mid: bytes) -> tuple[bytes, node_pb2.Manifest] | None:
        got = self.store.catalog.get(mid)
        if got is None or self.store.catalog.is_held(mid):
            return None
        raw, m = got
        placement = self.state.placement(m.study_instance_uid)
        if placement is None or not repair.should_fetch(self.node_id, placement.replicas, False):
            return None
        return raw, m

    def _sources(self, m: node_pb2.Manifest) -> list[str]:
        """Addresses to ask, best first: peers holding the study, its origin, anyone."""
        snap = self.state.snapshot
        alive: dict[str, str] = {p.node_id: p.address for p in snap.alive_peers(self.node_id)}
        holders = [h.node_id for h in self.state.holdings.for_study(m.study_instance_uid)
                   if h.held_instances > 0 and h.node_id in alive]
        random.shuffle(holders)  # spread the load over the holders
        order = [*holders, m.origin_node, *sorted(alive)]
        seen: set[str] = set()
        out = []
        for node_id in order:
            if node_id in alive and node_id not in seen:
                seen.add(node_id)
                out.append(alive[node_id])
        return out

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

    def own_holdings(self, study_uids: list[str]) -> list[peer_pb2.StudyHolding]:
        out = []
        if study_uids:
            records = [r for s in study_uids if (r := self.store.catalog.study_record(s))]
        else:
            records = [r for r in self.store.catalog.study_records() if r.held_instances > 0]
        for rec in records:
            placement = self.state.placement(rec.study_uid)
            replica = placement is not None and self.node_id in placement.replicas
            out.append(peer_pb2.StudyHolding(study_uid=rec.study_uid,
                                             held_instances=rec.held_instances,
                                             held_digest=rec.held_digest, replica=replica))
        return out

    def local_holding(self, study_uid: str) -> Holding | None:
        rec = self.store.catalog.study_record(study_uid)
        if rec is None or rec.held_instances == 0:
            return None
        return Holding(self.node_id, rec.held_instances, rec.held_digest)


class AnnounceWorker(Worker):
    name = "announce"
    idle_s = 0.2

    def __init__(self, r: Replicator) -> None:
        self.r = r

    async def step(self) -> WorkerState:
        if not self.r.announce_queue:
            self.r.wakeup.clear()
            try:
                await asyncio.wait_for(self.r.wakeup.wait(), timeout=1.0)
            except TimeoutError:
                return WorkerState.IDLE
        batch: list[bytes] = []
        while self.r.announce_queue and len(batch) < ANNOUNCE_BATCH_MAX:
            batch.append(self.r.announce_queue.popleft())
        if not batch:
            return WorkerState.IDLE
        msg = peer_pb2.ManifestBatch(manifests=batch, sender=self.r.node_id,
                                     sender_address=self.r.address)
        peers = self.r.state.snapshot.alive_peers(self.r.node_id)
        await asyncio.gather(*(self._send(p.address, msg) for p in peers))
        return WorkerState.BUSY

    async def _send(self, address: str, msg: peer_pb2.ManifestBatch) -> None:
        try:
            await self.r.peers.stub(address).Announce(msg, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # anti-entropy will deliver it later
            LOGGER.info("announce to %s failed: %s", address, exc.code().name)


class FetchWorker(Worker):
    name = "fetch"
    idle_s = 1.0

    def __init__(self, r: Replicator) -> None:
        self.r = r
        self._scan: collections.deque[bytes] = collections.deque()
        self._scanned_at = 0.0
        self._refusing = False

    async def step(self) -> WorkerState:
        r = self.r
        now = time.monotonic()
        if not self._scan and (r.rescan.is_set() or now - self._scanned_at > SCAN_INTERVAL_S):
            r.rescan.clear()
            self._scanned_at = now
            self._scan.extend(await r._run(r.store.catalog.not_held_ids, NOT_HELD_SCAN_MAX))
        full = await r._run(r.store.used_fraction)
        if full >= DISK_REFUSE_REPLICAS_FRACTION:  # local ingest keeps the rest of the disk
            if not self._refusing:
                LOGGER.error("storage %.0f %% used: refusing new replicas", full * 100)
            self._refusing = True
            return WorkerState.THROTTLED
        self._refusing = False
        if not r.fresh and not self._scan:
            r.wakeup.clear()
            with contextlib.suppress(TimeoutError):  # announcements wake us early
                await asyncio.wait_for(r.wakeup.wait(), timeout=self.idle_s)
            return WorkerState.BUSY if r.fresh else WorkerState.IDLE
        wanted = await r._run(self._pick, FETCH_BATCH_MANIFESTS_MAX)
        if not wanted:
            return WorkerState.BUSY if (r.fresh or self._scan) else WorkerState.IDLE
        held = await r._run(r.fetch_batch, wanted)
        if held < len(wanted):
            return WorkerState.THROTTLED  # some chunks are nowhere yet: back off, rescan later
        return WorkerState.BUSY


    def _pick(self, limit: int) -> list[tuple[bytes, bytes, node_pb2.Manifest]]:
        """Up to `limit` manifests to fetch now, fresh ones first (worker thread). Only
        what is examined leaves the queues."""
        r = self.r
        wanted: list[tuple[bytes, bytes, node_pb2.Manifest]] = []
        examined = 0
        while (r.fresh or self._scan) and len(wanted) < limit and examined < limit * 16:
            mid = r.fresh.popleft() if r.fresh else self._scan.popleft()
            examined += 1
            got = r._want(mid)
            if got is not None:
                wanted.append((mid, *got))
        return wanted


class AntiEntropyWorker(Worker):
    name = "antientropy"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s
        self.rounds = 0
        self.last_bytes = 0  # received in the last round, for the benchmark

    async def step(self) -> WorkerState:
        peers = self.r.state.snapshot.alive_peers(self.r.node_id)
        if not peers:
            return WorkerState.IDLE
        peer = random.choice(peers)
        try:
            pulled = await self.sync_with(peer.address)
        except grpc.aio.AioRpcError as exc:
            LOGGER.info("anti-entropy with %s failed: %s", peer.node_id, exc.code().name)
            return WorkerState.IDLE
        self.rounds += 1
        if pulled:
            LOGGER.info("anti-entropy with %s: pulled %d manifests", peer.node_id, pulled)
        return WorkerState.IDLE

    async def sync_with(self, address: str) -> int:
        """One round against one peer; returns how many manifests were new here."""
        r = self.r
        stub = r.peers.stub(address)
        theirs = await stub.GetPartitionDigests(peer_pb2.PartitionDigestsRequest(),
                                                timeout=RPC_TIMEOUT_S)
        received = theirs.ByteSize()
        mine = await r._run(r.store.catalog.partition_digests)
        their_parts = list(zip(theirs.digests, theirs.counts, strict=True))
        pulled = 0
        for partition in antientropy.differing_partitions(mine, their_parts):
            studies = await stub.GetStudyDigests(
                peer_pb2.StudyDigestsRequest(partition=partition), timeout=RPC_TIMEOUT_S)
            received += studies.ByteSize()
            my_studies = await r._run(self._study_digests, partition)
            for study in antientropy.differing_studies(
                    my_studies, ((s.study_uid, s.digest, s.count) for s in studies.studies)):
                ids = await stub.GetManifestIds(peer_pb2.ManifestIdsRequest(study_uid=study),
                                                timeout=RPC_TIMEOUT_S)
                received += ids.ByteSize()
                lacking = await r._run(r.store.catalog.unknown, list(ids.ids))
                for i in range(0, len(lacking), GET_MANIFESTS_MAX):
                    batch = await stub.GetManifests(
                        peer_pb2.GetManifestsRequest(ids=lacking[i : i + GET_MANIFESTS_MAX]),
                        timeout=RPC_TIMEOUT_S)
                    received += batch.ByteSize()
                    pulled += await r._run(r.accept_manifests, list(batch.manifests), address)
                if lacking:
                    LOGGER.info("study %s: %d manifests were missing here (from %s)", study,
                                len(lacking), address)
        self.last_bytes = received
        return pulled

    def _study_digests(self, partition: int) -> dict[str, tuple[bytes, int]]:
        out = {}
        for study in self.r.store.catalog.partition_studies(partition):
            rec = self.r.store.catalog.study_record(study)
            if rec is not None:
                out[study] = (rec.all_digest, rec.manifests)
        return out


class HoldingsWorker(Worker):
    name = "holdings"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s

    async def step(self) -> WorkerState:
        snap = self.r.state.snapshot
        peers = snap.alive_peers(self.r.node_id)
        results = await asyncio.gather(*(self._one(p.node_id, p.address) for p in peers))
        # A node that is not alive keeps its last report: it does not count while it is
        # away (safety.assess looks at liveness), and when it rejoins its copies count
        # again at once instead of after its first answer, while the others trim the
        # extras they made meanwhile (they ask it directly before they do).
        cache = self.r.state.holdings
        for node_id, holdings, scrubbed_ms in results:
            if holdings is not None:
                cache.by_node[node_id] = holdings
                cache.fetched_at[node_id] = time.monotonic()
                self.r.verified_ms[node_id] = scrubbed_ms
        return WorkerState.IDLE

    async def _one(self, node_id: str, address: str
                   ) -> tuple[str, dict[str, Holding] | None, int]:
        try:
            reply = await self.r.peers.stub(address).GetHoldings(peer_pb2.HoldingsRequest(),
                                                                 timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return node_id, None, 0
        return node_id, {h.study_uid: Holding(reply.node_id, h.held_instances, h.held_digest)
                         for h in reply.studies}, reply.last_scrub_started_ms


class TrimWorker(Worker):
    name = "trim"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s

    async def step(self) -> WorkerState:
        r = self.r
        if r.state.snapshot.table is None:
            return WorkerState.IDLE
        candidates = await r._run(self._candidates)
        for study in candidates:
            await self._maybe_trim(study)
        return WorkerState.IDLE

    def _candidates(self) -> list[str]:
        out = []
        for rec in self.r.store.catalog.study_records():
            if rec.held_instances == 0:
                continue
            placement = self.r.state.placement(rec.study_uid)
            if placement is not None and self.r.node_id not in placement.replicas:
                out.append(rec.study_uid)
        return out

    async def _maybe_trim(self, study: str) -> None:
        r = self.r
        rec = await r._run(r.store.catalog.study_record, study)
        placement = r.state.placement(study)
        if rec is None or placement is None:
            return
        ids = await r._run(r.store.catalog.study_manifest_ids, study)  # what the answers cover
        current = await r._run(r.store.catalog.current_manifests, study)
        if any(m.origin_node == r.node_id for _, _, m in current):
            return  # a site keeps what it received itself
        snap = r.state.snapshot
        addresses: dict[str, str] = {m.node_id: m.address for m in snap.alive_peers(r.node_id)}
        holdings = []
        for node_id in placement.replicas:  # ask now: trimming on stale news is how data dies
            if node_id not in addresses:
                return
            try:
                reply = await r.peers.stub(addresses[node_id]).GetHoldings(
                    peer_pb2.HoldingsRequest(study_uids=[study]), timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return
            # A copy counts only if its holder places the study on itself too: two nodes
            # whose views differ would otherwise each trim counting on the other.
            holdings += [Holding(reply.node_id, h.held_instances, h.held_digest)
                         for h in reply.studies if h.replica]
        if not repair.may_trim(r.node_id, "", placement.replicas, rec.instances,
                               rec.current_digest, holdings, snap.positions(),
                               r.state.copies, r.state.min_distance_miles):
            return
        # Only what the answers covered, and only if nothing reached the study meanwhile
        # (an instance stored here while we asked may be its only copy).
        dropped = await r._run(r.store.unhold_unchanged, study, rec.all_digest, ids)
        if dropped is None:
            return
        r.trimmed_studies += 1
        LOGGER.info("trimmed study %s (%d manifests): the replica set %s holds %d verified "
                    "copies", study, dropped, ",".join(placement.replicas), r.state.copies)

