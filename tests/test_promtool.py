"""The alert rules and the dashboard's queries, checked by Prometheus's own tool
(promtool, from Debian's prometheus package): the rules load, their unit tests
(deploy/prometheus/alerts_test.yml) fire the right alerts at the right time with
the right text, and every PromQL query of the Grafana dashboard parses. The
node's exposition passes promtool's lint in tests/test_metrics.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "pacsmesh-dashboard.json"
# Grafana's variables, as Grafana would substitute them before Prometheus sees a query
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                     "${datasource}": "prometheus", "$instance": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (./dev test installs Debian's prometheus "
                    "package as root)")
    return path


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def test_alert_rules_load_and_their_unit_tests_pass() -> None:
    checked = _run("check", "rules", "alerts.yml", cwd=RULES_DIR)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run("test", "rules", "alerts_test.yml", cwd=RULES_DIR)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_a_wrong_expectation_fails_the_rule_tests(tmp_path: Path) -> None:
    """The unit tests can fail: the same file expecting the wrong summary does."""
    (tmp_path / "alerts.yml").write_text((RULES_DIR / "alerts.yml").read_text())
    text = (RULES_DIR / "alerts_test.yml").read_text().replace("fills up in 10d", "fills up in 9d")
    (tmp_path / "alerts_test.yml").write_text(text)
    assert _run("test", "rules", "alerts_test.yml", cwd=tmp_path).returncode != 0


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out += _panels(p.get("panels", []))
    return out


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    assert len(exprs) >= 30
    rules = []
    for i, query in enumerate(exprs):
        expr = query
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in re.sub(r"\{\{.*?\}\}", "", expr), query  # a variable left over
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _run("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    # and a broken query would be caught
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "x:y", "expr": "sum(rate(pacsmesh_grpc_requests_total[1m])"}]}]}))
    assert _run("check", "rules", str(path)).returncode != 0
