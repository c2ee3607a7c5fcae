"""Bad input, through the real CLI against a real node, and from a lying client.

Every file `put` is given is stored, a duplicate, or rejected with a reason that
names the problem; nothing bad reaches the catalog; what was stored before comes
back byte-identical. The node does not trust the client: a stream that lies about
its chunks, sizes or hashes, or carries a file the client should have refused, is
rejected by the node itself (driven here in-process, and once over gRPC).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
import zstandard
from pydicom.uid import UID

from pacsmesh.node.chunking import CHUNK_SIZE, chunk_spans
from pacsmesh.node.dicom_layout import scan
from pacsmesh.node.errors import InvalidInstance
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import IngestSession, Prepared
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.sample import StudySpec, make_instance, study_uid, write_study
from tests.nodeproc import NodeProc, cli, cli_json

Outcome = node_pb2.IngestResult.Outcome
# pydicom warns about the invalid UIDs these tests write on purpose
pytestmark = pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")

BASE_SPEC = StudySpec(study_index=41, seed=17, instances=4, rows=128, columns=128,
                      patient_id="PMBAD001")
OTHER_SPEC = StudySpec(study_index=42, seed=17, instances=3, rows=96, columns=96,
                       patient_id="PMBAD002")


# ---- helpers ----------------------------------------------------------------------


def save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def expected_tree(paths: list[Path]) -> dict[str, bytes]:
    """What `get` must restore for these files: STUDY/SERIES/SOP.dcm -> bytes."""
    out: dict[str, bytes] = {}
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out[f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = (
            p.read_bytes())
    return out


def restored_tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def get_study(node: NodeProc, study: str, out: Path) -> dict[str, bytes]:
    if out.exists():
        shutil.rmtree(out)
    doc = cli_json("get", study, "--out", str(out), node=node.address)
    assert doc["failed"] == [], doc
    return restored_tree(out)


def put(node: NodeProc, *paths: Path) -> tuple[int, dict[str, Any]]:
    res = cli("put", *map(str, paths), "--json", node=node.address, timeout_s=120)
    assert res.stdout.strip(), f"no JSON on stdout (exit {res.returncode}): {res.stderr}"
    doc: dict[str, Any] = json.loads(res.stdout)
    return res.returncode, doc


@dataclass
class Archive:
    node: NodeProc
    base_paths: list[Path]
    base_tree: dict[str, bytes]
    work: Path

    def assert_base_unharmed(self, tag: str) -> None:
        got = get_study(self.node, study_uid(BASE_SPEC), self.work / f"restore-{tag}")
        assert got == self.base_tree, "the study stored before came back different"
        studies = cli_json("ls", node=self.node.address)["studies"]
        base = [s for s in studies if s["study_uid"] == study_uid(BASE_SPEC)]
        assert len(base) == 1 and base[0]["instances"] == BASE_SPEC.instances, studies


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One node for the module, holding a baseline study stored before any bad input."""
    work = tmp_path_factory.mktemp("bad_input")
    node = NodeProc(work / "node").start()
    try:
        base_paths = write_study(work / "base", BASE_SPEC)
        doc = cli_json("put", str(work / "base"), node=node.address)
        assert doc["stored"] == BASE_SPEC.instances and doc["rejected"] == [], doc
        yield Archive(node, base_paths, expected_tree(base_paths), work)
    finally:
        node.stop()


# ---- bad files through the CLI ----------------------------------------------------------

BadMaker = Callable[[Path, list[Path]], Path]


def _empty(d: Path, base: list[Path]) -> Path:
    return write(d / "empty.dcm", b"")


def _text(d: Path, base: list[Path]) -> Path:
    return write(d / "notes.txt", b"Patient called, will reschedule the CT.\n" * 20)


def _cut_in_pixels(d: Path, base: list[Path]) -> Path:
    data = base[0].read_bytes()  # same UIDs as a stored instance: it must stay untouched
    return write(d / "cut-pixels.dcm", data[: len(data) - 1000])


