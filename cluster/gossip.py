"""The gossip worker: drives the Membership state machine over gRPC.

Each step ticks the state machine with the monotonic clock, sends the gossip it
asks for (push-pull: the reply is merged at once), logs state changes and
refusals, and publishes a new snapshot for placement and the API.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable

import grpc

from cluster.membership import (
    ClusterSettings,
    Effect,
    LeftTimedOut,
    Member,
    Membership,
    MemberState,
    NodeId,
    RecordDropped,
    Refused,
    Refuted,
    SendGossip,
    StateChanged,
)
from cluster.peers import Peers
from cluster.state import ClusterState
from cluster.wire import gossip_from_pb, gossip_to_pb
from node.worker import Worker, WorkerState
from proto import peer_pb2

LOGGER = logging.getLogger(__name__)
GOSSIP_TIMEOUT_S = 2.0  # one push-pull; a slower peer is as good as silent this round
# Refusals shown as alerts: the newest few, briefly; a sender picks its address and
# any number of them, so neither their count nor their text may grow without bound.
REFUSALS_KEPT_MAX = 32
REFUSAL_TEXT_MAX = 300


class GossipWorker(Worker):
    name = "gossip"

    def __init__(self, membership: Membership, state: ClusterState, peers: Peers,
                 interval_s: float, usage: Callable[[], tuple[int, int, int]]) -> None:
        self.membership = membership
        self.state = state
        self.peers = peers
        self.idle_s = interval_s
        self.usage = usage  # (capacity, used, free) of this node
        self.on_placement_change: list[Callable[[], None]] = []
        self._sends: set[asyncio.Task[None]] = set()
        self._usage_at = 0.0

    async def step(self) -> WorkerState:
        now = time.monotonic()
        if now - self._usage_at > 5 * self.idle_s:  # statvfs every few rounds is plenty
            capacity, used, free = await asyncio.get_running_loop().run_in_executor(
                None, self.usage)
            self.membership.update_self(capacity_bytes=capacity, used_bytes=used,
                                        free_bytes=free)
            self._usage_at = now
        self.apply(self.membership.tick(now))
        return WorkerState.IDLE

    def apply(self, effects: list[Effect]) -> None:
        """Carry out the state machine's effects; sends run concurrently."""
        for effect in effects:
            if isinstance(effect, SendGossip):
                task = asyncio.create_task(self._send(effect))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
            elif isinstance(effect, StateChanged):
                level = logging.WARNING if effect.new in (
                    MemberState.SUSPECT, MemberState.DEAD) else logging.INFO
                LOGGER.log(level, "member %s: %s -> %s", effect.node_id,
                           effect.old or "unknown", effect.new)
            elif isinstance(effect, Refused):
                address = effect.address[:REFUSAL_TEXT_MAX]
                reason = effect.reason[:REFUSAL_TEXT_MAX]
                LOGGER.error("refusing peer %s at %s: %s", effect.peer[:REFUSAL_TEXT_MAX],
                             address, reason)
                # copy on write: API threads iterate the published dict meanwhile
                refusals = dict(self.state.refusals)
                refusals.pop(address, None)  # re-inserted as the newest
                refusals[address] = (time.time(), reason)
                while len(refusals) > REFUSALS_KEPT_MAX:
                    del refusals[next(iter(refusals))]
                self.state.refusals = refusals
            elif isinstance(effect, RecordDropped | Refuted | LeftTimedOut):
                # a drop's reason quotes the bad field, as long as the sender made it
                LOGGER.warning("membership: %.500s", effect)
        self.publish()

    def publish(self) -> None:
        now = time.monotonic()
        silent: dict[str, float] = {m.node_id: self.membership.time_since_heard(m.node_id, now)
                  for m in self.membership.members() if m.state == MemberState.LEFT}
        if self.state.publish(self.membership.members(), silent):
            for callback in self.on_placement_change:
                callback()

    async def _send(self, effect: SendGossip) -> None:
        msg = gossip_to_pb(effect.message, time.time())
        try:
            reply = await self.peers.stub(effect.address).Gossip(msg, timeout=GOSSIP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            LOGGER.debug("gossip to %s failed: %s", effect.address, exc.code().name)
            return
        if reply.has_message:
            self._note_clock(reply.message)
            self.apply(self.membership.on_reply(gossip_from_pb(reply.message), time.monotonic()))

    def on_gossip(self, msg: peer_pb2.GossipMessage) -> peer_pb2.GossipReply:
        """A peer's push (called by the peer service on the event loop)."""
        reply, effects = self.membership.on_gossip(gossip_from_pb(msg), time.monotonic())
        self._note_clock(msg)  # after the merge: a new member's first push counts
        self.apply(effects)
        if reply is None:
            return peer_pb2.GossipReply(has_message=False)
        return peer_pb2.GossipReply(message=gossip_to_pb(reply, time.time()), has_message=True)

    def _note_clock(self, msg: peer_pb2.GossipMessage) -> None:
        # members only: any name a sender makes up would otherwise stay here for ever
        if (math.isfinite(msg.wall_time_s) and msg.wall_time_s
                and msg.sender != self.membership.me.node_id
                and self.membership.get(msg.sender) is not None):
            self.state.clock_skew_s = {**self.state.clock_skew_s,
                                       msg.sender: msg.wall_time_s - time.time()}

    async def leave(self) -> None:
        """Announce a clean shutdown ("left", not dead) and give the sends a moment."""
        for effect in self.membership.leave(time.monotonic()):
            if isinstance(effect, SendGossip):
                await self._send(effect)
        if self._sends:
            await asyncio.wait(self._sends, timeout=GOSSIP_TIMEOUT_S)


def me_as_member(node_id: str, site: str, lat: float, lon: float, address: str,
                 incarnation: int) -> Member:
    return Member(node_id=NodeId(node_id), site=site, lat=lat, lon=lon, address=address,
                  capacity_bytes=0, used_bytes=0, free_bytes=0, incarnation=incarnation,
                  heartbeat=0, state=MemberState.ALIVE)


def new_membership(me: Member, settings: ClusterSettings, seeds: list[str], interval_s: float,
                   suspect_after_s: float | None, dead_after_s: float) -> Membership:
    return Membership(me, settings, seeds, rng=random.Random(), gossip_interval_s=interval_s,
                      suspect_after_s=suspect_after_s, dead_after_s=dead_after_s)
