"""Bounded claims (issue 9, item 3): no single peer breaks safety, even one the
cluster lets in. Each attack measured against a three-node federation is made
again here, by a rogue gRPC client speaking the peer API to real nodes on
loopback, and must now change nothing that matters:

A. one manifest version stamped 2**64-1 announced to every node used to become
   the current version everywhere (its chunks exist nowhere: the study lost its
   held copies for good) and to break every later put until restart;
B. one gossip entry of a healthy node, dead at a fake address at the highest
   incarnation and heartbeat, used to mark it dead on every peer for good.

Plus, without processes: the receiving side of A (a far-future version is
refused, the genuine one stays current, an honestly fast clock is only delayed)
and of B in the gossip worker (impostors refused, peers' claimed clocks and
addresses kept bounded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from pacsmesh.cluster.gossip import (
    CLOCK_SKEW_SHOWN_MAX_S,
    REFUSALS_SHOWN_MAX,
    GossipWorker,
    me_as_member,
    new_membership,
)
from pacsmesh.cluster.membership import (
    COUNTER_MAX,
    INCARNATION_HEARSAY_STEP,
    ClusterSettings,
    GossipMessage,
    Member,
    MemberState,
    NodeId,
    Refused,
)
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.cluster.view import ClusterView
from pacsmesh.cluster.wire import gossip_from_pb, gossip_to_pb
from pacsmesh.node import manifest as mf
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.hlc import HLC_MAX, HybridClock, encode
from pacsmesh.node.retention import RetentionSection, fingerprint
from pacsmesh.node.store import Store
from pacsmesh.proto import peer_pb2, peer_pb2_grpc
from tests.catalogfill import Synth, manifest_of
from tests.clusterproc import (
    PARTITIONS,
    Cluster,
    Study,
    alert_codes,
    api_locate,
    api_status,
    holder_ids,
    make_study,
    started,
    states,
    wait_for,
)
from tests.nodeproc import cli

WALL_MS = 1_700_000_000_000
AHEAD_S = 300
RPC_TIMEOUT_S = 5.0
RECOVER_TIMEOUT_S = 10.0  # "within a few seconds"; generous for a loaded CI machine
WATCH_S = 3.0  # how long every node is watched for a false death after the forgery


# ---- A, in process: Replicator.accept_manifests --------------------------------------------


class Wall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def forged_version(raw: bytes, received_hlc: int) -> tuple[bytes, bytes]:
    """Another version of the same instance, whose one chunk exists nowhere."""
    m = mf.decode(raw)
    m.received_hlc = received_hlc
    m.origin_node = "rogue"
    del m.chunks[:]
    m.chunks.add(hash=content_hash(b"exists nowhere"), size=m.size)
    m.file_hash = content_hash(b"not the genuine file")
    return mf.encode(m)


def test_a_far_future_version_is_refused_and_the_genuine_one_stays_current(
        tmp_path: Path) -> None:
    wall = Wall(WALL_MS)
    store = Store(tmp_path / "d", partitions=PARTITIONS)
    pool = ThreadPoolExecutor(1)
    try:
        state = ClusterState("boston", PARTITIONS, 3, 250.0, 600.0)
        r = Replicator(store, state, Peers(), "boston", "127.0.0.1:1",
                       HybridClock(wall, max_ahead_ms=AHEAD_S * 1000), pool)
        data = b"the genuine instance"
        genuine = manifest_of(Synth("1.2.826.0.1.3680043.10.543.5", "P1", "P^1", "20240101",
                                    "CT", "A1", held=False), data, encode(WALL_MS - 60_000, 0))
        genuine_id, genuine_raw = mf.encode(genuine)
        assert r.accept_manifests([genuine_raw], "chicago") == 1
        sop = genuine.sop_instance_uid

        far = encode(WALL_MS + 100 * AHEAD_S * 1000, 0)  # past the bound, before year 9999
        forged_id, forged_raw = forged_version(genuine_raw, far)
        assert r.accept_manifests([forged_raw, forged_raw], "rogue") == 0
        assert store.catalog.versions_of(sop) == [genuine_id]
        assert not store.catalog.has(forged_id)
        assert r.future_refused == 2 and r.future_refusals["rogue"].count == 2
        assert r.clock.now() < encode(WALL_MS + 1, 0)  # the clock was not moved
        alerts = ClusterView(state, r, 3600.0).alerts()
        (alert,) = [a for a in alerts if a.code == "MANIFEST_FROM_FUTURE"]
        assert "from rogue" in alert.message and alert.severity == "warning"

        # a peer whose clock runs 60 s past the bound is delayed, not lost: anti-entropy
        # offers its version again, and it is taken once our clock has caught up
        fast_id, fast_raw = forged_version(genuine_raw, encode(WALL_MS + (AHEAD_S + 60) * 1000, 0))
        assert r.accept_manifests([fast_raw], "denver") == 0
        wall.ms += 61_000
        assert r.accept_manifests([fast_raw], "denver") == 1
        assert store.catalog.versions_of(sop) == [genuine_id, fast_id]  # the newest is current
    finally:
        pool.shutdown()
        store.close()


# ---- B, in process: the gossip worker ------------------------------------------------------


def test_gossip_worker_refuses_impostors_and_bounds_what_peers_claim() -> None:
    settings = ClusterSettings(3, 250.0, PARTITIONS, fingerprint(RetentionSection()))
    me = me_as_member("boston", "Boston", 42.36, -71.06, "127.0.0.1:1", 1)
    state = ClusterState("boston", PARTITIONS, 3, 250.0, 600.0)
    worker = GossipWorker(new_membership(me, settings, [], 1.0, None, 600.0), state, Peers(),
                          1.0, usage=lambda: (0, 0, 0))
    chicago = replace(me, node_id=NodeId("chicago"), site="Chicago", address="127.0.0.1:2",
                      heartbeat=1)

    def push(sender: str, wall_time_s: float) -> peer_pb2.GossipMessage:
        return gossip_to_pb(GossipMessage(NodeId(sender), "127.0.0.1:2", settings,
                                          (replace(chicago, node_id=NodeId(sender)),)),
                            wall_time_s)

    # the channel proved denver, the message says chicago: refused whole
    reply = worker.on_gossip(push("chicago", time.time()), authenticated="denver")
    assert not reply.has_message and worker.membership.get("chicago") is None
    assert "authenticated as 'denver'" in state.refusals["127.0.0.1:2"][1]
    assert state.clock_skew_s == {}
    # the same from chicago itself is taken; an absurd clock is shown clipped
    assert worker.on_gossip(push("chicago", 1e300), authenticated="chicago").has_message
    assert worker.membership.get("chicago") is not None
    assert 0 < state.clock_skew_s["chicago"] <= CLOCK_SKEW_SHOWN_MAX_S
    worker.on_gossip(push("chicago", float("nan")))
    assert 0 < state.clock_skew_s["chicago"] <= CLOCK_SKEW_SHOWN_MAX_S
    # refused peers name their own addresses: the table stays bounded
    worker.apply([Refused("rogue", f"10.0.0.{i}:7400", "x") for i in range(200)])
    assert len(state.refusals) == REFUSALS_SHOWN_MAX and "10.0.0.199:7400" in state.refusals


# ---- real nodes and a rogue client ---------------------------------------------------------


@dataclass
class Federation:
    cluster: Cluster
    study: Study
    pids: dict[str, int]
    workdir: Path

    def peer(self, address: str) -> peer_pb2_grpc.PeerApiStub:
        return peer_pb2_grpc.PeerApiStub(grpc.insecure_channel(address))

    def check_unharmed(self) -> None:
        """Every node runs the process it started with, and tells the truth."""
        for m in self.cluster.members:
            assert m.proc is not None and m.proc.poll() is None, f"{m.node_id} exited"
            assert m.proc.pid == self.pids[m.node_id], f"{m.node_id} restarted"
            located = api_locate(m.address, self.study.uid)
            assert located.safe and located.safe_copies == 3, (m.node_id, located)
            assert holder_ids(located) == {"boston", "chicago", "denver"}, located


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Boston, Chicago, Denver (pairwise > 250 miles), N=3, one study safe on all."""
    workdir = tmp_path_factory.mktemp("bounds")
    c = Cluster(workdir / "c")
    for node_id, city in (("boston", "Boston"), ("chicago", "Chicago"), ("denver", "Denver")):
        c.add(node_id, city, max_clock_ahead_s=AHEAD_S)
    with started(c):
        c.wait_converged()
        study = make_study(workdir / "in", 1, instances=3)
        res = cli("put", str(study.folder), "--wait-safe", "30", "--json",
                  node=c.members[0].address, timeout_s=90)
        assert res.returncode == 0, (res.stdout, res.stderr)
        pids = {m.node_id: m.proc.pid for m in c.members if m.proc is not None}
        yield Federation(c, study, pids, workdir)


