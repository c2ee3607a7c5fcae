"""A rogue member for tests: a real gRPC peer with a valid node certificate that
gossips like a member (the product's own membership machine) and lies.

It claims a huge capacity, and it claims every copy an honest node holds as its
own by relaying that node's answers (held root, partitions, studies, and
proof-of-possession challenges) with its own id: the strongest lie a member can
tell without storing a byte.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

from pacsmesh.cluster.gossip import GossipWorker, me_as_member, new_membership
from pacsmesh.cluster.membership import ClusterSettings
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.node.tls import TlsFiles, server_credentials
from pacsmesh.node.worker import Runner
from pacsmesh.proto import peer_pb2, peer_pb2_grpc

HUGE = 1 << 60


class LyingPeer(peer_pb2_grpc.PeerApiServicer):
    def __init__(self, rogue: Rogue) -> None:
        self.rogue = rogue

    async def Gossip(self, request: peer_pb2.GossipMessage, context: Any
                     ) -> peer_pb2.GossipReply:
        assert self.rogue.gossip is not None
        return self.rogue.gossip.on_gossip(request)

    def _victim(self) -> peer_pb2_grpc.PeerApiAsyncStub:
        return self.rogue.peers.stub(self.rogue.victim)

    async def GetHoldings(self, request: peer_pb2.HoldingsRequest, context: Any
                          ) -> peer_pb2.Holdings:
        got = await self._victim().GetHoldings(request, timeout=5)
        for s in got.studies:
            s.replica = True  # "I keep it: count on me"
        got.node_id = self.rogue.node_id
        return got

    async def GetHeldRoot(self, request: peer_pb2.HeldRootRequest, context: Any
                          ) -> peer_pb2.HeldRoot:
        got = await self._victim().GetHeldRoot(request, timeout=5)
        got.node_id = self.rogue.node_id
        return got

    async def GetHeldPartitions(self, request: peer_pb2.HeldPartitionsRequest, context: Any
                                ) -> peer_pb2.HeldPartitions:
        got: peer_pb2.HeldPartitions = await self._victim().GetHeldPartitions(request, timeout=5)
        return got

    async def GetHeldStudies(self, request: peer_pb2.HeldStudiesRequest, context: Any
                             ) -> peer_pb2.HeldStudies:
        got: peer_pb2.HeldStudies = await self._victim().GetHeldStudies(request, timeout=5)
        return got


class Rogue:
    """Runs in its own thread and event loop; `start()` returns once it serves."""

    def __init__(self, node_id: str, site: str, lat: float, lon: float, port: int,
                 tls: TlsFiles, seeds: list[str], victim: str, settings: ClusterSettings,
                 gossip_interval_s: float, dead_after_s: float) -> None:
        self.node_id, self.address, self.victim = node_id, f"127.0.0.1:{port}", victim
        self.tls = tls
        me = me_as_member(node_id, site, lat, lon, self.address, incarnation=1)
        self.membership = new_membership(me, settings, seeds, gossip_interval_s, None,
                                         dead_after_s)
        self.state = ClusterState(node_id, settings.partitions, settings.copies,
                                  settings.min_distance_miles, dead_after_s, gossip_interval_s)
        self.peers = Peers(tls, self.state.id_at)
        self.interval_s = gossip_interval_s
        self.gossip: GossipWorker | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self._runner: Runner | None = None

    def start(self) -> Rogue:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    async def _serve(self) -> None:
        self.gossip = GossipWorker(self.membership, self.state, self.peers, self.interval_s,
                                   usage=lambda: (HUGE, 0, HUGE))
        self._server = grpc.aio.server()
        # the rest of the peer API stays the base class's UNIMPLEMENTED: a rogue need not
        lying = LyingPeer(self)  # type: ignore[abstract]
        peer_pb2_grpc.add_PeerApiServicer_to_server(lying, self._server)
        self._server.add_secure_port(self.address, server_credentials(self.tls))
        await self._server.start()
        self._runner = Runner()
        self._runner.start(self.gossip)

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.stop()
        if self._server is not None:
            await self._server.stop(0)
        await self.peers.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
