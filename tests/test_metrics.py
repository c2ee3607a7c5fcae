"""Prometheus metrics scraped from a real node process: the exposition parses, names
follow Prometheus conventions, and the figures move when the node's state does,
by what was done to it: gRPC calls, a put, real DICOM traffic (dcmtk's echoscu and
storescu, which take fast_store.py's path, and pynetdicom as a query SCU, which
takes pynetdicom's). The shipped Grafana dashboard and alert rules name only
what such a node exports.

One node for the module: each test compares scrapes before and after its own
traffic, and nothing else talks to the node in between."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pynetdicom import AE

from pacsmesh.proto import node_pb2, node_pb2_grpc
from tests.clusterproc import make_study, wait_for
from tests.conftest import require_tool
from tests.dicomproc import dcmtk_env
from tests.nodeproc import NodeProc, cli, cli_json, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pacsmesh-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
NODE_API = "pacsmesh.node.NodeApi"
ALLOWED_AETS = ["STORESCU", "ECHOSCU", "METRICS"]
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass
class Metered:
    node: NodeProc
    listen: str  # [metrics] listen
    dicom_port: int
    workdir: Path


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    workdir = tmp_path_factory.mktemp("metrics")
    listen, dicom_port = f"127.0.0.1:{free_port()}", free_port()
    node = NodeProc(workdir, extra={
        "metrics": {"listen": listen}, "cluster": {"copies": 1},
        "dicom": {"listen": f"127.0.0.1:{dicom_port}", "allowed_calling_aets": ALLOWED_AETS}})
    node.start()
    try:
        yield Metered(node, listen, dicom_port, workdir)
    finally:
        node.stop()


def _exposition(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
    return text


def _scrape(address: str) -> dict[str, float]:
    """Sample name{labels sorted} -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(_exposition(address)):
        assert family.name.startswith("pacsmesh_"), family.name
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_a_real_node_is_scraped_and_its_figures_move(metered: Metered) -> None:
    node, listen = metered.node, metered.listen
    study = make_study(metered.workdir / "put", 1, instances=5)
    before = _scrape(listen)
    assert before["pacsmesh_node_state{node=n1,site=Boston,state=alive}"] == 1
    assert before["pacsmesh_node_info{node=n1,site=Boston}"] == 1
    assert "pacsmesh_manifests_committed_total" in before  # counters end in _total
    assert "pacsmesh_scrub_chunks_verified_total" in before
    assert "pacsmesh_gc_reclaimed_bytes_total" in before
    assert before["pacsmesh_disk_capacity_bytes"] >= before["pacsmesh_disk_used_bytes"] > 0
    res = cli("put", str(study.folder), "--json", node=node.address)
    assert res.returncode == 0, res.stderr

    def moved() -> dict[str, float] | None:
        after = _scrape(listen)
        ok = (after["pacsmesh_instances"] == before["pacsmesh_instances"] + 5
              and after["pacsmesh_studies"] == before["pacsmesh_studies"] + 1
              and after["pacsmesh_safe_studies"] == before["pacsmesh_safe_studies"] + 1)
        return after if ok else None
    after = wait_for(moved, 20, "the scrape to show the study, safe")
    assert (after["pacsmesh_manifests_committed_total"]
            >= before["pacsmesh_manifests_committed_total"] + 5)
    assert after["pacsmesh_chunk_bytes"] > before["pacsmesh_chunk_bytes"]
    assert after["pacsmesh_node_used_bytes{node=n1}"] > 0
    assert after["pacsmesh_unsafe_studies"] == 0
    # what the client sent, counted as it arrived
    sent = sum(p.stat().st_size for p in study.folder.rglob("*") if p.is_file())
    assert _delta(before, after, "pacsmesh_ingest_instances_total{outcome=stored,via=put}") == 5
    assert _delta(before, after, "pacsmesh_ingest_bytes_total{via=put}") == sent
    assert _delta(before, after, "pacsmesh_ingest_instances_total{outcome=stored,via=c-store}") == 0
    ingests = f"pacsmesh_grpc_requests_total{{code=OK,method=Ingest,service={NODE_API}}}"
    assert _delta(before, after, ingests) >= 1