def test_forged_max_hlc_version_changes_nothing(federation: Federation) -> None:
    c, study = federation.cluster, federation.study
    boston = c.members[0]
    ids = list(federation.peer(boston.address).GetManifestIds(
        peer_pb2.ManifestIdsRequest(study_uids=[study.uid]), timeout=RPC_TIMEOUT_S).ids)
    raws = federation.peer(boston.address).GetManifests(
        peer_pb2.GetManifestsRequest(ids=ids), timeout=RPC_TIMEOUT_S).manifests
    forged_id, forged_raw = forged_version(raws[0], HLC_MAX)
    batch = peer_pb2.ManifestBatch(manifests=[forged_raw], sender="rogue",
                                   sender_address="127.0.0.1:1")
    for m in c.members:
        reply = federation.peer(m.address).Announce(batch, timeout=RPC_TIMEOUT_S)
        assert reply.new_manifests == 0, m.node_id

    time.sleep(1.0)  # announce, fetch and anti-entropy rounds (every 0.2 s to 1 s here)
    # a 2**64-1 stamp is refused as malformed (past year 9999) before the clock bound
    for m in c.members:  # nobody stored it, so anti-entropy cannot spread it either
        known = federation.peer(m.address).GetManifestIds(
            peer_pb2.ManifestIdsRequest(study_uids=[study.uid]), timeout=RPC_TIMEOUT_S).ids
        assert sorted(known) == sorted(ids) and forged_id not in known, m.node_id
    federation.check_unharmed()

    # puts still work (they used to fail with ValueError until restart) ...
    more = make_study(federation.workdir / "in", 2, instances=2)
    res = cli("put", str(more.folder), "--wait-safe", "30", "--json", node=boston.address,
              timeout_s=90)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert json.loads(res.stdout)["safe"] == {more.uid: True}
    # ... and the genuine versions are what a restore returns
    out = federation.workdir / "restored"
    res = cli("get", study.uid, "--out", str(out), node=c.members[2].address, timeout_s=60)
    assert res.returncode == 0, (res.stdout, res.stderr)
    study.check_restored(out)


