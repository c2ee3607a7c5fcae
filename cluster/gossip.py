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

from pacsmesh.cluster.membership import (
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
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.wire import gossip_from_pb, gossip_to_pb
from pacsmesh.node.worker import Worker, WorkerState
from pacsmesh.proto import peer_pb2

LOGGER = logging.getLogger(__name__)
GOSSIP_TIMEOUT_S = 2.0  # one push-pull; a slower peer is as good as silent this round
# A peer's wall clock is shown as skew, never used for decisions; an absurd claim
# is shown clipped rather than as inf or 1e308.
CLOCK_SKEW_SHOWN_MAX_S = 10 * 365 * 86400.0
# Refused peers shown in status, the most recent; addresses are the peers' own
# claims, so a rogue inventing new ones must not grow the table without end.
# Refusals shown as alerts: the newest few, briefly; a sender picks its address and
# any number of them, so neither their count nor their text may grow without bound.
REFUSALS_KEPT_MAX = 32
REFUSALS_SHOWN_MAX = REFUSALS_KEPT_MAX  # one bound, named twice for older callers
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
        # keeps our incarnation (worker thread) when a refutation raised it, so the
        # next run starts above every record of this one
        self.keep_incarnation: Callable[[int], None] | None = None
        self._kept_incarnation = membership.me.incarnation
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
        incarnation = self.membership.me.incarnation
        if self.keep_incarnation is not None and incarnation > self._kept_incarnation:
            await asyncio.get_running_loop().run_in_executor(
                None, self.keep_incarnation, incarnation)
            self._kept_incarnation = incarnation
        return WorkerState.IDLE

    def apply(self, effects: list[Effect]) -> None:
        """Carry out the state machine's effects; sends run concurrently."""
        for effect in effects:
            if isinstance(effect, SendGossip):
                task = asyncio.create_task(self._send(effect))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
            elif isinstance(effect, StateChanged):
                # a state change, not a fault of ours: INFO, one line per transition
                member = self.membership.get(effect.node_id)
                LOGGER.info("member %s (%s): %s -> %s", effect.node_id,
                            member.site if member is not None else "?",
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
        if self.state.revoked and self.state.id_at(effect.address) in self.state.revoked:
            return  # it would answer (its server still has our trust): do not ask it
        msg = gossip_to_pb(effect.message, time.time())
        # With TLS the channel to a known member demanded that member's certificate, so
        # whoever answers is proven; a seed's answer (no id known yet) is not.
        expected = self.state.id_at(effect.address) if self.peers.verifies_identity else None
        try:
            reply = await self.peers.stub(effect.address).Gossip(msg, timeout=GOSSIP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            LOGGER.debug("gossip to %s failed: %s", effect.address, exc.code().name)
            return
        if reply.has_message:
            if expected is not None and reply.message.sender == expected:
                self.state.vouch(expected)
            self.apply(self.membership.on_reply(
                gossip_from_pb(reply.message), time.monotonic(),
                authenticated=None if expected is None else NodeId(expected)))
            self._note_clock(reply.message)

    def on_gossip(self, msg: peer_pb2.GossipMessage, authenticated: str | None = None
                  ) -> peer_pb2.GossipReply:
        """A peer's push (called by the peer service on the event loop).
        ``authenticated``: the node id the channel proved (TLS), when known; a
        message claiming another sender is refused."""
        if authenticated is not None and authenticated == msg.sender:
            self.state.vouch(authenticated)
        reply, effects = self.membership.on_gossip(
            gossip_from_pb(msg), time.monotonic(),
            authenticated=None if authenticated is None else NodeId(authenticated))
        self.apply(effects)
        if authenticated is None or authenticated == msg.sender:
            self._note_clock(msg)
        if reply is None:
            return peer_pb2.GossipReply(has_message=False)
        return peer_pb2.GossipReply(message=gossip_to_pb(reply, time.time()), has_message=True)

    def _note_clock(self, msg: peer_pb2.GossipMessage) -> None:
        """The sender's clock skew, for the CLOCK_SKEW alert: of members only (anyone
        can claim to be any sender; this keeps the table bounded)."""
        if (not msg.wall_time_s or not math.isfinite(msg.wall_time_s)
                or self.membership.get(msg.sender) is None):
            return
        skew = msg.wall_time_s - time.time()
        skew = max(-CLOCK_SKEW_SHOWN_MAX_S, min(CLOCK_SKEW_SHOWN_MAX_S, skew))
        self.state.clock_skew_s = {**self.state.clock_skew_s, msg.sender: skew}

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
