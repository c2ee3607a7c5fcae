"""Limits: a data dir or port already taken, a bad config, a full disk, a configured
capacity, and a file larger than memory should ever need.

Everything runs as real processes on real files; the full-disk cases use a small
tmpfs (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import grpc
import numpy as np
import pydicom
import pytest
import zstandard

from pacsmesh.node.chunking import CHUNK_SIZE, chunk_spans
from pacsmesh.node.dicom_layout import scan
from pacsmesh.node.hashing import content_hash
from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.sample import StudySpec, make_instance, study_uid, write_study
from tests.nodeproc import PYTHON, NodeProc, cli, cli_json, free_port

MiB = 1 << 20
RESERVE = 64 * MiB  # node/store.py FREE_RESERVE_BYTES: admit() keeps this much free
Outcome = node_pb2.IngestResult.Outcome


# ---- helpers ---------------------------------------------------------------------------


def wait_exit(node: NodeProc, timeout_s: float = 30.0) -> int:
    assert node.proc is not None
    try:
        return node.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        node.stop()
        raise AssertionError(f"node did not exit within {timeout_s} s:\n{node.log()}") from None


def reason_lines(text: str) -> list[str]:
    """The node's own one-line reasons (log lines and gRPC's C-core noise aside)."""
    return [line for line in text.splitlines() if line.startswith("pacsmesh node:")]


def expected_tree(paths: list[Path]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out[f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = (
            p.read_bytes())
    return out


def get_tree(node: NodeProc, study: str, out: Path) -> dict[str, bytes]:
    if out.exists():
        shutil.rmtree(out)
    doc = cli_json("get", study, "--out", str(out), node=node.address)
    assert doc["failed"] == [], doc
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def put_json(node: NodeProc, *paths: Path) -> tuple[int, dict[str, Any]]:
    res = cli("put", *map(str, paths), "--json", node=node.address, timeout_s=300)
    assert res.stdout.strip(), f"no JSON (exit {res.returncode}): {res.stderr}"
    return res.returncode, json.loads(res.stdout)


# ---- two nodes, one data dir; a port in use ------------------------------------------------


def test_second_node_on_same_data_dir_exits_with_reason(tmp_path: Path) -> None:
    first = NodeProc(tmp_path, node_id="n1").start()
    try:
        log_before = first.log_path.stat().st_size
        second = NodeProc(tmp_path, node_id="n1", port=free_port())  # same dir, other port
        assert second.data_dir == first.data_dir and second.port != first.port
        second.start(wait=False)
        code = wait_exit(second)
        with open(second.log_path, "rb") as f:  # both append to one log: read the new part
            f.seek(log_before)
            output = f.read().decode(errors="replace")
        assert code != 0, output
        lines = reason_lines(output)
        assert len(lines) == 1, output
        assert "data dir" in lines[0] and str(first.data_dir) in lines[0], lines
        assert "Traceback" not in output, output
        # the first node is unharmed: still serving, still storing
        assert first.proc is not None and first.proc.poll() is None
        study = tmp_path / "study"
        write_study(study, StudySpec(instances=2, rows=64, columns=64, study_index=61))
        assert cli_json("put", str(study), node=first.address)["stored"] == 2
    finally:
        first.stop()


def test_second_node_on_a_port_in_use_exits_with_reason(tmp_path: Path) -> None:
    first = NodeProc(tmp_path / "a", node_id="a1").start()
    try:
        second = NodeProc(tmp_path / "b", node_id="b1", port=first.port).start(wait=False)
        code = wait_exit(second)
        output = second.log()
        assert code != 0, output
        lines = reason_lines(output)
        assert len(lines) == 1, output
        assert first.address in lines[0], lines
        assert "in use" in lines[0] or "bind" in lines[0], lines  # says why, not just "failed"
        assert "Traceback" not in output, output
        assert first.proc is not None and first.proc.poll() is None
        assert cli_json("status", node=first.address)["nodes"][0]["id"] == "a1"
        # the failed node let go of its own data dir: a node can start on it now
        third = NodeProc(tmp_path / "b", node_id="b1")
        try:
            third.start()
        finally:
            third.stop()
    finally:
        first.stop()


# ---- bad configs ------------------------------------------------------------------------------


def _config(tmp: Path, body: str) -> str:
    return body.format(data_dir=tmp / "data", listen=f"127.0.0.1:{free_port()}")


BAD_CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unknown-key": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "{listen}"\ncolour = "blue"\n',
        ("unknown key", "colour")),
    "unknown-cluster-key": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "{listen}"\n[cluster]\ncopys = 3\n',
        ("unknown key", "copys")),
    "unknown-section": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "{listen}"\n[clustre]\ncopies = 3\n',
        ("unknown section", "clustre")),
    "missing-data-dir": (
        '[node]\nlisten = "{listen}"\nsite = "Boston"\n',
        ("data_dir",)),
    "invalid-toml": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "{listen}"\nsite = Boston\n',
        ("TOML", "line 4")),
    "copies-three": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "{listen}"\n[cluster]\ncopies = "three"\n',
        ("copies", "three")),
    "listen-not-an-address": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "7400"\n',
        ("listen", "HOST:PORT")),
    "negative-capacity": (
        '[node]\ndata_dir = "{data_dir}"\nlisten = "{listen}"\ncapacity_bytes = -5\n',
        ("capacity_bytes",)),
}


@pytest.mark.parametrize("name", [*BAD_CONFIGS, "no-such-file"])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, name: str) -> None:
    cfg = tmp_path / "node.toml"
    if name == "no-such-file":
        keywords: tuple[str, ...] = ("cannot read", str(cfg))
    else:
        body, keywords = BAD_CONFIGS[name]
        cfg.write_text(_config(tmp_path, body))
    proc = subprocess.Popen([PYTHON, "-m", "pacsmesh.cli", "node", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the node started on a bad config") from None
    assert proc.returncode == 2, (proc.returncode, out, err)
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in keywords:
        assert word in lines[0], f"{lines[0]!r} does not mention {word!r}"
    assert not (tmp_path / "data").exists(), "a bad config still created the data dir"


# ---- full disk, configured capacity -------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                         check=False, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a {size_mib} MiB tmpfs at {path} (needs root): "
                    f"{res.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


NOISE_SPEC = StudySpec(study_index=71, seed=29, rows=16, columns=16, patient_id="PMFULL01")
NOISE_INSTANCES = 45
# 2 MiB of 16-bit noise per instance: it does not compress (12-bit noise did, 1.3x,
# once pixel chunks were byte-shuffled: its high bytes hold 4 bits)
NOISE_SIDE = 1024


@pytest.fixture(scope="module")
def noise_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """45 instances of incompressible 2 MiB pixels: 94 MB, on the real disk."""
    out = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(1, NOISE_INSTANCES + 1):
        ds = make_instance(NOISE_SPEC, 1, i)
        ds.Rows = ds.Columns = NOISE_SIDE
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = rng.integers(0, 65536, NOISE_SIDE * NOISE_SIDE,
                                    dtype=np.uint16).tobytes()
        p = out / f"{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def check_refusal(doc: dict[str, Any], paths: list[Path], full_words: tuple[str, ...],
                  at_least_one: bool = True) -> list[Path]:
    """Some stored (or none), the rest refused for lack of room; returns the stored paths
    (of `paths`: duplicates of files stored before are not among them)."""
    rejected = {r["path"]: r["reason"] for r in doc["rejected"]}
    assert doc["stored"] >= int(at_least_one), doc
    assert len(rejected) >= 1, doc
    assert doc["stored"] + len(rejected) == len(paths), doc
    for path, reason in rejected.items():
        assert any(w in reason for w in full_words), f"{path}: {reason!r}"
    stored = [p for p in paths if str(p) not in rejected]
    assert len(stored) == doc["stored"]
    return stored


def test_full_disk_refuses_clearly_and_keeps_what_it_stored(tmp_path: Path,
                                                            noise_study: list[Path]) -> None:
    disk_mib = 80  # the study is 94 MB; the node keeps a 64 MiB reserve, so ~16 MiB fit
    total = sum(p.stat().st_size for p in noise_study)
    assert total > disk_mib * MiB
    with tmpfs(tmp_path / "disk", disk_mib) as disk:
        node = NodeProc(disk).start()
        try:
            code, doc = put_json(node, noise_study[0].parent)
            assert code == 1, doc
            stored = check_refusal(doc, noise_study, ("storage full", "disk full"))
            print(f"\nfull disk: {len(stored)} stored, {len(noise_study) - len(stored)} refused; "
                  f"first reason: {doc['rejected'][0]['reason']}")
            want = expected_tree(stored)
            study = study_uid(NOISE_SPEC)
            assert get_tree(node, study, tmp_path / "out1") == want
            assert node.proc is not None and node.proc.poll() is None, node.log()
            status = cli_json("status", node=node.address)
            assert status["instances"] == len(stored), status
            # it used the room it had, and stopped short of its reserve (kept for the index)
            instance_size = noise_study[0].stat().st_size
            free = status["nodes"][0]["free_bytes"]
            assert len(stored) >= 3, doc
            assert RESERVE // 2 < free < RESERVE + 4 * instance_size, status
            # again: what is there is a duplicate, the rest is refused again (the node's
            # free-space reading during a put is approximate: one or two more may fit now)
            code, again = put_json(node, noise_study[0].parent)
            assert code == 1 and again["duplicates"] == len(stored), again
            rest = [p for p in noise_study if p not in stored]
            more = check_refusal(again, rest, ("storage full", "disk full"), at_least_one=False)
            assert len(more) < len(stored), again
            stored += more
            want = expected_tree(stored)

            assert node.terminate() == 0, node.log()
            node.start()
            assert get_tree(node, study, tmp_path / "out2") == want
            assert cli_json("status", node=node.address)["instances"] == len(stored)
        finally:
            node.stop()


def test_configured_capacity_refuses_clearly(tmp_path: Path, noise_study: list[Path]) -> None:
    capacity = 80_000_000  # ~12 MB above the 64 MiB reserve
    node = NodeProc(tmp_path / "node", extra={"node": {"capacity_bytes": capacity}}).start()
    try:
        code, doc = put_json(node, noise_study[0].parent)
        assert code == 1, doc
        stored = check_refusal(doc, noise_study, ("storage full",))
        assert len(stored) * (NOISE_SIDE * NOISE_SIDE * 2) < capacity - RESERVE
        print(f"\ncapacity {capacity}: {len(stored)} stored; {doc['rejected'][0]['reason']}")
        status = cli_json("status", node=node.address)
        me = status["nodes"][0]
        assert me["capacity_bytes"] == capacity, me
        assert me["used_bytes"] + me["free_bytes"] <= capacity, me
        assert get_tree(node, study_uid(NOISE_SPEC), tmp_path / "out") == expected_tree(stored)
    finally:
        node.stop()


def ingest_messages(data: bytes, ref: str) -> list[node_pb2.IngestMessage]:
    """What an honest client sends for one file (chunks compressed)."""
    header_len = scan(io.BytesIO(data), len(data)).header_len
    spans = chunk_spans(len(data), header_len, CHUNK_SIZE)
    msgs = [node_pb2.IngestMessage(begin=node_pb2.IngestBegin(
        client_ref=ref, size=len(data), file_hash=content_hash(data), header_len=header_len,
        chunk_count=len(spans)))]
    cctx = zstandard.ZstdCompressor(level=1)
    for off, length in spans:
        plain = data[off : off + length]
        msgs.append(node_pb2.IngestMessage(part=node_pb2.IngestPart(
            hash=content_hash(plain), plain_len=length, compressed=True,
            data=cctx.compress(plain))))
    msgs.append(node_pb2.IngestMessage(end=node_pb2.IngestEnd()))
    return msgs


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_refusing_a_big_instance_does_not_refuse_small_ones_that_fit(tmp_path: Path) -> None:
    """One Ingest stream (so the order is exact): big, small, big, small, ... Each big
    can never fit under the capacity; each small fits easily."""
    capacity = 80_000_000  # ~12 MB above the 64 MiB reserve
    spec = StudySpec(study_index=75, seed=29, rows=128, columns=128, patient_id="PMCAP002")
    msgs: list[node_pb2.IngestMessage] = []
    for i in range(1, 5):
        big = make_instance(spec, 2, i)
        big.Rows = big.Columns = 2048
        big.NumberOfFrames = 3
        big.PixelData = bytes(2048 * 2048 * 2 * 3)  # 24 MiB (of zeros: quick to send)
        msgs += ingest_messages(dataset_bytes(big), f"big{i}")
        msgs += ingest_messages(dataset_bytes(make_instance(spec, 1, i)), f"small{i}")
    node = NodeProc(tmp_path / "node", extra={"node": {"capacity_bytes": capacity}}).start()
    try:
        with grpc.insecure_channel(node.address) as ch:
            results = list(node_pb2_grpc.NodeApiStub(ch).Ingest(iter(msgs), timeout=60))
        outcome = {r.client_ref: r for r in results}
        assert len(outcome) == 8, results
        for i in range(1, 5):
            big_res, small = outcome[f"big{i}"], outcome[f"small{i}"]
            assert big_res.outcome == Outcome.REJECTED and "storage full" in big_res.reason, (
                big_res)
            free = int(big_res.reason.split("storage full: ")[1].split()[0])
            assert free > capacity - 4 * MiB, f"the reason understates what is free: {big_res}"
            assert small.outcome == Outcome.STORED, (
                f"small{i} fits but was refused after big{i}: {small.reason}")
    finally:
        node.stop()


def _fill(path: Path) -> int:
    """Take every free byte of the filesystem holding `path`."""
    written = 0
    with open(path, "wb") as f:
        st = os.statvfs(path.parent)
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
        written = os.fstat(f.fileno()).st_size
        block = b"\xff" * MiB
        with contextlib.suppress(OSError):
            while True:
                f.seek(0, os.SEEK_END)
                written += os.write(f.fileno(), block)
    return written


def test_disk_filled_by_someone_else_during_a_put(tmp_path: Path) -> None:
    """The real ENOSPC path: the disk had room when the instance was admitted, then
    another process took it all while the chunks were being written."""
    base = tmp_path / "base"
    base_paths = write_study(base, StudySpec(instances=3, rows=256, columns=256, study_index=72))
    big = tmp_path / "big" / "big.dcm"
    big.parent.mkdir()
    ds = make_instance(StudySpec(study_index=73, rows=16, columns=16), 1, 1)
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 2
    ds.PixelData = np.random.default_rng(3).bytes(4096 * 4096 * 2 * 2)  # 64 MiB of noise
    ds.save_as(big, enforce_file_format=True)
    later = tmp_path / "later"
    later_paths = write_study(later, StudySpec(instances=2, rows=128, columns=128,
                                               study_index=74))
    with tmpfs(tmp_path / "disk", 160) as disk:
        node = NodeProc(disk).start()
        filler = disk / "filler"
        try:
            assert cli_json("put", str(base), node=node.address)["stored"] == 3
            packs = node.data_dir / "packs"

            def pack_bytes() -> int:
                return sum(p.stat().st_size for p in packs.glob("pack-*.dat"))

            start = pack_bytes()
            put = subprocess.Popen(
                [PYTHON, "-m", "pacsmesh.cli", "put", str(big), "--json", "--node",
                 node.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while pack_bytes() < start + 4 * MiB and put.poll() is None:
                assert time.monotonic() < deadline, "the big put never started writing"
                time.sleep(0.005)
            assert put.poll() is None, "the put finished before the disk could be filled"
            _fill(filler)
            out, err = put.communicate(timeout=120)
            doc = json.loads(out)
            assert put.returncode == 1, (out, err)
            assert doc["stored"] == 0 and len(doc["rejected"]) == 1, doc
            reason = doc["rejected"][0]["reason"]
            assert "full" in reason, reason
            print(f"\nfilled mid-put: {reason}")

            assert node.proc is not None and node.proc.poll() is None, node.log()
            assert cli_json("status", node=node.address)["instances"] == 3
            want = expected_tree(base_paths)
            assert get_tree(node, study_uid(StudySpec(study_index=72)), tmp_path / "o1") == want

            filler.unlink()
            deadline = time.monotonic() + 10  # the node may cache its free-space reading briefly
            while True:
                code, doc = put_json(node, later)
                if code == 0 or time.monotonic() > deadline:
                    break
                assert all("full" in r["reason"] for r in doc["rejected"]), doc
                time.sleep(0.2)
            assert code == 0 and doc["stored"] == 2, doc
            assert node.terminate() == 0, node.log()
            node.start()
            assert get_tree(node, study_uid(StudySpec(study_index=72)), tmp_path / "o2") == want
            assert get_tree(node, study_uid(StudySpec(study_index=74)), tmp_path / "o3") == (
                expected_tree(later_paths))
        finally:
            node.stop()
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()


# ---- a large file, streamed ---------------------------------------------------------------

BLOCK = MiB
BIG_BLOCKS = 2048  # 2 GiB of pixel data
RSS_LIMIT = 400 * 10**6


@dataclass
class Measured:
    code: int
    stdout: str
    stderr: str
    max_rss: int  # bytes


# Measures from a small parent: a child's ru_maxrss also counts the time before its exec,
# when it was a fork of its parent (pytest here, ~100 MB), so the CLI is run from this.
RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(*args: str) -> Measured:
    """Run the CLI and take its peak RSS (kernel rusage, KiB on Linux)."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        res = subprocess.run([PYTHON, "-c", RSS_WRAPPER, str(rss_file), PYTHON, "-m",
                              "pacsmesh.cli", *args], check=False, capture_output=True,
                             text=True, timeout=300)
        max_rss = int(rss_file.read_text()) * 1024
    return Measured(res.returncode, res.stdout, res.stderr, max_rss)


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def write_big_dicom(path: Path, spec: StudySpec) -> tuple[str, int]:
    """A valid Part 10 file with 2 GiB of Pixel Data, written block by block; returns its
    blake3 hex digest and size. Each 1 MiB block is unique (its number, a slice of a
    random pool at a varying offset) and partly zeros, so it compresses somewhat."""
    ds = make_instance(spec, 1, 1)
    del ds.PixelData
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = BIG_BLOCKS // 2  # 2 MiB frames
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    head = buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, BIG_BLOCKS * BLOCK)
    pool = np.random.default_rng(11).bytes(8 * BLOCK)
    zeros = bytes(BLOCK)
    h = blake3.blake3()
    size = 0
    with open(path, "wb") as f:
        f.write(head)
        h.update(head)
        size += len(head)
        for i in range(BIG_BLOCKS):
            random_len = (i % 4 + 1) * (BLOCK // 8)
            off = (i * 7919 * 64) % (7 * BLOCK)
            block = struct.pack("<Q", i) + pool[off : off + random_len - 8]
            block += zeros[: BLOCK - len(block)]
            f.write(block)
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def file_hash(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(4 * BLOCK):
            h.update(block)
    return str(h.hexdigest())


@pytest.mark.slow
def test_large_file_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    spec = StudySpec(study_index=81, seed=31, rows=16, columns=16, patient_id="PMBIG001")
    src = tmp_path / "in" / "big.dcm"
    src.parent.mkdir()
    out = tmp_path / "out"
    node = NodeProc(tmp_path / "node")
    started = time.monotonic()
    try:
        want, size = write_big_dicom(src, spec)
        assert size >= 2 * 10**9
        wrote_s = time.monotonic() - started
        node.start()
        assert node.proc is not None
        idle_rss = vm_hwm(node.proc.pid)

        t = time.monotonic()
        put = run_measured("put", str(src), "--json", "--node", node.address)
        put_s = time.monotonic() - t
        assert put.code == 0, (put.stdout, put.stderr)
        doc = json.loads(put.stdout)
        assert doc["stored"] == 1 and doc["rejected"] == [], doc
        assert doc["bytes_in"] == size, doc
        assert 0 < doc["bytes_written"] < size, doc  # zeros compress
        node_after_put = vm_hwm(node.proc.pid)

        t = time.monotonic()
        get = run_measured("get", study_uid(spec), "--out", str(out), "--json",
                           "--node", node.address)
        get_s = time.monotonic() - t
        assert get.code == 0, (get.stdout, get.stderr)
        assert json.loads(get.stdout)["instances"] == 1
        node_after_get = vm_hwm(node.proc.pid)
        restored = out / study_uid(spec) / f"{study_uid(spec)}.1" / f"{study_uid(spec)}.1.1.dcm"
        assert restored.stat().st_size == size
        assert file_hash(restored) == want

        print(f"\nlarge file {size / 1e9:.2f} GB (written in {wrote_s:.1f} s): put {put_s:.1f} s "
              f"({doc['bytes_written'] / 1e6:.0f} MB written), get {get_s:.1f} s; peak RSS: "
              f"node idle {idle_rss / 1e6:.0f} MB, after put {node_after_put / 1e6:.0f} MB, "
              f"after get {node_after_get / 1e6:.0f} MB; CLI put {put.max_rss / 1e6:.0f} MB, "
              f"CLI get {get.max_rss / 1e6:.0f} MB")
        assert node_after_put < RSS_LIMIT, node_after_put
        assert node_after_get < RSS_LIMIT, node_after_get
        assert put.max_rss < RSS_LIMIT, put.max_rss
        assert get.max_rss < RSS_LIMIT, get.max_rss
    finally:
        node.stop()
        for p in (src.parent, out, node.data_dir):
            shutil.rmtree(p, ignore_errors=True)
