"""The PeerApi servicer: what a node answers to its peers. Bounded everywhere:
a peer (or something pretending to be one) cannot make us read without limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cluster.gossip import GossipWorker
from cluster.replication import GET_MANIFESTS_MAX, Replicator
from node.errors import ChunkCorrupt, ChunkMissing
from proto import peer_pb2, peer_pb2_grpc

LOGGER = logging.getLogger(__name__)
FETCH_HASHES_MAX = 4096  # chunks per FetchChunks request
ANNOUNCE_MANIFESTS_MAX = 4096
FETCH_READ_BATCH = 16  # chunks read and verified per thread hop (<= 16 MiB of memory)


class PeerService(peer_pb2_grpc.PeerApiServicer):
    def __init__(self, gossip: GossipWorker, replicator: Replicator) -> None:
        self.gossip = gossip
        self.r = replicator

    async def Gossip(self, request: peer_pb2.GossipMessage, context: Any
                     ) -> peer_pb2.GossipReply:
        return self.gossip.on_gossip(request)

    async def Announce(self, request: peer_pb2.ManifestBatch, context: Any
                       ) -> peer_pb2.AnnounceReply:
        if len(request.manifests) > ANNOUNCE_MANIFESTS_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many manifests")
        new = await self.r._run(self.r.accept_manifests, list(request.manifests),
                                request.sender_address or request.sender)
        if new:
            self.r.wakeup.set()
        return peer_pb2.AnnounceReply(new_manifests=new)

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

        def collect() -> list[peer_pb2.StudyDigest]:
            out = []
            for study in catalog.partition_studies(request.partition):
                rec = catalog.study_record(study)
                if rec is not None:
                    out.append(peer_pb2.StudyDigest(study_uid=study, digest=rec.all_digest,
                                                    count=rec.manifests))
            return out

        return peer_pb2.StudyDigests(studies=await self.r._run(collect))

    async def GetManifestIds(self, request: peer_pb2.ManifestIdsRequest, context: Any
                             ) -> peer_pb2.ManifestIds:
        ids = await self.r._run(self.r.store.catalog.study_manifest_ids, request.study_uid)
        return peer_pb2.ManifestIds(ids=ids)

    async def GetManifests(self, request: peer_pb2.GetManifestsRequest, context: Any
                           ) -> peer_pb2.ManifestBatch:
        if len(request.ids) > GET_MANIFESTS_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many ids")

        def collect() -> list[bytes]:
            return [got[0] for mid in request.ids if (got := self.r.store.catalog.get(mid))]

        return peer_pb2.ManifestBatch(manifests=await self.r._run(collect),
                                      sender=self.r.node_id)

    async def FetchChunks(self, request: peer_pb2.FetchChunksRequest, context: Any
                          ) -> AsyncIterator[peer_pb2.ChunkData]:
        if len(request.hashes) > FETCH_HASHES_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many chunks asked")
        loop = asyncio.get_running_loop()
        keys = list(request.hashes)
        for start in range(0, len(keys), FETCH_READ_BATCH):
            # one thread hop per batch of chunks, not per chunk: this is the hot path of
            # replication, and each chunk is verified before it leaves
            batch = await loop.run_in_executor(self.r.pool, self._read_batch,
                                               keys[start : start + FETCH_READ_BATCH])
            for msg in batch:
                yield msg

    def _read_batch(self, keys: list[bytes]) -> list[peer_pb2.ChunkData]:
        out = []
        for key in keys:
            try:
                loc, stored = self.r.store.chunks.read_for_peer(key)
            except ChunkMissing:
                out.append(peer_pb2.ChunkData(hash=key, missing=True, reason="not held"))
                continue
            except ChunkCorrupt as exc:  # never serve a bad chunk; the scrubber repairs it
                LOGGER.error("a peer asked for a damaged chunk: %s", exc)
                out.append(peer_pb2.ChunkData(hash=key, missing=True, reason="damaged here"))
                continue
            out.append(peer_pb2.ChunkData(hash=key, plain_len=loc.plain_len, flags=loc.flags,
                                          data=stored))
        return out

    async def GetHoldings(self, request: peer_pb2.HoldingsRequest, context: Any
                          ) -> peer_pb2.Holdings:
        studies = await self.r._run(self.r.own_holdings, list(request.study_uids))
        return peer_pb2.Holdings(node_id=self.r.node_id, studies=studies,
                                 last_scrub_started_ms=self.r.last_scrub_started_ms())
