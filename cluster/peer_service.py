"""The PeerApi servicer: what a node answers to its peers. Bounded everywhere:
a peer (or something pretending to be one) cannot make us read without limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from pacsmesh.cluster import antientropy, holdings
from pacsmesh.cluster.gossip import GossipWorker
from pacsmesh.cluster.lifecycle_worker import LifecycleWorker
from pacsmesh.cluster.membership import ADDRESS_LENGTH_MAX
from pacsmesh.cluster.relay import RELAY_GRACE_S, RELAY_WAIT_MAX_S
from pacsmesh.cluster.transfer import DEFERRED, GET_MANIFESTS_MAX, REPLY_BYTES_MAX, Replicator
from pacsmesh.node.catalog import partition_of
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing
from pacsmesh.node.lifecycle import ADD_MAX as LIFECYCLE_ADD_MAX
from pacsmesh.node.lifecycle import PAGE_MAX as LIFECYCLE_PAGE_MAX
from pacsmesh.node.lifecycle import LifecycleBook
from pacsmesh.node.tls import CALLER
from pacsmesh.proto import peer_pb2, peer_pb2_grpc

LOGGER = logging.getLogger(__name__)
FETCH_HASHES_MAX = 4096  # chunks per FetchChunks request
ANNOUNCE_MANIFESTS_MAX = 4096
FETCH_READ_BATCH = 16  # chunks read and verified per thread hop (<= 16 MiB of memory)
IDS_STUDIES_MAX = 256  # studies per GetManifestIds
HOLDINGS_STUDIES_MAX = 1000  # studies per GetHoldings
HELD_DELTA_STUDIES_MAX = 4096  # studies per pushed holdings delta
CHALLENGE_CHUNKS_MAX = 4  # chunks read to answer one proof-of-possession challenge
NOT_HELD = "not held"
SEND_MARGIN_S = 5.0  # a paced stream stops this long before the asker's deadline


async def _speaks_for(node_id: str, context: Any) -> None:
    """With TLS, a peer speaks only for the node its certificate names: a member with
    a valid certificate still cannot gossip or report holdings as another."""
    caller = CALLER.get()
    if caller.role == "node" and node_id != caller.name:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"certificate names {caller.name!r}; it cannot speak for "
                            f"{node_id!r}")


class PeerService(peer_pb2_grpc.PeerApiServicer):
    def __init__(self, gossip: GossipWorker, replicator: Replicator) -> None:
        self.gossip = gossip
        self.r = replicator
        self.lifecycle: LifecycleWorker | None = None

    async def Gossip(self, request: peer_pb2.GossipMessage, context: Any
                     ) -> peer_pb2.GossipReply:
        await _speaks_for(request.sender, context)
        caller = CALLER.get()
        return self.gossip.on_gossip(request, caller.name if caller.role == "node" else None)

    async def Announce(self, request: peer_pb2.ManifestBatch, context: Any
                       ) -> peer_pb2.AnnounceReply:
        if len(request.manifests) > ANNOUNCE_MANIFESTS_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many manifests")
        new = await self.r._run(self.r.accept_manifests, list(request.manifests),
                                request.sender_address or request.sender)
        if new:
            self.r.wakeup.set()
        return peer_pb2.AnnounceReply(new_manifests=new)

    async def GetRoot(self, request: peer_pb2.RootRequest, context: Any) -> peer_pb2.RootDigest:
        digest, count = await self.r._run(self.r.root)
        return peer_pb2.RootDigest(digest=digest, count=count)

    async def GetPartitionManifests(self, request: peer_pb2.PartitionManifestsRequest,
                                    context: Any) -> peer_pb2.PartitionManifests:
        if request.partition >= self.r.store.catalog.partitions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such partition")
        limit = max(1, min(request.limit or antientropy.BULK_PAGE_MANIFESTS,
                           antientropy.BULK_PAGE_MANIFESTS))
        raws, last, more = await self.r._run(self.r.partition_manifests, request.partition,
                                             request.after, limit)
        return peer_pb2.PartitionManifests(manifests=raws, last=last, more=more)

    async def GetLifecycleDigest(self, request: peer_pb2.LifecycleDigestRequest, context: Any
                                 ) -> peer_pb2.LifecycleDigest:
        book = await self._book(context)
        digest, count = await self.r._run(book.digest)
        return peer_pb2.LifecycleDigest(digest=digest, count=count)

    async def GetLifecycleRecords(self, request: peer_pb2.LifecycleRecordsRequest, context: Any
                                  ) -> peer_pb2.LifecycleRecords:
        book = await self._book(context)
        limit = max(1, min(request.limit or LIFECYCLE_PAGE_MAX, LIFECYCLE_PAGE_MAX))
        raws, more = await self.r._run(book.page, request.after, limit)
        return peer_pb2.LifecycleRecords(records=raws, more=more)

    async def PushLifecycle(self, request: peer_pb2.LifecyclePush, context: Any
                            ) -> peer_pb2.LifecyclePushReply:
        await self._book(context)
        assert self.lifecycle is not None
        if len(request.records) > LIFECYCLE_ADD_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many records")
        added = await self.lifecycle.accept(list(request.records), CALLER.get().who)
        return peer_pb2.LifecyclePushReply(added=added)

    async def _book(self, context: Any) -> LifecycleBook:
        if self.lifecycle is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "lifecycle records not served")
        assert self.lifecycle is not None
        return self.lifecycle.book

    async def PushHeld(self, request: peer_pb2.HeldDelta, context: Any
                       ) -> peer_pb2.HeldDeltaReply:
        if len(request.studies) > HELD_DELTA_STUDIES_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many studies")
        await _speaks_for(request.node_id, context)
        snap = self.r.state.snapshot
        if request.node_id == self.r.node_id or snap.member(request.node_id) is None:
            return peer_pb2.HeldDeltaReply()  # only members speak for their holdings
        partitions = self.r.store.catalog.partitions
        deltas = [(s.study_uid, partition_of(s.study_uid, partitions), s.held_instances,
                   bytes(s.held_digest)) for s in request.studies
                  if len(s.held_digest) == 32 or s.held_instances == 0]
        changed = await self.r._run(self.r.holdings.apply, request.node_id, deltas)
        for callback in self.r.on_holdings_changed:
            callback(request.node_id, sorted(changed), set())
        return peer_pb2.HeldDeltaReply()

    async def GetHeldRoot(self, request: peer_pb2.HeldRootRequest, context: Any
                          ) -> peer_pb2.HeldRoot:
        return await self.r._run(self.r.held_root)

    async def GetHeldPartitions(self, request: peer_pb2.HeldPartitionsRequest, context: Any
                                ) -> peer_pb2.HeldPartitions:
        digests = await self.r._run(self.r.store.catalog.held_partition_digests)
        return peer_pb2.HeldPartitions(digests=[d for d, _ in digests],
                                       counts=[c for _, c in digests])

    async def GetHeldStudies(self, request: peer_pb2.HeldStudiesRequest, context: Any
                             ) -> peer_pb2.HeldStudies:
        if request.partition >= self.r.store.catalog.partitions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such partition")
        limit = max(1, min(request.limit or holdings.HELD_PAGE_MAX, holdings.HELD_PAGE_MAX))
        held, last, more = await self.r._run(self.r.held_studies, request.partition,
                                             request.after, limit)
        return peer_pb2.HeldStudies(
            studies=[peer_pb2.StudyHolding(study_uid=s, held_instances=n, held_digest=d)
                     for s, n, d in held], last=last, more=more)

    async def GetPartitionDigests(self, request: peer_pb2.PartitionDigestsRequest, context: Any
                                  ) -> peer_pb2.PartitionDigests:
        digests = await self.r._run(self.r.store.catalog.partition_digests)
        return peer_pb2.PartitionDigests(digests=[d for d, _ in digests],
                                         counts=[c for _, c in digests])

    async def GetStudyDigests(self, request: peer_pb2.StudyDigestsRequest, context: Any
                              ) -> peer_pb2.StudyDigests:
        catalog = self.r.store.catalog
        if request.partition >= catalog.partitions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such partition")

        limit = max(1, min(request.limit or antientropy.STUDY_PAGE_MAX,
                           antientropy.STUDY_PAGE_MAX))

        def collect() -> peer_pb2.StudyDigests:
            recs = catalog.partition_study_page(request.partition, request.after, limit)
            return peer_pb2.StudyDigests(
                studies=[peer_pb2.StudyDigest(study_uid=r.study_uid, digest=r.all_digest,
                                              count=r.manifests) for r in recs],
                more=len(recs) >= limit)

        return await self.r._run(collect)

    async def GetManifestIds(self, request: peer_pb2.ManifestIdsRequest, context: Any
                             ) -> peer_pb2.ManifestIds:
        studies = [s for s in (request.study_uid, *request.study_uids) if s]
        if len(studies) > IDS_STUDIES_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many studies")

        def collect() -> list[bytes]:
            return [mid for s in studies for mid in self.r.store.catalog.study_manifest_ids(s)]

        return peer_pb2.ManifestIds(ids=await self.r._run(collect))

    async def GetManifests(self, request: peer_pb2.GetManifestsRequest, context: Any
                           ) -> peer_pb2.ManifestBatch:
        if len(request.ids) > GET_MANIFESTS_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many ids")

        def collect() -> tuple[list[bytes], int]:
            out: list[bytes] = []
            size = 0
            for i, mid in enumerate(request.ids):
                if size >= REPLY_BYTES_MAX:  # the asker asks again for the rest
                    return out, i
                if got := self.r.store.catalog.get(mid):
                    out.append(got[0])
                    size += len(got[0])
            return out, len(request.ids)

        raws, covered = await self.r._run(collect)
        return peer_pb2.ManifestBatch(manifests=raws, sender=self.r.node_id, covered=covered)

    async def FetchChunks(self, request: peer_pb2.FetchChunksRequest, context: Any
                          ) -> AsyncIterator[peer_pb2.ChunkData]:
        """Chunks as stored (compressed), each verified before it leaves, paced by our
        [transfer] limits. A relay request (wait_ms) also gets the chunks we are
        fetching ourselves right now, as they arrive."""
        if len(request.hashes) > FETCH_HASHES_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many chunks asked")
        caller = CALLER.get()
        peer = caller.name if caller.role == "node" else request.requester[:ADDRESS_LENGTH_MAX]
        shaper, arrivals = self.r.shaper, self.r.arrivals
        if why := shaper.deferral(request.purpose):
            for key in request.hashes:
                yield peer_pb2.ChunkData(hash=key, missing=True, reason=why)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait_s = min(request.wait_ms / 1000, RELAY_WAIT_MAX_S)
        pending = list(request.hashes)
        while pending:
            later: list[bytes] = []
            for start in range(0, len(pending), FETCH_READ_BATCH):
                # one thread hop per batch of chunks, not per chunk: this is the hot
                # path of replication
                batch = await loop.run_in_executor(self.r.pool, self._read_batch,
                                                   pending[start : start + FETCH_READ_BATCH],
                                                   request.zstd_level, request.replica)
                for msg in batch:
                    waited = loop.time() - started
                    if (msg.missing and msg.reason == NOT_HELD and waited < wait_s
                            and (arrivals.expected(msg.hash) or waited < RELAY_GRACE_S)):
                        later.append(msg.hash)  # on its way here: send it when it lands
                        continue
                    remaining = context.time_remaining()
                    if msg.missing:
                        yield msg
                    elif remaining is not None and remaining < SEND_MARGIN_S:
                        yield peer_pb2.ChunkData(hash=msg.hash, missing=True,
                                                 reason=f"{DEFERRED}: rate-limited; ask again")
                    else:
                        await shaper.send(peer, request.purpose, len(msg.data))
                        self.r.links.on_sent(peer, len(msg.data))
                        yield msg
            pending = later
            if pending:
                await arrivals.changed(timeout_s=0.25)

    def _read_batch(self, keys: list[bytes], zstd_level: int = 0, replica: bool = False
                    ) -> list[peer_pb2.ChunkData]:
        out = []
        for key in keys:
            try:
                plain_len, flags, data = self.r.store.chunks.for_peer(key, zstd_level, replica)
            except ChunkMissing:
                out.append(peer_pb2.ChunkData(hash=key, missing=True, reason=NOT_HELD))
                continue
            except ChunkCorrupt as exc:  # never serve a bad chunk; the scrubber repairs it
                LOGGER.error("a peer asked for a damaged chunk: %s", exc)
                out.append(peer_pb2.ChunkData(hash=key, missing=True, reason="damaged here"))
                continue
            out.append(peer_pb2.ChunkData(hash=key, plain_len=plain_len, flags=flags, data=data))
        return out

    async def GetHoldings(self, request: peer_pb2.HoldingsRequest, context: Any
                          ) -> peer_pb2.Holdings:
        if len(request.study_uids) > HOLDINGS_STUDIES_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many studies")
        if request.nonce and (len(request.challenge_chunks) > CHALLENGE_CHUNKS_MAX
                              or len(request.study_uids) > 1
                              or not 16 <= len(request.nonce) <= 64):
            # a proof costs chunk reads: one study, a few chunks per request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a challenge covers one study, at most "
                                f"{CHALLENGE_CHUNKS_MAX} chunks, a 16..64-byte nonce")
        studies = await self.r._run(self.r.own_holdings, list(request.study_uids),
                                    request.nonce, list(request.challenge_chunks),
                                    CALLER.get().name)
        return peer_pb2.Holdings(node_id=self.r.node_id, studies=studies,
                                 last_scrub_started_ms=self.r.last_scrub_started_ms())