def test_grpc_calls_are_counted_by_method_and_code(metered: Metered) -> None:
    listen = metered.listen
    before = _scrape(listen)
    with metered.node.channel() as ch:
        stub = node_pb2_grpc.NodeApiStub(ch)
        for _ in range(3):
            stub.Status(node_pb2.StatusRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as bad:  # aborted by the handler
            stub.Locate(node_pb2.LocateRequest(study_uid="not a uid"), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:  # a stream aborted before its first
            list(stub.GetStudy(node_pb2.GetStudyRequest(study_uid="1.2.3.4"), timeout=10))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        study = make_study(metered.workdir / "get", 2, instances=2)
        cli("put", str(study.folder), node=metered.node.address, check=True)
        messages = list(stub.GetStudy(node_pb2.GetStudyRequest(study_uid=study.uid),
                                      timeout=30))
        assert sum(m.WhichOneof("kind") == "end" for m in messages) == 2
    after = _scrape(listen)

    def calls(method: str, code: str) -> float:
        return _delta(before, after, f"pacsmesh_grpc_requests_total{{code={code},"
                                     f"method={method},service={NODE_API}}}")

    def timed(method: str) -> float:
        return _delta(before, after, f"pacsmesh_grpc_request_duration_seconds_count"
                                     f"{{method={method},service={NODE_API}}}")
    assert calls("Status", "OK") == 3 and timed("Status") == 3
    assert calls("Locate", "INVALID_ARGUMENT") == 1 and calls("Locate", "OK") == 0
    assert timed("Locate") == 1
    assert calls("GetStudy", "NOT_FOUND") == 1 and calls("GetStudy", "OK") == 1
    assert timed("GetStudy") == 2
    status_sum = "pacsmesh_grpc_request_duration_seconds_sum{method=Status,service=" \
                 f"{NODE_API}}}"
    assert 0 < _delta(before, after, status_sum) < 30


def _echoscu(port: int, aet: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("echoscu"), "-aet", aet, "-aec", "PACSMESH",
                           "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=60, check=False)


def _storescu(port: int, files: list[Path]) -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", "STORESCU", "-aec", "PACSMESH",
                          "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                         text=True, timeout=60, check=False, env=dcmtk_env())
    assert res.returncode == 0, res.stdout + res.stderr


def _query_scu(port: int, study_uid: str) -> int:
    """C-ECHO and a study-level C-FIND on one association: pynetdicom serves it (a
    query context is not fast_store's). Returns the C-FIND matches."""
    ae = AE(ae_title="METRICS")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSMESH")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        matches = 0
        for status, identifier in assoc.send_c_find(
                query, STUDY_ROOT_FIND):
            assert status is not None
            if status.Status in (0xFF00, 0xFF01):
                matches += identifier is not None
            else:
                assert status.Status == 0x0000
    finally:
        assoc.release()
    return matches


def test_dicom_requests_and_associations_are_counted(metered: Metered) -> None:
    require_tool("echoscu")
    require_tool("storescu")
    port, listen = metered.dicom_port, metered.listen
    study = make_study(metered.workdir / "dicom", 3, instances=3)
    files = sorted(p for p in study.folder.rglob("*") if p.is_file())
    before = _scrape(listen)
    assert _echoscu(port, "ECHOSCU").returncode == 0  # fast_store.py's path
    _storescu(port, files)  # one association, 3 new instances
    _storescu(port, files)  # again: held already
    refused = _echoscu(port, "INTRUDER")  # not in allowed_calling_aets
    assert refused.returncode != 0
    assert _query_scu(port, study.uid) == 1  # pynetdicom's path

    def settled() -> dict[str, float] | None:  # association ends are counted on our side
        after = _scrape(listen)
        ended = _delta(before, after, "pacsmesh_dicom_associations_ended_total{how=released}")
        return after if ended >= 4 and after["pacsmesh_dicom_associations_active"] == 0 \
            else None
    after = wait_for(settled, 20, "every association to be counted as released")

    def requests(service: str, status: str) -> float:
        return _delta(before, after, f"pacsmesh_dicom_requests_total{{service={service},"
                                     f"status={status}}}")

    def timed(service: str) -> float:
        return _delta(before, after,
                      f"pacsmesh_dicom_request_duration_seconds_count{{service={service}}}")
    assert requests("C-ECHO", "success") == 2 and timed("C-ECHO") == 2  # echoscu + pynetdicom
    assert requests("C-STORE", "success") == 6 and timed("C-STORE") == 6
    assert requests("C-STORE", "failure") == 0
    assert requests("C-FIND", "success") == 1 and timed("C-FIND") == 1
    assert _delta(before, after, "pacsmesh_dicom_associations_total{outcome=accepted}") == 4
    assert _delta(before, after, "pacsmesh_dicom_associations_total{outcome=rejected}") == 1
    assert _delta(before, after, "pacsmesh_dicom_associations_ended_total{how=released}") == 4
    assert _delta(before, after, "pacsmesh_dicom_associations_ended_total{how=aborted}") == 0
    stored = "pacsmesh_ingest_instances_total{outcome=stored,via=c-store}"
    duplicate = "pacsmesh_ingest_instances_total{outcome=duplicate,via=c-store}"
    assert _delta(before, after, stored) == 3 and _delta(before, after, duplicate) == 3
    # the Part 10 files as stored (their meta rebuilt for what was negotiated): what
    # the catalog holds of the study, byte for byte, and nothing for the duplicates
    listed = {s["study_uid"]: s for s in cli_json("ls", node=metered.node.address)["studies"]}
    assert _delta(before, after, "pacsmesh_ingest_bytes_total{via=c-store}") == \
        listed[study.uid]["bytes"]


def _families(text: str) -> dict[str, str]:
    """Family name -> type, as the exposition declares them (with or without samples)."""
    return {m[1]: m[2] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",)}


def _exported(name: str, families: dict[str, str]) -> bool:
    """Whether PromQL may name `name`: a family's own series name, by its type (a
    counter only with _total, a histogram only with _bucket, _sum or _count)."""
    for family, kind in families.items():
        base = family.removesuffix("_total") if kind == "counter" else family
        if any(name == base + suffix for suffix in SUFFIXES.get(kind, ("",))):
            return True
    return False


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\bpacsmesh_[a-z0-9_]+", expr))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def test_name_check_tells_types_apart() -> None:
    families = {"pacsmesh_a_total": "counter", "pacsmesh_b_seconds": "histogram",
                "pacsmesh_c": "gauge", "pacsmesh_d": "counter"}  # TYPE with or without _total
    assert _exported("pacsmesh_a_total", families) and _exported("pacsmesh_d_total", families)
    assert not _exported("pacsmesh_a", families)  # a counter's series end in _total
    assert not _exported("pacsmesh_d", families) and not _exported("pacsmesh_a_total_total",
                                                                     families)
    assert _exported("pacsmesh_b_seconds_bucket", families)
    assert not _exported("pacsmesh_b_seconds", families)
    assert not _exported("pacsmesh_c_total", families)
    assert _exported("pacsmesh_c", families)


def test_dashboard_and_alert_rules_name_only_what_a_node_exports(metered: Metered) -> None:
    families = _families(_exposition(metered.listen))
    dashboard = json.loads(DASHBOARD.read_text())
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    exprs += [r["expr"] for r in rules]
    named = set().union(*map(_names, exprs))
    assert len(named) >= 40  # the dashboard covers the families, not a handful
    missing = sorted(n for n in named if not _exported(n, families))
    assert not missing, missing
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_dashboard_has_what_grafana_needs() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["schemaVersion"] >= 36 and d["title"] and d["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    panels = _panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    shown = [p for p in panels if p["type"] != "row"]
    assert len(shown) >= 20
    for p in shown:
        assert p["type"] in ("timeseries", "stat", "table", "bargauge", "gauge"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            assert "$instance" in t["expr"], (p["title"], t["expr"])  # the node picker
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), (p["title"], var)
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
    # the layout's rectangles do not overlap
    cells = set()
    for p in panels:
        pos = p["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
    quantiles = [t["expr"] for p in shown for t in p["targets"]
                 if "histogram_quantile" in t["expr"]]
    assert any("grpc_request_duration_seconds_bucket" in q for q in quantiles)
    assert any("dicom_request_duration_seconds_bucket" in q for q in quantiles)
    assert all(re.search(r"by \([^)]*\ble\b", q) for q in quantiles)  # keeps the buckets


def test_histograms_are_cumulative_and_count_everything(metered: Metered) -> None:
    with metered.node.channel() as ch:
        node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=10)
    seen = 0
    for family in text_string_to_metric_families(_exposition(metered.listen)):
        if family.type != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in family.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series.setdefault(key, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[key] = s.value
        for key, buckets in series.items():
            values = [v for _, v in sorted(buckets)]
            assert values == sorted(values), (family.name, key)
            assert sorted(buckets)[-1][0] == float("inf") and values[-1] == counts[key]
            assert sorted(buckets)[0][0] == 0.001 and len(buckets) >= 15
            seen += 1
    assert seen >= 1  # Status was just timed


def test_exposition_passes_promtool_lint(metered: Metered) -> None:
    """Prometheus's own lint of names, units, types and help: nothing to say."""
    from tests.test_promtool import promtool

    res = subprocess.run([promtool(), "check", "metrics"],
                         input=_exposition(metered.listen), capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