def _cut_inside(data: bytes, value: bytes) -> bytes:
    """Cut in the middle of the first element whose value is `value` (a cut at an element
    boundary would leave a shorter but valid dataset)."""
    at = data.index(value)
    return data[: at + len(value) // 2]


def _cut_in_meta(d: Path, base: list[Path]) -> Path:
    data = base[1].read_bytes()
    sop = pydicom.dcmread(base[1], stop_before_pixels=True).SOPInstanceUID
    p = write(d / "cut-meta.dcm", _cut_inside(data, sop.encode()))  # (0002,0003): file meta
    assert p.stat().st_size < 300
    return p


def _cut_in_dataset(d: Path, base: list[Path]) -> Path:
    data = base[2].read_bytes()
    # in the Study Description (0008,1030), among the dataset's elements
    return write(d / "cut-dataset.dcm", _cut_inside(data, b"SYNTHETIC CT CHEST"))


def _no_sop_uid(d: Path, base: list[Path]) -> Path:
    ds = make_instance(OTHER_SPEC, 1, 1)
    del ds.SOPInstanceUID
    return save(ds, d / "no-sop-uid.dcm")


def _no_study_uid(d: Path, base: list[Path]) -> Path:
    ds = make_instance(OTHER_SPEC, 1, 2)
    del ds.StudyInstanceUID
    return save(ds, d / "no-study-uid.dcm")


def _with_sop_uid(uid: str) -> BadMaker:
    def make(d: Path, base: list[Path]) -> Path:
        ds = make_instance(OTHER_SPEC, 1, 3)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        return save(ds, d / "bad-sop-uid.dcm")

    return make


def _study_uid_traversal(d: Path, base: list[Path]) -> Path:
    ds = make_instance(OTHER_SPEC, 1, 1)
    ds.StudyInstanceUID = "../../etc"
    return save(ds, d / "study-traversal.dcm")


LONG_UID = "1.2.826.0.1.3680043.10.1455." + "9" * 42  # 70 characters
assert len(LONG_UID) == 70

BAD_FILES: list[tuple[str, BadMaker, tuple[str, ...]]] = [
    ("empty", _empty, ("empty file",)),
    ("text", _text, ("not a DICOM", "DICM")),
    ("cut-in-pixel-data", _cut_in_pixels, ("truncated",)),
    ("cut-in-file-meta", _cut_in_meta, ("truncated",)),
    ("cut-in-dataset", _cut_in_dataset, ("truncated",)),
    ("no-sop-uid", _no_sop_uid, ("no SOP Instance UID",)),
    ("no-study-uid", _no_study_uid, ("no Study Instance UID",)),
    ("uid-letters", _with_sop_uid("1.2.3.abc"), ("invalid SOP Instance UID", "1.2.3.abc")),
    ("uid-traversal", _with_sop_uid("../../etc"), ("invalid SOP Instance UID", "../../etc")),
    ("uid-70-chars", _with_sop_uid(LONG_UID), ("invalid SOP Instance UID", "70 characters")),
    ("uid-empty-component", _with_sop_uid("1..2"), ("invalid SOP Instance UID", "'1..2'")),
    ("study-uid-traversal", _study_uid_traversal, ("invalid Study Instance UID", "../../etc")),
]


@pytest.mark.parametrize(("maker", "keywords"), [(m, k) for _, m, k in BAD_FILES],
                         ids=[name for name, _, _ in BAD_FILES])
def test_bad_file_is_rejected_with_its_reason(archive: Archive, tmp_path: Path,
                                              maker: BadMaker, keywords: tuple[str, ...]) -> None:
    bad = maker(tmp_path / "in", archive.base_paths)
    code, doc = put(archive.node, bad)
    assert code == 1, doc
    assert doc["stored"] == 0 and doc["duplicates"] == 0, doc
    assert doc["bytes_written"] == 0, doc
    rejected = doc["rejected"]
    assert isinstance(rejected, list) and len(rejected) == 1, doc
    assert rejected[0]["path"] == str(bad), doc
    reason = rejected[0]["reason"]
    for word in keywords:
        assert word in reason, f"reason {reason!r} does not mention {word!r}"
    assert "\n" not in reason
    archive.assert_base_unharmed(bad.stem)
    # nothing of the bad file reached the catalog
    studies = {s["study_uid"] for s in cli_json("ls", node=archive.node.address)["studies"]}
    assert study_uid(OTHER_SPEC) not in studies and "../../etc" not in studies, studies


def test_mixed_folder_stores_the_good_and_names_each_bad(archive: Archive, tmp_path: Path) -> None:
    spec = replace(OTHER_SPEC, study_index=43)  # a new study, three good instances
    folder = tmp_path / "mixed"
    good = [save(make_instance(spec, 1, i), folder / "good" / f"{i}.dcm") for i in (1, 2, 3)]
    dup = folder / "again" / "base-1.dcm"  # a copy of an instance stored before
    dup.parent.mkdir(parents=True)
    shutil.copyfile(archive.base_paths[3], dup)
    bad_dir = folder / "deeper" / "still"
    bad_dir.mkdir(parents=True)
    expected_bad: dict[str, tuple[str, ...]] = {}
    for name, maker, keywords in BAD_FILES:
        sub = bad_dir / name
        path = maker(sub, archive.base_paths)
        expected_bad[str(path)] = keywords

    code, doc = put(archive.node, folder)
    assert code == 1, doc
    assert doc["stored"] == 3, doc
    assert doc["duplicates"] == 1, doc
    assert doc["studies"] == [study_uid(spec)], doc
    rejected = {r["path"]: r["reason"] for r in doc["rejected"]}
    assert set(rejected) == set(expected_bad), doc
    for bad_path, keywords in expected_bad.items():
        for word in keywords:
            reason = rejected[bad_path]
            assert word in reason, f"{bad_path}: {reason!r} lacks {word!r}"
    good_bytes = sum(p.stat().st_size for p in good)
    assert 0 < doc["bytes_written"] < good_bytes, doc

    assert get_study(archive.node, study_uid(spec), tmp_path / "out") == expected_tree(good)
    archive.assert_base_unharmed("mixed")


def test_missing_path_is_rejected_not_ignored(archive: Archive, tmp_path: Path) -> None:
    good = save(make_instance(replace(OTHER_SPEC, study_index=44), 1, 1), tmp_path / "ok.dcm")
    missing = tmp_path / "no-such-file.dcm"
    code, doc = put(archive.node, good, missing)
    assert code == 1, doc
    assert doc["stored"] == 1, doc
    assert [r["path"] for r in doc["rejected"]] == [str(missing)], doc
    assert "no such file" in doc["rejected"][0]["reason"], doc


# ---- the node does not trust the client ---------------------------------------------------


def honest_stream(data: bytes, ref: str = "f1", header_len: int | None = None,
                  compress: bool = False) -> list[node_pb2.IngestMessage]:
    """What a correct client sends for `data`: begin, every chunk with its bytes, end."""
    if header_len is None:
        try:
            header_len = scan(io.BytesIO(data), len(data)).header_len
        except InvalidInstance:
            header_len = len(data)
    spans = chunk_spans(len(data), header_len, CHUNK_SIZE)
    msgs = [node_pb2.IngestMessage(begin=node_pb2.IngestBegin(
        client_ref=ref, size=len(data), file_hash=content_hash(data), header_len=header_len,
        chunk_count=len(spans)))]
    for off, length in spans:
        plain = data[off : off + length]
        payload = zstandard.ZstdCompressor(level=1).compress(plain) if compress else plain
        msgs.append(node_pb2.IngestMessage(part=node_pb2.IngestPart(
            hash=content_hash(plain), plain_len=length, compressed=compress, data=payload)))
    msgs.append(node_pb2.IngestMessage(end=node_pb2.IngestEnd()))
    return msgs


def run_session(store: Store, msgs: list[node_pb2.IngestMessage], close: bool = True
                ) -> list[Prepared | node_pb2.IngestResult]:
    session = IngestSession(store, "n-test", HybridClock())
    out = [r for m in msgs if (r := session.on_message(m)) is not None]
    if close and (tail := session.close()) is not None:
        out.append(tail)
    return out


def dicom_bytes(spec: StudySpec, instance_no: int, rows: int = 0,
                mutate: Callable[[pydicom.Dataset], None] | None = None) -> bytes:
    ds = make_instance(spec, 1, instance_no)
    if rows:  # a multi-chunk instance: pixel data past one chunk
        ds.Rows = ds.Columns = rows
        ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # runs at import, outside pytestmark's filter
        warnings.simplefilter("ignore")
        if mutate is not None:
            mutate(ds)
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


LIAR_SPEC = StudySpec(study_index=51, seed=23, rows=64, columns=64)
GOOD = dicom_bytes(LIAR_SPEC, 1, rows=1024)  # 2 MiB of pixels: header + 2 pixel chunks + tail
assert len(honest_stream(GOOD)) >= 5


def _set_sop(uid: str) -> Callable[[pydicom.Dataset], None]:
    def mutate(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = uid

    return mutate


def _flip_byte_in_chunk(msgs: list[node_pb2.IngestMessage]) -> None:
    part = msgs[2].part
    data = bytearray(part.data)
    data[len(data) // 2] ^= 0x40
    part.data = bytes(data)


def _not_zstd(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[2].part.compressed = True  # the bytes are plain: they cannot decompress


def _wrong_file_hash(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[0].begin.file_hash = content_hash(b"some other file")


def _short_file_hash(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[0].begin.file_hash = msgs[0].begin.file_hash[:16]


def _fewer_chunks_announced(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[0].begin.chunk_count -= 1


def _more_chunks_announced(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[0].begin.chunk_count += 1  # every byte arrives, in one chunk fewer than announced


def _smaller_size_announced(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[0].begin.size -= 1


def _larger_size_announced(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[0].begin.size += 1


def _chunk_missing_at_end(msgs: list[node_pb2.IngestMessage]) -> None:
    del msgs[-2]  # the last chunk is never sent


def _plain_len_lie(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[2].part.plain_len += 1


def _oversized_chunk(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[2].part.plain_len = 64 << 20


def _have_unheld_chunk(msgs: list[node_pb2.IngestMessage]) -> None:
    part = msgs[2].part
    part.have = True
    part.data = b""


def _aborted(msgs: list[node_pb2.IngestMessage]) -> None:
    msgs[-1] = node_pb2.IngestMessage(abort=node_pb2.IngestAbort(reason="operator pressed ^C"))


@dataclass(frozen=True)
class Lie:
    data: bytes
    mutate: Callable[[list[node_pb2.IngestMessage]], None] | None
    keywords: tuple[str, ...]
    compress: bool = False


LIES: dict[str, Lie] = {
    "chunk-bytes-do-not-match-hash": Lie(GOOD, _flip_byte_in_chunk,
                                         ("chunk 1 failed verification", "do not match")),
    "compressed-flag-on-plain-bytes": Lie(GOOD, _not_zstd, ("decompress",)),
    "corrupt-compressed-chunk": Lie(GOOD, _flip_byte_in_chunk,
                                    ("chunk 1 failed verification|does not decompress",),
                                    compress=True),
    "whole-file-hash-mismatch": Lie(GOOD, _wrong_file_hash, ("whole-file hash",)),
    "file-hash-wrong-length": Lie(GOOD, _short_file_hash, ("file hash", "length")),
    "more-chunks-than-announced": Lie(GOOD, _fewer_chunks_announced,
                                      ("more chunks than announced",)),
    "fewer-chunks-than-announced": Lie(GOOD, _more_chunks_announced, ("incomplete", "chunks")),
    "more-bytes-than-announced": Lie(GOOD, _smaller_size_announced,
                                     ("more bytes than announced",)),
    "fewer-bytes-than-announced": Lie(GOOD, _larger_size_announced, ("incomplete", "bytes")),
    "last-chunk-never-sent": Lie(GOOD, _chunk_missing_at_end, ("incomplete",)),
    "chunk-plain-len-lie": Lie(GOOD, _plain_len_lie, ("chunk 1 failed verification",)),
    "chunk-too-large": Lie(GOOD, _oversized_chunk, ("bad chunk reference",)),
    "have-a-chunk-the-node-lacks": Lie(GOOD, _have_unheld_chunk, ("not held",)),
    "sender-aborted": Lie(GOOD, _aborted, ("aborted", "operator pressed ^C")),
    "valid-hashes-not-dicom": Lie(b"MZ\x90\x00" + b"\x00" * 4000, None, ("not a DICOM",)),
    "valid-hashes-empty-file": Lie(b"", None, ("empty file",)),
    "valid-hashes-truncated-dicom": Lie(GOOD[: len(GOOD) - 4096], None, ("truncated",)),
    "valid-hashes-uid-traversal": Lie(dicom_bytes(LIAR_SPEC, 2, mutate=_set_sop("../../x")),
                                      None, ("invalid SOP Instance UID",)),
    "valid-hashes-no-sop-uid": Lie(
        dicom_bytes(LIAR_SPEC, 3, mutate=lambda ds: delattr(ds, "SOPInstanceUID")),
        None, ("no SOP Instance UID",)),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    try:
        yield s
    finally:
        s.close()


def assert_catalog_empty(store: Store) -> None:
    store.flush()
    assert store.catalog.counts() == (0, 0)
    assert list(store.catalog.study_uids()) == []


def test_honest_stream_is_prepared(store: Store) -> None:
    """The control: the messages the lies below start from are accepted as they are."""
    for compress in (False, True):
        out = run_session(store, honest_stream(GOOD, compress=compress))
        assert len(out) == 1 and isinstance(out[0], Prepared), out
        assert out[0].manifest.sop_instance_uid == f"{study_uid(LIAR_SPEC)}.1.1"
        assert out[0].manifest.size == len(GOOD)
    assert_catalog_empty(store)  # prepared, never submitted


@pytest.mark.parametrize("name", list(LIES))
def test_node_rejects_a_lying_client(store: Store, name: str) -> None:
    lie = LIES[name]
    msgs = honest_stream(lie.data, ref=f"ref-{name}", compress=lie.compress)
    if lie.mutate is not None:
        lie.mutate(msgs)
    out = run_session(store, msgs)
    assert len(out) == 1, out
    res = out[0]
    assert isinstance(res, node_pb2.IngestResult), f"accepted: {res}"
    assert res.outcome == Outcome.REJECTED, res
    assert res.client_ref == f"ref-{name}"
    for word in lie.keywords:  # "a|b": either
        assert any(w in res.reason for w in word.split("|")), (
            f"reason {res.reason!r} does not mention {word!r}")
    assert_catalog_empty(store)


def test_node_rejects_stream_ending_mid_instance(store: Store) -> None:
    msgs = honest_stream(GOOD, ref="cut")[:-2]  # no last chunk, no end
    out = run_session(store, msgs)
    assert len(out) == 1 and isinstance(out[0], node_pb2.IngestResult), out
    assert out[0].outcome == Outcome.REJECTED and out[0].client_ref == "cut"
    assert "stream ended" in out[0].reason
    assert_catalog_empty(store)


def test_node_rejects_instance_never_ended(store: Store) -> None:
    first = honest_stream(GOOD, ref="first")[:-1]  # never ended
    second = honest_stream(dicom_bytes(LIAR_SPEC, 4), ref="second")
    out = run_session(store, first + second)
    rejected = [r for r in out if isinstance(r, node_pb2.IngestResult)]
    assert len(rejected) == 1 and rejected[0].client_ref == "first", out
    assert "never ended" in rejected[0].reason
    assert [r.client_ref for r in out if isinstance(r, Prepared)] == ["second"]


def test_node_rejects_part_outside_an_instance(store: Store) -> None:
    msgs = honest_stream(GOOD)[1:]  # no begin
    out = run_session(store, msgs)
    assert out, "a part outside an instance was silently accepted"
    assert all(isinstance(r, node_pb2.IngestResult) and r.outcome == Outcome.REJECTED
               for r in out), out
    assert "outside an instance" in out[0].reason  # type: ignore[union-attr]
    assert_catalog_empty(store)


def _have_size_lie(store: Store) -> tuple[list[node_pb2.IngestMessage], bytes]:
    """Store GOOD honestly; then send a new header whose Pixel Data length claims 500
    bytes more, and refer to GOOD's pixel chunks with have=True, claiming the first is
    500 bytes longer than it is. The claimed sizes add up and the whole-file hash is
    right for the bytes actually referenced, so only the held chunk's real length
    exposes the lie. Returns the messages and the real bytes they stand for."""
    out = run_session(store, honest_stream(GOOD))
    assert len(out) == 1 and isinstance(out[0], Prepared)
    store.submit(out[0].manifest_id, out[0].raw, out[0].manifest).result(30)

    header_len = scan(io.BytesIO(GOOD), len(GOOD)).header_len
    header = bytearray(GOOD[:header_len])
    pixel_len = struct.unpack("<I", header[-4:])[0]
    header[-4:] = struct.pack("<I", pixel_len + 500)
    real = bytes(header) + GOOD[header_len:]
    msgs = honest_stream(GOOD, ref="liar")
    parts = [m.part for m in msgs[1:-1]]
    parts[0].CopyFrom(node_pb2.IngestPart(hash=content_hash(bytes(header)),
                                          plain_len=header_len, data=bytes(header)))
    for p in parts[1:]:
        p.have, p.data = True, b""
    parts[1].plain_len += 500
    begin = msgs[0].begin
    begin.size = len(real) + 500
    begin.file_hash = content_hash(real)
    return msgs, real


def test_node_rejects_have_reference_with_wrong_length(store: Store) -> None:
    """A have=True part's plain_len is checked against the chunk the node holds (it once
    was not: the node then stored a manifest it could never restore)."""
    msgs, _ = _have_size_lie(store)
    out = run_session(store, msgs)
    assert len(out) == 1, out
    res = out[0]
    assert isinstance(res, node_pb2.IngestResult), (
        f"accepted: manifest size {res.manifest.size}, chunk sizes "
        f"{[c.size for c in res.manifest.chunks]}")
    assert res.outcome == Outcome.REJECTED and "chunk 1" in res.reason, res


def test_lying_grpc_client_cannot_shadow_a_stored_instance(tmp_path: Path) -> None:
    """The same lie over gRPC against a real node: refused, and the good version of the
    instance is still the one `get` returns."""
    src = tmp_path / "good.dcm"
    src.write_bytes(GOOD)
    node = NodeProc(tmp_path / "node").start()
    try:
        doc = cli_json("put", str(src), node=node.address)
        assert doc["stored"] == 1, doc
        # build the lying messages against a scratch store holding the same chunks
        scratch = Store(tmp_path / "scratch")
        try:
            msgs, _ = _have_size_lie(scratch)
        finally:
            scratch.close()
        with grpc.insecure_channel(node.address) as ch:
            results = list(node_pb2_grpc.NodeApiStub(ch).Ingest(iter(msgs), timeout=30))
        assert len(results) == 1, results
        assert results[0].outcome == Outcome.REJECTED, (
            f"the node acknowledged the lie as {Outcome.Name(results[0].outcome)}")
        got = get_study(node, study_uid(LIAR_SPEC), tmp_path / "out")
        assert list(got.values()) == [GOOD]
    finally:
        node.stop()
