"""Re-protection progress as status reports it: rate, time left, and the stall alarm
(fresh ingest still replicating is not a stall; a backlog that stopped moving is)."""

from __future__ import annotations

from pathlib import Path

from pacsmesh.cluster.placement import PlacementNode
from pacsmesh.cluster.progress import SAMPLE_EVERY_S, RepairTracker
from tests import bulkload
from tests.clusterproc import (
    CITIES,
    PARTITIONS,
    Cluster,
    api_status,
    make_study,
    started,
    wait_for,
)
from tests.nodeproc import cli

WINDOW_S = 300.0
CAPACITY = 1 << 40  # equal, a power of two: the bulk load's placement is the nodes' own
BULK_STUDIES = 3000


def feed(t: RepairTracker, start: float, end: float, unsafe: int, backlog: int,
         falling_per_s: float = 0.0) -> tuple[int, int]:
    now = start
    while now <= end:
        u = max(0, int(unsafe - falling_per_s * (now - start)))
        b = max(0, int(backlog - falling_per_s * 1000 * (now - start)))
        t.add(now, u, b)
        now += SAMPLE_EVERY_S
    return u, b


def test_progress_has_a_rate_and_an_eta() -> None:
    t = RepairTracker(WINDOW_S)
    u, b = feed(t, 0.0, 600.0, 5000, 5_000_000, falling_per_s=2.0)
    p = t.progress(600.0, u, b, oldest_unsafe_age_s=900.0)
    assert not p.stalled
    assert 1.5 < p.studies_per_s < 2.5 and 1500 < p.bytes_per_s < 2500
    assert abs(p.eta_s - b / p.bytes_per_s) < 1.0


def test_a_backlog_that_stopped_moving_is_a_stall() -> None:
    t = RepairTracker(WINDOW_S)
    u, b = feed(t, 0.0, 200.0, 320, 4_000_000, falling_per_s=0.05)
    feed(t, 200.0, 700.0, u, b)  # nothing decreases for 500 s
    p = t.progress(700.0, u, b, oldest_unsafe_age_s=900.0)
    assert p.stalled and p.eta_s == -1.0


def test_fresh_ingest_is_not_a_stall() -> None:
    t = RepairTracker(WINDOW_S)
    feed(t, 0.0, 700.0, 10, 1000)  # ten fresh studies, never older than a minute
    assert not t.progress(700.0, 10, 1000, oldest_unsafe_age_s=60.0).stalled


def test_nothing_watched_long_enough_is_not_a_stall() -> None:
    t = RepairTracker(WINDOW_S)
    feed(t, 0.0, 100.0, 50, 0)
    assert not t.progress(100.0, 50, 0, oldest_unsafe_age_s=10_000.0).stalled
    feed(t, 105.0, 400.0, 50, 0)  # nobody thinks it should fetch: a stall
    assert t.progress(400.0, 50, 0, oldest_unsafe_age_s=10_000.0).stalled


def test_done_is_done() -> None:
    t = RepairTracker(WINDOW_S)
    feed(t, 0.0, 400.0, 0, 0)
    p = t.progress(400.0, 0, 0, oldest_unsafe_age_s=0.0)
    assert p.eta_s == 0.0 and not p.stalled


def test_status_raises_repair_stalled_when_no_site_can_take_the_copies(
        tmp_path: Path) -> None:
    """Three sites, copies 3: when one dies nothing can re-create its copies. Status
    must say so (REPAIR_STALLED, and NODE_DEAD saying STALLED), not that copies are
    being re-created."""
    c = Cluster(tmp_path / "c")
    for node_id, city in (("boston", "Boston"), ("chicago", "Chicago"), ("denver", "Denver")):
        c.add(node_id, city, repair_stalled_after_s=3.0)
    study = make_study(tmp_path / "in", 1, instances=2)
    with started(c):
        c.wait_converged()
        boston = c.by_id("boston")
        res = cli("put", str(study.folder), "--wait-safe", "30", node=boston.address)
        assert res.returncode == 0, res.stderr
        c.by_id("denver").kill()

        def stalled() -> bool:
            st = api_status(boston.address)
            assert st.unsafe_studies == 1 and st.repair.stalled, st.repair
            dead = [a.message for a in st.alerts if a.code == "NODE_DEAD"]
            assert dead and "STALLED" in dead[0], dead
            return "REPAIR_STALLED" in {a.code for a in st.alerts}

        wait_for(stalled, 60, "status to say re-protection is stalled")


