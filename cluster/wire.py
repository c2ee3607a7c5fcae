"""Conversions between the sans-IO cluster types and proto/peer.proto messages."""

from __future__ import annotations

from pacsmesh.cluster import messages as msg
from pacsmesh.cluster.membership import ClusterSettings, GossipMessage, Member, MemberState, NodeId
from pacsmesh.proto import peer_pb2, peer_pb2_grpc


def settings_to_pb(s: ClusterSettings) -> peer_pb2.Settings:
    return peer_pb2.Settings(copies=s.copies, min_distance_miles=s.min_distance_miles,
                             partitions=s.partitions, retention=s.retention)


def settings_from_pb(s: peer_pb2.Settings) -> ClusterSettings:
    return ClusterSettings(copies=s.copies, min_distance_miles=s.min_distance_miles,
                           partitions=s.partitions, retention=s.retention)


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


# ---- the replication protocol's requests, over gRPC ---------------------------------

async def call(stub: peer_pb2_grpc.PeerApiAsyncStub, request: msg.Request,
               timeout_s: float) -> object:
    """Send one machine request to a peer; the reply as the machines read it.
    Raises grpc.aio.AioRpcError like any call."""
    match request:
        case msg.RootAsk():
            r = await stub.GetRoot(peer_pb2.RootRequest(), timeout=timeout_s)
            return msg.RootGive(r.digest, r.count)
        case msg.PartitionDigestsAsk():
            d = await stub.GetPartitionDigests(peer_pb2.PartitionDigestsRequest(),
                                               timeout=timeout_s)
            return msg.PartitionDigestsGive(tuple(zip(d.digests, d.counts, strict=True)))
        case msg.StudyDigestsAsk(partition, after, limit):
            s = await stub.GetStudyDigests(peer_pb2.StudyDigestsRequest(
                partition=partition, after=after, limit=limit), timeout=timeout_s)
            return msg.StudyDigestsGive(
                tuple((x.study_uid, x.digest, x.count) for x in s.studies), s.more)
        case msg.IdsAsk(studies):
            i = await stub.GetManifestIds(peer_pb2.ManifestIdsRequest(study_uids=studies),
                                          timeout=timeout_s)
            return msg.IdsGive(tuple(i.ids))
        case msg.ManifestsAsk(ids):
            b = await stub.GetManifests(peer_pb2.GetManifestsRequest(ids=ids), timeout=timeout_s)
            return msg.ManifestsGive(tuple(b.manifests), b.covered or len(ids))
        case msg.PartitionManifestsAsk(partition, after, limit):
            pm = await stub.GetPartitionManifests(peer_pb2.PartitionManifestsRequest(
                partition=partition, after=after, limit=limit), timeout=timeout_s)
            return msg.PartitionManifestsGive(tuple(pm.manifests), pm.last, pm.more)
        case msg.HeldRootAsk():
            h = await stub.GetHeldRoot(peer_pb2.HeldRootRequest(), timeout=timeout_s)
            return held_root_from_pb(h)
        case msg.HeldPartitionsAsk():
            hp = await stub.GetHeldPartitions(peer_pb2.HeldPartitionsRequest(),
                                              timeout=timeout_s)
            return msg.HeldPartitionsGive(tuple(zip(hp.digests, hp.counts, strict=True)))
        case msg.HeldStudiesAsk(partition, after, limit):
            hs = await stub.GetHeldStudies(peer_pb2.HeldStudiesRequest(
                partition=partition, after=after, limit=limit), timeout=timeout_s)
            return msg.HeldStudiesGive(
                tuple((x.study_uid, x.held_instances, x.held_digest) for x in hs.studies),
                hs.last, hs.more)
        case msg.StudyHoldingAsk(study_uid, nonce, chunks):
            g = await stub.GetHoldings(peer_pb2.HoldingsRequest(
                study_uids=[study_uid], nonce=nonce, challenge_chunks=chunks),
                timeout=timeout_s)
            for x in g.studies:
                if x.study_uid == study_uid:
                    return msg.StudyHoldingGive(g.node_id, x.held_instances, x.held_digest,
                                                x.replica, tuple(x.proofs))
            return msg.StudyHoldingGive(g.node_id, 0, b"", False)
    raise TypeError(f"no RPC for {request!r}")


WAITING_CHARS_MAX = 1000  # a peer's explanation, shown to operators


def held_root_from_pb(h: peer_pb2.HeldRoot) -> msg.HeldRootGive:
    return msg.HeldRootGive(h.digest, h.count, h.backlog_instances, h.backlog_bytes,
                            h.last_scrub_started_ms, h.backlog_oldest_ms, h.fetch_bytes_per_s,
                            h.waiting[:WAITING_CHARS_MAX])
