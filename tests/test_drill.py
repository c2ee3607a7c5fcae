"""Restore drills on a real three-site cluster (Boston, Chicago, Denver; 3 copies).

`pacsmesh drill` restores random studies from nodes other than the one asked and
verifies every byte; a drill that cannot restore (the other copies damaged, or no
other holder alive) fails with a reason, exit 1 and a DRILL_FAILED alert; a node
with [drill] interval_s runs drills by itself and shows the last one in status.

The tests share one cluster and run in file order: the last two damage it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.clusterproc import Cluster, Study, alert_codes, make_study, started, states, wait_for
from tests.nodeproc import cli, cli_json
from tests.test_scrub import (
    RECORD_HEAD_LEN,
    SITES,
    all_records,
    flip_byte,
    put_safe,
    three_sites,
)

DRILL_INTERVAL_S = 2.0
# no scrub pass during these tests: damage must stay damage while the drills run
QUIET_SCRUB = {"rate_mb_s": 100.0, "interval_s": 3600.0}
CITY = dict(SITES)


class Drilled:
    def __init__(self, cluster: Cluster, studies: list[Study]) -> None:
        self.cluster = cluster
        self.studies = {s.uid: s for s in studies}

    def bytes_of(self, uid: str) -> int:
        return sum(p.stat().st_size for p in self.studies[uid].folder.rglob("*.dcm"))


@pytest.fixture(scope="module")
def drilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drilled]:
    root = tmp_path_factory.mktemp("drill")
    c = three_sites(root / "c", scrub=QUIET_SCRUB)
    c.by_id("denver").extra["drill"] = {"interval_s": DRILL_INTERVAL_S, "count": 1}
    studies = [make_study(root / "in", i, instances=5) for i in (1, 2)]
    with started(c):
        c.wait_converged()
        for s in studies:
            put_safe(c.by_id("boston"), s)
        yield Drilled(c, studies)


def drill(address: str, count: int, expect_code: int) -> list[dict[str, Any]]:
    res = cli("drill", "--count", str(count), "--json", node=address, timeout_s=120)
    assert res.returncode == expect_code, (res.returncode, res.stdout, res.stderr)
    results: list[dict[str, Any]] = json.loads(res.stdout)["results"]
    return results


def check_ok(d: Drilled, result: dict[str, Any], asked: str) -> None:
    assert result["ok"] is True and result["error"] == "", result
    assert result["source_node"] in CITY and result["source_node"] != asked, result
    assert result["source_site"] == CITY[result["source_node"]], result
    uid = result["study_uid"]
    assert uid in d.studies, result
    assert result["instances"] == d.studies[uid].instances, result
    assert result["bytes"] == d.bytes_of(uid), result
    assert result["seconds"] > 0 and result["mb_s"] > 0, result
    assert abs(result["mb_s"] - result["bytes"] / 1e6 / result["seconds"]) < 0.01 * result[
        "mb_s"], result


def test_drill_restores_from_other_sites_and_verifies(drilled: Drilled) -> None:
    boston = drilled.cluster.by_id("boston")
    results = drill(boston.address, 2, expect_code=0)
    print(results)
    assert len(results) == 2, results
    assert {r["study_uid"] for r in results} == set(drilled.studies), results
    for r in results:
        check_ok(drilled, r, "boston")
    status = cli_json("status", node=boston.address)
    last = status["last_drill"]
    assert sorted((r["study_uid"], r["source_node"], r["ok"]) for r in last) == sorted(
        (r["study_uid"], r["source_node"], r["ok"]) for r in results), status
    assert len({r["at_s"] for r in last}) == 1 and abs(last[0]["at_s"] - time.time()) < 60
    assert "DRILL_FAILED" not in alert_codes(status), status
    human = cli("drill", node=boston.address, timeout_s=120)
    assert human.returncode == 0 and human.stdout.startswith("OK "), human.stdout
    assert "every byte verified" in human.stdout, human.stdout


def test_scheduled_drills_show_in_status(drilled: Drilled) -> None:
    """Nobody runs `drill` against denver; its [drill] interval_s = 2 schedule does."""
    denver = drilled.cluster.by_id("denver")
    seen: list[float] = []

    def fresh_ok_drill() -> dict[str, Any]:
        status = cli_json("status", node=denver.address)
        last = status["last_drill"]
        assert len(last) == 1 and last[0]["ok"], status
        if not seen or seen[-1] != last[0]["at_s"]:
            seen.append(last[0]["at_s"])
        assert len(seen) >= 2, seen  # one drill after another, by the schedule alone
        assert "DRILL_FAILED" not in alert_codes(status), status
        return dict(last[0])

    result = wait_for(fresh_ok_drill, 8 * DRILL_INTERVAL_S + 10, "two scheduled drills", 0.5)
    check_ok(drilled, result, "denver")
    assert seen[-1] - seen[-2] >= DRILL_INTERVAL_S * 0.9, seen


def test_drill_fails_when_other_copies_are_damaged(drilled: Drilled) -> None:
    """Every chunk at Chicago and Denver damaged: they answer 'damaged here', never the
    bytes, so Boston's drills fail with that reason."""
    c = drilled.cluster
    rng = random.Random("drill-damage")
    for node_id in ("chicago", "denver"):
        for rec in all_records(c.by_id(node_id)):
            flip_byte(rec.pack, rec.offset + RECORD_HEAD_LEN
                      + rng.randrange(rec.length - RECORD_HEAD_LEN))
    boston = c.by_id("boston")
    results = drill(boston.address, 2, expect_code=1)
    print(results)
    assert len(results) == 2 and not any(r["ok"] for r in results), results
    for r in results:
        assert r["source_node"] in ("chicago", "denver"), r
        assert r["study_uid"] in drilled.studies, r
        assert r["error"].startswith(f"restore from {r['source_node']} failed"), r
        assert "not served (damaged here)" in r["error"], r
        assert r["mb_s"] == 0, r
    status = cli_json("status", node=boston.address)
    alert = next((a for a in status["alerts"] if a["code"] == "DRILL_FAILED"), None)
    assert alert is not None and alert["severity"] == "critical", status
    assert "failed for 2 studies" in alert["message"], alert
    assert not any(r["ok"] for r in status["last_drill"]), status
    human = cli("drill", node=boston.address, timeout_s=120)
    assert human.returncode == 1 and human.stdout.startswith("FAIL "), human.stdout


def test_drill_fails_without_another_alive_holder(drilled: Drilled) -> None:
    c = drilled.cluster
    boston = c.by_id("boston")
    c.by_id("chicago").kill()
    c.by_id("denver").kill()

    def others_not_alive() -> bool:
        seen = states(cli_json("status", node=boston.address))
        assert seen["chicago"] != "alive" and seen["denver"] != "alive", seen
        return True

    wait_for(others_not_alive, 15, "boston to stop seeing chicago and denver alive")
    results = drill(boston.address, 2, expect_code=1)
    assert len(results) == 1, results
    assert results[0]["ok"] is False and results[0]["study_uid"] == "", results
    assert results[0]["error"] == "no study has a verified copy on another alive node", results
    status = cli_json("status", node=boston.address)
    assert "DRILL_FAILED" in alert_codes(status), status
    assert [r["error"] for r in status["last_drill"]] == [results[0]["error"]], status