def _loaded_cluster(tmp_path: Path, studies: int) -> Cluster:
    """Boston, Denver, Seattle (copies 3), each data dir holding `studies` studies."""
    c = Cluster(tmp_path / "c")
    for node_id, city in (("boston", "Boston"), ("denver", "Denver"), ("seattle", "Seattle")):
        c.add(node_id, city, node={"capacity_bytes": CAPACITY})
    nodes = [PlacementNode(m.node_id, m.site, *CITIES[m.site], CAPACITY) for m in c.members]
    replicas = bulkload.replica_sets(nodes, PARTITIONS, 3, 250.0)
    for m in c.members:
        bulkload.load(m.data_dir, m.node_id, studies, replicas, PARTITIONS)
    return c


def test_a_restart_right_after_puts_leaves_no_stale_verdict(tmp_path: Path) -> None:
    """Studies put and replicated while the node stops: what their safety depends on
    changed just before the stop, and the request to judge them again must survive it
    (status once kept one study unsafe for good after such a restart)."""
    c = _loaded_cluster(tmp_path, BULK_STUDIES)
    with started(c):
        c.wait_converged(60)
        boston = c.by_id("boston")

        def all_safe(expected: int) -> bool:
            st = api_status(boston.address)
            assert st.studies == expected and st.unsafe_studies == 0, (st.studies,
                                                                       st.unsafe_studies)
            return True

        wait_for(lambda: all_safe(BULK_STUDIES), 120, "the archive to be judged safe")
        for i in range(5):
            study = make_study(tmp_path / "in", i, instances=6)
            assert cli("put", str(study.folder), node=boston.address).returncode == 0
        assert boston.proc is not None
        boston.proc.terminate()
        boston.proc.wait(30)
        boston.start()
        wait_for(lambda: all_safe(BULK_STUDIES + 5), 60, "every study safe after the restart")


def test_a_stop_while_judging_leaves_no_stale_verdict(tmp_path: Path) -> None:
    """SIGTERM while the node is still judging a freshly loaded archive: verdicts
    stored during the shutdown (when the node itself has 'left') must not count its
    own copies out, or they stay unsafe after the restart."""
    c = _loaded_cluster(tmp_path, 20_000)
    with started(c):
        boston = c.by_id("boston")
        wait_for(lambda: api_status(boston.address).repair.judging > 0, 30,
                 "boston to be judging the archive")
        assert boston.proc is not None
        boston.proc.terminate()
        boston.proc.wait(30)
        boston.start()

        def settled() -> bool:
            st = api_status(boston.address)
            assert st.repair.judging == 0 and st.unsafe_studies == 0, (
                st.repair.judging, st.unsafe_studies)
            return True

        wait_for(settled, 180, "every study judged safe after the restart")


def test_a_node_counts_its_own_copies_while_it_shuts_down(tmp_path: Path) -> None:
    """Our own member record says 'left' from the moment shutdown begins, while the
    safety worker may still store verdicts; those must still count our copies."""
    from concurrent.futures import ThreadPoolExecutor

    from pacsmesh.cluster.membership import Member, MemberState, NodeId
    from pacsmesh.cluster.peers import Peers
    from pacsmesh.cluster.safetybook import SafetyWorker
    from pacsmesh.cluster.state import ClusterState
    from pacsmesh.cluster.transfer import Replicator
    from pacsmesh.node.hlc import HybridClock
    from pacsmesh.node.store import Store

    store = Store(tmp_path / "d", partitions=PARTITIONS)
    pool = ThreadPoolExecutor(1)
    try:
        state = ClusterState("boston", PARTITIONS, 3, 250.0, 600.0)
        lat, lon = CITIES["Boston"]
        me = Member(NodeId("boston"), "Boston", lat, lon, "127.0.0.1:1", CAPACITY, 0, 0, 1, 0,
                    MemberState.LEFT)
        state.publish((me,), {"boston": 0.0})
        r = Replicator(store, state, Peers(), "boston", "127.0.0.1:1", HybridClock(), pool)
        worker = SafetyWorker(r, 300.0, 1.0)
        assert worker._positions()["boston"].alive
    finally:
        pool.shutdown()
        store.close()