def test_forged_gossip_of_a_dead_node_changes_nothing(federation: Federation) -> None:
    c = federation.cluster
    boston, chicago, _ = c.members
    settings = ClusterSettings(3, 250.0, PARTITIONS, fingerprint(RetentionSection()))
    rogue = NodeId("rogue")
    # The rogue reads the table like any member: its empty push is answered in full.
    hello = gossip_to_pb(GossipMessage(rogue, "127.0.0.1:1", settings, ()), time.time())
    reply = federation.peer(boston.address).Gossip(hello, timeout=RPC_TIMEOUT_S)
    table = {r.node_id: r for r in gossip_from_pb(reply.message).members}
    genuine: Member = table[NodeId("chicago")]
    elsewhere = {"address": "127.0.0.1:9", "site": "Nowhere", "lat": 0.0, "lon": 0.0}
    forgeries = [
        # the entry of the issue: dead, elsewhere, at the highest version
        replace(genuine, incarnation=COUNTER_MAX, heartbeat=COUNTER_MAX,
                state=MemberState.DEAD, **elsewhere),  # type: ignore[arg-type]
        # the strongest the bounds still let through as news: one hearsay step up
        replace(genuine, incarnation=genuine.incarnation + INCARNATION_HEARSAY_STEP,
                heartbeat=genuine.heartbeat + 50, state=MemberState.DEAD,
                **elsewhere),  # type: ignore[arg-type]
        replace(genuine, incarnation=genuine.incarnation + INCARNATION_HEARSAY_STEP,
                heartbeat=genuine.heartbeat + 50, state=MemberState.ALIVE,
                **elsewhere),  # type: ignore[arg-type]
    ]
    for forgery in forgeries:
        message = gossip_to_pb(GossipMessage(rogue, "127.0.0.1:1", settings, (forgery,)),
                               time.time())
        for m in c.members:
            federation.peer(m.address).Gossip(message, timeout=RPC_TIMEOUT_S)
    forged_at = time.monotonic()

    def truthful() -> bool:
        for m in c.members:
            status = api_status(m.address)
            seen = {n.id: n for n in status.nodes}
            assert set(states(status).values()) == {"alive"}, (m.node_id, states(status))
            assert seen["chicago"].address == chicago.address, (m.node_id, seen["chicago"])
            assert seen["chicago"].site == "Chicago", (m.node_id, seen["chicago"])
            codes = alert_codes(status)
            assert "NODE_DEAD" not in codes and "NODE_SUSPECT" not in codes, (m.node_id, codes)
        return True

    wait_for(truthful, RECOVER_TIMEOUT_S, "chicago alive at its own address on every node")
    print(f"every node sees chicago alive where it is {time.monotonic() - forged_at:.2f} s "
          "after the forgery")
    # and it stays so: no node declares it dead a few rounds later either
    deadline = time.monotonic() + WATCH_S
    while time.monotonic() < deadline:
        truthful()
        time.sleep(0.2)
    federation.check_unharmed()
