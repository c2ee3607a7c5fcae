"""Fuzz: gossip from outside (proto GossipMessage -> cluster/wire.py -> Membership).

Whatever a peer (or anything that reaches the port) sends, the real gossip worker
and Membership answer without an unexpected exception; malformed records are
dropped with a reason (RecordDropped), peers with other settings refused (Refused);
the member table holds only valid records, within MEMBERS_MAX; our own record is
never changed by a peer except to refute it; and no hostile sender can grow the
state the worker publishes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from pacsmesh.cluster.gossip import REFUSAL_TEXT_MAX, REFUSALS_KEPT_MAX, GossipWorker, me_as_member
from pacsmesh.cluster.membership import (
    MEMBERS_MAX,
    ClusterSettings,
    Effect,
    LeftTimedOut,
    Membership,
    MemberState,
    RecordDropped,
    Refused,
    Refuted,
    SendGossip,
    StateChanged,
    member_problem,
)
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.wire import gossip_from_pb, member_from_pb, settings_to_pb
from pacsmesh.proto import peer_pb2
from tests.fuzz import doubles, fuzz, garbage, texts, u32s, u64s

SETTINGS = ClusterSettings(copies=3, min_distance_miles=250.0, partitions=16)
ME = me_as_member("boston-1", "Boston", 42.36, -71.06, "boston.example:7400", incarnation=7)
PEER_IDS = ["chicago-1", "denver-1", "seattle-1", ME.node_id]
STATES = [str(s) for s in MemberState]


def valid_record(node_id: str, lat: float, lon: float, heartbeat: int) -> peer_pb2.MemberRecord:
    return peer_pb2.MemberRecord(
        node_id=node_id, site=node_id.split("-", maxsplit=1)[0], lat=lat, lon=lon,
        address=f"{node_id}.example:7400", capacity_bytes=10**12, used_bytes=10**9,
        free_bytes=10**11, incarnation=1, heartbeat=heartbeat, state="alive")


def valid_message(*records: peer_pb2.MemberRecord, sender: str = "chicago-1",
                  address: str = "chicago-1.example:7400") -> peer_pb2.GossipMessage:
    return peer_pb2.GossipMessage(sender=sender, address=address,
                                  settings=settings_to_pb(SETTINGS), members=records,
                                  wall_time_s=1.7e9)


SEEDS = [m.SerializeToString() for m in (
    valid_message(valid_record("chicago-1", 41.88, -87.63, 5)),
    valid_message(valid_record("chicago-1", 41.88, -87.63, 5),
                  valid_record("denver-1", 39.74, -104.99, 9),
                  valid_record("seattle-1", 47.61, -122.33, 2)),
    valid_message(peer_pb2.MemberRecord(node_id=ME.node_id, site="Boston", lat=42.36,
                                        lon=-71.06, address=ME.address, incarnation=9,
                                        heartbeat=1, state="dead")),
    valid_message(sender=ME.node_id, address="elsewhere.example:7400"),
)]


@dataclass
class Node:
    """One real gossip worker over a real Membership, as cluster/member.py builds it."""

    membership: Membership
    state: ClusterState
    worker: GossipWorker


def new_node() -> Node:
    membership = Membership(ME, SETTINGS, ["seed.example:7400"], rng=random.Random(1))
    state = ClusterState(ME.node_id, SETTINGS.partitions, SETTINGS.copies,
                         SETTINGS.min_distance_miles, dead_after_s=600.0)
    worker = GossipWorker(membership, state, Peers(), 1.0, usage=lambda: (0, 0, 0))
    return Node(membership, state, worker)


EFFECT_TYPES = (SendGossip, StateChanged, Refused, RecordDropped, Refuted, LeftTimedOut)


def assert_sound(node: Node, effects: list[Effect] = ()) -> None:  # type: ignore[assignment]
    """The table holds only valid records, within bounds; our own record is ours."""
    members = node.membership.members()
    assert len(members) <= MEMBERS_MAX
    for m in members:
        assert member_problem(m) is None, m
    me = node.membership.me
    assert (me.node_id, me.site, me.lat, me.lon, me.address) == (
        ME.node_id, ME.site, ME.lat, ME.lon, ME.address)
    assert me.incarnation >= ME.incarnation and me.state == MemberState.ALIVE
    for effect in effects:
        assert isinstance(effect, EFFECT_TYPES), effect
        assert not isinstance(effect, SendGossip), "an incoming message made us send"
    # what the worker publishes stays bounded by what membership holds
    assert set(node.state.clock_skew_s) <= {m.node_id for m in members}
    assert len(node.state.refusals) <= REFUSALS_KEPT_MAX
    for address, (_, reason) in node.state.refusals.items():
        assert len(address) <= REFUSAL_TEXT_MAX and len(reason) <= REFUSAL_TEXT_MAX
    for m in node.state.snapshot.members:
        assert member_problem(m) is None


def feed(node: Node, pb: peer_pb2.GossipMessage) -> None:
    """The message as a push (through the worker, as the PeerApi calls it) and as the
    reply to one of our pushes."""
    reply = node.worker.on_gossip(pb)
    assert isinstance(reply, peer_pb2.GossipReply)
    reply.SerializeToString()  # what we answer must go out on the wire
    assert_sound(node)
    effects = node.membership.on_reply(gossip_from_pb(pb), now=1.0)
    node.worker.apply(effects)
    assert_sound(node, effects)


@fuzz()
@given(garbage(SEEDS))
@example(SEEDS[2])  # a peer that holds us as dead: we refute, never take its record
# (regression) a sender that is no member: its clock skew was kept under its name for
# ever, so a sender naming itself anew each push grew the state without bound
@example(valid_message(sender="nobody", address="nobody.example:1").SerializeToString())
def test_gossip_bytes_from_the_wire(raw: bytes) -> None:
    pb = peer_pb2.GossipMessage()
    try:
        pb.ParseFromString(raw)
    except DecodeError:
        return  # gRPC answers a message that does not parse; we never see it
    feed(new_node(), pb)


def records() -> st.SearchStrategy[peer_pb2.MemberRecord]:
    return st.builds(
        peer_pb2.MemberRecord,
        node_id=texts(PEER_IDS), site=texts(["Chicago"]), lat=doubles(), lon=doubles(),
        address=texts(["chicago-1.example:7400", ME.address]), capacity_bytes=u64s(),
        used_bytes=u64s(), free_bytes=u64s(), incarnation=u64s(), heartbeat=u64s(),
        state=st.one_of(st.sampled_from(STATES), texts()))


def messages() -> st.SearchStrategy[peer_pb2.GossipMessage]:
    settings = st.one_of(
        st.just(settings_to_pb(SETTINGS)),
        st.builds(peer_pb2.Settings, copies=u32s(), min_distance_miles=doubles(),
                  partitions=u32s()))
    return st.builds(
        peer_pb2.GossipMessage, sender=texts(PEER_IDS),
        address=texts(["chicago-1.example:7400", ME.address]), settings=settings,
        members=st.lists(records(), max_size=8), wall_time_s=doubles())


@fuzz()
@given(messages())
def test_gossip_fields_at_their_extremes(pb: peer_pb2.GossipMessage) -> None:
    node = new_node()
    feed(node, pb)
    # every malformed record of a message that was not refused is named in a drop (well
    # formed records a trust bound refuses, e.g. a sender calling itself suspect, are
    # dropped too, under their rule)
    effects = new_node().membership.on_reply(gossip_from_pb(pb), now=1.0)
    if not any(isinstance(e, Refused) for e in effects) and pb.sender != ME.node_id:
        malformed = [r for r in pb.members if member_problem(member_from_pb(r)) is not None]
        dropped = [e for e in effects if isinstance(e, RecordDropped) and e.node_id is not None]
        assert len([e for e in dropped if not e.rule]) == len(malformed), (effects, malformed)
        for e in dropped:
            assert e.reason and len(e.node_id or "") <= 128


@fuzz(0.3)
@given(st.lists(messages(), min_size=10, max_size=40), st.randoms(use_true_random=False))
def test_hostile_senders_cannot_grow_what_we_publish(
        pbs: list[peer_pb2.GossipMessage], rng: random.Random) -> None:
    """Many senders that are not members (new names, other settings, our own id at
    other addresses), one after another at one node: what the worker publishes for
    the API (refusals, clock skews) stays bounded."""
    node = new_node()
    for i, pb in enumerate(pbs):
        if rng.random() < 0.5:  # a fresh name and address each time: nothing repeats
            pb.sender, pb.address = f"stranger-{i}", f"stranger-{i}.example:{1000 + i}"
        if rng.random() < 0.5:
            pb.settings.copies = SETTINGS.copies + 1 + i
        pb.wall_time_s = 1e9 if math.isnan(pb.wall_time_s) else pb.wall_time_s
        feed(node, pb)


def test_refused_strangers_leave_a_bounded_trace() -> None:
    """Regression: every refused sender's address was kept, with its reason, for the
    PEER_REFUSED alert: 500 pushes with other settings from 500 made-up addresses of
    100 KB each left 500 entries and made every status reply 50 MB larger."""
    node = new_node()
    for i in range(500):
        pb = valid_message(sender=f"stranger-{i}", address=f"{i}{'x' * 100_000}:7400")
        pb.settings.copies = SETTINGS.copies + 1
        node.worker.on_gossip(pb)
    assert_sound(node)
    assert len(node.state.refusals) == REFUSALS_KEPT_MAX


def test_malformed_records_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Regression: a dropped record's reason quotes its bad field, and the worker logged
    each in full: 100 records with a 100 KB address each (one 10 MB push) wrote 10 MB."""
    node = new_node()
    bad = [valid_record(f"bad-{i}", 41.0, -87.0, 1) for i in range(100)]
    for r in bad:
        r.address = "x" * 100_000
    with caplog.at_level("WARNING"):
        node.worker.on_gossip(valid_message(*bad))
    assert len(caplog.records) == 100 and len(caplog.text) < 100 * 1024
