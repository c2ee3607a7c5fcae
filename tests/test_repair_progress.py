"""Re-protection progress as status reports it: rate, time left, and the stall alarm
(fresh ingest still replicating is not a stall; a backlog that stopped moving is)."""

from __future__ import annotations

from pathlib import Path

from cluster.progress import SAMPLE_EVERY_S, RepairTracker
from tests.clusterproc import Cluster, api_status, make_study, started, wait_for
from tests.nodeproc import cli

WINDOW_S = 300.0


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
