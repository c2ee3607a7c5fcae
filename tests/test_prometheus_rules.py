"""The shipped alert rules parse and name only metrics a real node exports."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import yaml

from tests.nodeproc import NodeProc, free_port

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


def test_every_rule_names_metrics_a_node_exports(tmp_path: Path) -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 8
    listen = f"127.0.0.1:{free_port()}"
    node = NodeProc(tmp_path, extra={"metrics": {"listen": listen}})
    node.start()
    try:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        # every family, with or without samples yet (no drill has run on a fresh node)
        exported = {m[1] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}
        exported |= {f"{name}_total" for name in exported}
    finally:
        node.stop()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["action"], rule  # every alert says what to do
        for name in re.findall(r"\bpacsmesh_[a-z_]+", rule["expr"]):
            assert name in exported, (rule["alert"], name, sorted(exported))
