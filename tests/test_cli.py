"""The CLI against a real node process: the CONTRACT's commands and JSON fields."""

from __future__ import annotations

import filecmp
import io
from pathlib import Path

import grpc
import pydicom
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pacsmesh.sample import StudySpec, make_instance, write_study
from tests.nodeproc import NodeProc, cli, cli_json


def _sop_map(folder: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in folder.rglob("*.dcm")}


def _study_uid(folder: Path) -> str:
    first = next(iter(sorted(folder.rglob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def test_put_get_roundtrip_byte_identical(node: NodeProc, study_dir: Path,
                                          tmp_path: Path) -> None:
    doc = cli_json("put", str(study_dir), node=node.address)
    assert doc["stored"] == 30 and doc["duplicates"] == 0 and doc["rejected"] == []
    assert doc["bytes_in"] == sum(p.stat().st_size for p in study_dir.rglob("*.dcm"))
    assert 0 < doc["bytes_written"] < doc["bytes_in"]  # compressed
    uid = _study_uid(study_dir)
    got = cli_json("get", uid, "--out", str(tmp_path / "out"), node=node.address)
    assert got["instances"] == 30 and got["failed"] == []
    originals = _sop_map(study_dir)
    restored = _sop_map(tmp_path / "out" / uid)
    assert restored.keys() == originals.keys()
    for sop, path in originals.items():
        assert filecmp.cmp(path, restored[sop], shallow=False), sop
        series = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        assert restored[sop] == tmp_path / "out" / uid / series / f"{sop}.dcm"


def test_views_follow_the_contract(node: NodeProc, study_dir: Path) -> None:
    cli_json("put", str(study_dir), node=node.address)
    uid = _study_uid(study_dir)
    ls = cli_json("ls", node=node.address)
    (study,) = ls["studies"]
    assert study == {"study_uid": uid, "patient_id": "PM000001", "study_date": "20260101",
                     "modalities": ["CT"], "instances": 30,
                     "bytes": sum(p.stat().st_size for p in study_dir.rglob("*.dcm")),
                     "safe_copies": 1, "expires": "2033-01-01"}  # 7 years, the default
    assert cli_json("ls", "--local", node=node.address)["studies"] == ls["studies"]
    loc = cli_json("locate", uid, node=node.address)
    (holder,) = loc["holders"]
    assert isinstance(holder["verified_age_s"], float)  # -1 until a scrub pass completed
    del holder["verified_age_s"]
    assert holder == {"node": "n1", "site": "Boston", "instances": 30}
    assert (loc["safe_copies"], loc["required_copies"], loc["safe"]) == (1, 3, False)
    st = cli_json("status", node=node.address)
    for key in ("copies", "min_distance_miles", "nodes", "studies", "instances", "safe_studies",
                "unsafe_studies", "oldest_unsafe_age_s", "alerts"):
        assert key in st, key
    (n,) = st["nodes"]
    assert {"id", "site", "address", "lat", "lon", "state", "used_bytes", "free_bytes"} <= set(n)
    assert n["state"] == "alive" and n["used_bytes"] > 0 and n["free_bytes"] > 0
    assert (st["studies"], st["instances"], st["unsafe_studies"]) == (1, 30, 1)
    assert any(a["code"] == "NO_PEERS" for a in st["alerts"])


def test_resent_instance_with_new_bytes_is_a_second_version(node: NodeProc,
                                                            tmp_path: Path) -> None:
    spec = StudySpec(instances=1, rows=64, columns=64, study_index=99)
    v1 = make_instance(spec, 1, 1)
    (tmp_path / "v1").mkdir()
    v1.save_as(tmp_path / "v1" / "a.dcm", enforce_file_format=True)
    cli_json("put", str(tmp_path / "v1"), node=node.address)
    v2 = make_instance(spec, 1, 1)
    v2.PatientName = "DOE^JANE^CORRECTED"
    (tmp_path / "v2").mkdir()
    v2.save_as(tmp_path / "v2" / "a.dcm", enforce_file_format=True)
    doc = cli_json("put", str(tmp_path / "v2"), node=node.address)
    assert doc["stored"] == 1
    uid = str(v1.StudyInstanceUID)
    cli_json("get", uid, "--out", str(tmp_path / "out"), node=node.address)
    (restored,) = list((tmp_path / "out").rglob("*.dcm"))
    assert restored.read_bytes() == (tmp_path / "v2" / "a.dcm").read_bytes()
    assert cli_json("ls", node=node.address)["studies"][0]["instances"] == 1


def test_unknown_study_and_bad_uid(node: NodeProc, tmp_path: Path) -> None:
    res = cli("get", "1.2.3.4", "--out", str(tmp_path), node=node.address)
    assert res.returncode == 1 and "not in this node's catalog" in res.stderr
    res = cli("locate", "../etc", node=node.address)
    assert res.returncode == 1 and "UID" in res.stderr
    res = cli("get", "../../x", "--out", str(tmp_path), node=node.address)
    assert res.returncode == 1 and "UID" in res.stderr


def test_unreachable_node_and_usage(tmp_path: Path) -> None:
    res = cli("status", node="127.0.0.1:1")
    assert res.returncode == 1 and "cannot reach node 127.0.0.1:1" in res.stderr
    assert cli("put").returncode == 2  # usage
    assert cli("frobnicate").returncode == 2


def test_health_and_reflection(node: NodeProc) -> None:
    with grpc.insecure_channel(node.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service="pacsmesh.node.NodeApi"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(refl.ServerReflectionInfo(iter([req])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"pacsmesh.node.NodeApi", "grpc.health.v1.Health"} <= names


def test_put_reports_throughput_fields(node: NodeProc, tmp_path: Path) -> None:
    write_study(tmp_path / "s", StudySpec(instances=3, rows=64, columns=64, study_index=5))
    buf = io.StringIO()
    res = cli("put", str(tmp_path / "s"), node=node.address)
    buf.write(res.stdout)
    assert res.returncode == 0 and "stored 3" in buf.getvalue()
