"""Conversions between the sans-IO cluster types and proto/peer.proto messages."""

from __future__ import annotations

from cluster.membership import ClusterSettings, GossipMessage, Member, MemberState, NodeId
from proto import peer_pb2


def settings_to_pb(s: ClusterSettings) -> peer_pb2.Settings:
    return peer_pb2.Settings(copies=s.copies, min_distance_miles=s.min_distance_miles,
                             partitions=s.partitions)


def settings_from_pb(s: peer_pb2.Settings) -> ClusterSettings:
    return ClusterSettings(copies=s.copies, min_distance_miles=s.min_distance_miles,
                           partitions=s.partitions)


def member_to_pb(m: Member) -> peer_pb2.MemberRecord:
    return peer_pb2.MemberRecord(
        node_id=m.node_id, site=m.site, lat=m.lat, lon=m.lon, address=m.address,
        capacity_bytes=m.capacity_bytes, used_bytes=m.used_bytes, free_bytes=m.free_bytes,
        incarnation=m.incarnation, heartbeat=m.heartbeat, state=str(m.state))


def member_from_pb(r: peer_pb2.MemberRecord) -> Member:
    # An unknown state string is kept as-is: Membership validates records and drops
    # malformed ones with a reason, so that judgement stays in one place.
    state = MemberState(r.state) if r.state in MemberState.__members__.values() else r.state
    return Member(node_id=NodeId(r.node_id), site=r.site, lat=r.lat, lon=r.lon,
                  address=r.address, capacity_bytes=r.capacity_bytes, used_bytes=r.used_bytes,
                  free_bytes=r.free_bytes, incarnation=r.incarnation, heartbeat=r.heartbeat,
                  state=state)  # type: ignore[arg-type]


def gossip_to_pb(g: GossipMessage, wall_time_s: float) -> peer_pb2.GossipMessage:
    return peer_pb2.GossipMessage(sender=g.sender, address=g.address,
                                  settings=settings_to_pb(g.settings),
                                  members=[member_to_pb(m) for m in g.members],
                                  wall_time_s=wall_time_s)


def gossip_from_pb(g: peer_pb2.GossipMessage) -> GossipMessage:
    return GossipMessage(sender=NodeId(g.sender), address=g.address,
                         settings=settings_from_pb(g.settings),
                         members=tuple(member_from_pb(m) for m in g.members))
