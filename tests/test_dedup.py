"""Deduplication: the same study again costs no new bytes; a corrected header costs
only the header.

Chunks are cut apart at the Pixel Data value, so a changed Patient Name changes only
an instance's first (header) chunk: the pixels dedup against what is stored. The
correction is a new version of each instance; the old one stays in the catalog.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacsmesh.node.hashing import content_hash
from pacsmesh.node.store import Store
from pacsmesh.sample import StudySpec, make_instance, study_uid, write_study
from tests.nodeproc import NodeProc, cli, cli_json

SPEC = StudySpec(study_index=91, seed=37, instances=20, patient_id="PMDEDUP1",
                 patient_name="DOE^JANE")
CORRECTED_NAME = "DOE^JANE^MARIE"
RATIO_MAX = 0.02


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def restored(out: Path) -> dict[str, bytes]:
    """SOP Instance UID -> bytes of everything `get` wrote under `out`."""
    return {p.stem: p.read_bytes() for p in out.rglob("*.dcm")}


def put(node: NodeProc, folder: Path) -> dict[str, Any]:
    doc = cli_json("put", str(folder), node=node.address)
    assert doc["rejected"] == [], doc
    return doc


def chunk_bytes(node: NodeProc) -> int:
    return int(cli_json("status", node=node.address)["chunk_bytes"])


def test_same_study_again_writes_nothing(node: NodeProc, study_dir: Path) -> None:
    n = len(list(study_dir.rglob("*.dcm")))
    assert n > 0
    first = put(node, study_dir)
    assert first["stored"] == n and first["duplicates"] == 0, first
    assert first["bytes_written"] > 0, first
    packs_before = chunk_bytes(node)

    again = put(node, study_dir)
    print(f"\nfirst put {first['bytes_written']} bytes written; again {again['bytes_written']}")
    assert again["stored"] == 0, again
    assert again["duplicates"] == n, again
    assert again["bytes_written"] == 0, again
    assert again["bytes_in"] == first["bytes_in"], again
    assert chunk_bytes(node) == packs_before, "the packs grew on a duplicate put"
    studies = cli_json("ls", node=node.address)["studies"]
    assert [s["instances"] for s in studies] == [n], studies

    # a copy of the same files under other names is the same data
    copy = study_dir.parent / f"{study_dir.name}-copy"
    shutil.copytree(study_dir, copy, dirs_exist_ok=True)
    try:
        renamed = put(node, copy)
        assert renamed["duplicates"] == n and renamed["bytes_written"] == 0, renamed
    finally:
        shutil.rmtree(copy)


@pytest.fixture
def original_and_corrected(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    original = write_study(tmp_path / "original", SPEC)
    corrected = []
    for path in original:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        fixed = make_instance(replace(SPEC, patient_name=CORRECTED_NAME), 1,
                              int(ds.InstanceNumber))
        assert fixed.SOPInstanceUID == ds.SOPInstanceUID
        out = tmp_path / "corrected" / path.relative_to(tmp_path / "original")
        out.parent.mkdir(parents=True, exist_ok=True)
        fixed.save_as(out, enforce_file_format=True)
        corrected.append(out)
    for a, b in zip(original, corrected, strict=True):
        assert a.read_bytes() != b.read_bytes()
    return original, corrected


def test_corrected_header_is_a_cheap_new_version(tmp_path: Path,
                                                 original_and_corrected: tuple[list[Path],
                                                                               list[Path]]
                                                 ) -> None:
    original, corrected = original_and_corrected
    n = len(original)
    node = NodeProc(tmp_path / "node").start()
    try:
        first = put(node, original[0].parent.parent)
        assert first["stored"] == n, first
        second = put(node, corrected[0].parent.parent)
        assert second["stored"] == n and second["duplicates"] == 0, second
        ratio = second["bytes_written"] / first["bytes_written"]
        print(f"\ndedup: first put wrote {first['bytes_written']} bytes, the corrected "
              f"headers {second['bytes_written']} bytes: ratio {ratio:.4%} "
              f"({second['bytes_written'] / n:.0f} bytes per instance)")
        assert second["bytes_written"] > 0, second  # the new headers are new bytes
        assert ratio < RATIO_MAX, ratio

        out = tmp_path / "out"
        res = cli("get", study_uid(SPEC), "--out", str(out), "--json", node=node.address)
        assert res.returncode == 0, (res.stdout, res.stderr)
        got = restored(out)
        want = {sop_uid_of(p): p.read_bytes() for p in corrected}
        assert got == want, "get did not return the current (corrected) versions"
        for data in got.values():
            assert CORRECTED_NAME.encode() in data
        assert node.terminate() == 0, node.log()
    finally:
        node.stop()

    store = Store(node.data_dir)
    try:
        by_hash = {content_hash(p.read_bytes()): "original" for p in original}
        by_hash.update({content_hash(p.read_bytes()): "corrected" for p in corrected})
        for path in original:
            sop = sop_uid_of(path)
            versions = store.catalog.versions_of(sop)
            assert len(versions) == 2, (sop, versions)
            kinds = []
            for mid in versions:
                found = store.catalog.get(mid)
                assert found is not None, mid
                _, m = found
                kinds.append(by_hash.get(m.file_hash, "unknown"))
                assert m.sop_instance_uid == sop
            assert kinds == ["original", "corrected"], kinds  # oldest first, current last
            current = store.catalog.get(versions[-1])
            assert current is not None and current[1].patient_name == CORRECTED_NAME
        assert len(store.catalog.current_manifests(study_uid(SPEC))) == n
    finally:
        store.close()
