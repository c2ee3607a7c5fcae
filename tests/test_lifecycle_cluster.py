"""A study's whole life across real node processes: ingest, replication, legal hold,
expiry, deletion everywhere, no resurrection, space given back; and a migrated
archive of past-dated studies that nothing deletes unless asked.

The nodes share one wall-clock offset (tests/faultclock.py: an LD_PRELOAD shim, no
change to pacsmesh), so "a year later" is a jump, not a wait. Monotonic clocks are
untouched, as on a real machine whose date is stepped.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from pacsmesh.sample import StudySpec, study_uid, write_study
from tests import faultclock
from tests.clusterproc import Cluster, started, wait_for
from tests.nodeproc import NodeProc, cli, cli_json

CITIES = (("boston", "Boston"), ("chicago", "Chicago"), ("seattle", "Seattle"))
RETENTION = {"default_years": 7, "by_modality": {"MG": 10}, "minor_until_age": 21,
             "grace_days": 30}
GC = {"loose_grace_s": 0.0, "expiry_check_s": 0.5, "interval_s": 1e9, "seal_min_dead_mb": 0.0,
      "compact_below": 0.99}
DAY_S = 86_400.0


def _years_ago(years: int) -> str:
    today = dt.datetime.now(dt.UTC).date()
    return today.replace(year=today.year - years).strftime("%Y%m%d")


def _study(root: Path, index: int, **spec: Any) -> tuple[str, Path]:
    s = StudySpec(study_index=index, instances=3, rows=96, columns=96, seed=41, air_noise=12,
                  **spec)
    folder = root / f"study-{index}"
    write_study(folder, s)
    return study_uid(s), folder


def _uids(node: NodeProc, *args: str) -> set[str]:
    return {d["study_uid"] for d in cli_json("ls", "--all", *args, node=node.address)["studies"]}


def _retention(node: NodeProc, uid: str) -> dict[str, Any]:
    return cli_json("retention", uid, node=node.address)


def _audit(node: NodeProc, uid: str) -> list[tuple[str, str]]:
    doc = cli_json("audit", "--study", uid, node=node.address)
    return [(e["action"], e["outcome"]) for e in doc["events"]]


def _cluster(tmp: Path, retention: dict[str, Any], clock: faultclock.Clock | None,
             lib: Path | None, copies: int = 3) -> Cluster:
    c = Cluster(tmp)
    for node_id, city in CITIES:
        m = c.add(node_id, city, copies=copies)
        m.extra["retention"] = retention
        m.extra["gc"] = GC
        if clock is not None and lib is not None:
            m.env = clock.env(lib)
    return c


def _wait_safe(node: NodeProc, uids: set[str], copies: int) -> None:
    def safe() -> bool:
        got = {d["study_uid"]: d["safe_copies"]
               for d in cli_json("ls", "--all", node=node.address)["studies"]}
        return all(got.get(u, 0) >= copies for u in uids)
    wait_for(safe, 60, f"{len(uids)} studies safe with {copies} copies", interval_s=0.5)


def test_a_study_lives_is_held_expires_and_is_deleted_everywhere(tmp_path: Path) -> None:
    lib = faultclock.shim()
    if lib is None:
        pytest.skip("no C compiler for the wall-clock shim (apt install gcc libc6-dev)")
    clock = faultclock.Clock(tmp_path / "clock")
    c = _cluster(tmp_path, {**RETENTION, "delete_expired": True}, clock, lib)
    six = _years_ago(6)
    plain, plain_dir = _study(tmp_path, 1, study_date=six)  # expires in ~1 year
    mammo, mammo_dir = _study(tmp_path, 2, study_date=six, modality="MG")  # in ~4 years
    held, held_dir = _study(tmp_path, 3, study_date=six)  # as `plain`, under a legal hold
    child, child_dir = _study(tmp_path, 4, study_date=six, birth_date="20150101")  # to 2036
    boston, chicago, seattle = c.members
    with started(c):
        c.wait_converged()
        res = cli("put", str(plain_dir), str(mammo_dir), str(held_dir), str(child_dir),
                  "--json", node=boston.address)
        assert res.returncode == 0, res.stderr
        every = {plain, mammo, held, child}
        _wait_safe(boston, every, 3)
        doc = _retention(chicago, plain)
        assert doc["state"] == "kept" and doc["expires"] == (
            f"{int(six[:4]) + 7}-{six[4:6]}-{six[6:]}"), doc
        assert "+ 10 years (MG)" in _retention(seattle, mammo)["rule"]
        assert _retention(boston, child)["rule"].startswith("minor: born 2015-01-01")

        # write once until expiry: asking to delete now is refused, and audited
        res = cli("delete", plain, "--reason", "tidy up", node=boston.address)
        assert res.returncode == 1 and "kept until" in res.stderr, res.stderr
        assert ("delete", "refused") in _audit(boston, plain)

        # a legal hold placed at one node reaches every node
        res = cli("hold", held, "--reason", "litigation 2026-114", node=seattle.address)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: all(_retention(n, held)["held"] for n in c.members), 20,
                 "the hold on every node")
        assert ("hold", "ok") in _audit(seattle, held)

        # seattle is away while the year passes; the others delete what expired
        seattle.stop()
        clock.set(400 * DAY_S)
        for node in (boston, chicago):
            wait_for(lambda node=node: plain not in _uids(node), 60,  # type: ignore[misc]
                     f"{node.node_id} to delete the expired study")
            assert _retention(node, plain)["state"] == "deleted"
            assert ("expire", "ok") in _audit(node, plain)
        for node in (boston, chicago):
            assert {mammo, held, child} <= _uids(node)  # kept: MG, held, a minor
            assert _retention(node, held)["state"] == "deletable"  # by date: held wins

        # seattle comes back holding the study; it deletes it too, and it never returns
        seattle.start()
        c.wait_converged()
        wait_for(lambda: plain not in _uids(seattle), 60, "seattle to delete it as well")
        deadline = time.monotonic() + 8  # anti-entropy runs ~every second: many rounds
        while time.monotonic() < deadline:
            for node in c.members:
                assert plain not in _uids(node), f"{node.node_id} resurrected {plain}"
            time.sleep(0.5)

        # re-sending it adds nothing: deleted studies are not stored again
        res = cli("put", str(plain_dir), "--json", node=chicago.address)
        assert res.returncode == 1 and "deleted here" in res.stdout, res.stdout

        # released, the held study goes everywhere at the next check
        res = cli("release", held, "--reason", "case closed", node=boston.address)
        assert res.returncode == 0, res.stderr
        for node in c.members:
            wait_for(lambda node=node: held not in _uids(node), 60,  # type: ignore[misc]
                     f"{node.node_id} to delete the released study")
        assert ("release", "ok") in _audit(boston, held)

        # the space comes back: every node's GC frees the deleted studies' packs
        for node in c.members:
            before = cli_json("gc", node=node.address)
            assert before["loose_chunks"] > 0, before
            after = _gc_pass(node)
            # chicago's refused re-send named the deleted study's chunks (an upload's
            # precheck): GC spares chunks an ingest relies on for an hour
            spared = 6 if node is chicago else 0
            assert after["loose_chunks"] == spared and after["reclaimed_bytes"] > 0, after
            assert after["pack_bytes"] < before["pack_bytes"], (before, after)
            assert after["studies_deleted"] == 2, after
        for node in c.members:  # what is kept is all there, and safe
            assert _uids(node) == {mammo, child}
        _wait_safe(boston, {mammo, child}, 3)


def _gc_pass(node: NodeProc) -> dict[str, Any]:
    asked = time.monotonic()
    cli_json("gc", "--now", node=node.address)

    def done() -> dict[str, Any] | None:
        doc = cli_json("gc", node=node.address)
        age = doc["last_pass_completed_age_s"]
        return doc if not doc["running"] and 0 <= age < time.monotonic() - asked else None
    return wait_for(done, 60, f"a gc pass on {node.node_id}", interval_s=0.3)


def test_a_migrated_archive_keeps_its_expired_studies_until_asked(tmp_path: Path) -> None:
    """Studies dated long ago arrive (a migration): with delete_expired off they are
    reported, never deleted, until an operator asks, and not before grace_days after
    they arrived (a wrong or ancient date never makes a fresh arrival deletable); then
    they go everywhere."""
    lib = faultclock.shim()
    if lib is None:
        pytest.skip("no C compiler for the wall-clock shim (apt install gcc libc6-dev)")
    clock = faultclock.Clock(tmp_path / "clock")
    c = _cluster(tmp_path, RETENTION, clock, lib)
    old, old_dir = _study(tmp_path, 1, study_date="20080315")  # expired in 2015
    recent, recent_dir = _study(tmp_path, 2, study_date=_years_ago(1))
    boston, chicago, _ = c.members
    with started(c):
        c.wait_converged()
        res = cli("put", str(old_dir), str(recent_dir), "--json", node=boston.address)
        assert res.returncode == 0, res.stderr
        _wait_safe(boston, {old, recent}, 3)
        for node in c.members:
            assert _uids(node, "--expired") == {old}
        res = cli("delete", old, "--reason", "too soon", node=chicago.address)
        assert res.returncode == 1 and "kept until" in res.stderr, res.stderr  # arrived today
        clock.set(31 * DAY_S)
        time.sleep(3)  # six expiry checks: nothing is deleted
        for node in c.members:
            assert _uids(node) == {old, recent}
            doc = _retention(node, old)
            assert doc["state"] == "deletable" and doc["delete_expired"] is False
        res = cli("delete", recent, "--reason", "mistake", node=chicago.address)
        assert res.returncode == 1, res.stdout
        res = cli("delete", old, "--reason", "retention expired, board decision 12",
                  node=chicago.address)
        assert res.returncode == 0, res.stderr
        for node in c.members:
            wait_for(lambda node=node: _uids(node) == {recent}, 60,  # type: ignore[misc]
                     f"{node.node_id} to delete what the operator asked")
        assert ("delete", "ok") in _audit(chicago, old)
        assert ("delete", "refused") in _audit(chicago, recent)
