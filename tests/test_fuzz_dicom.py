"""Fuzz: DICOM headers from outside (node/dicom_layout.py scan, the ingest stream's
structure walk over chunks, node/ingest.py prepare_local and the C-STORE checks of
node/dicom/store_scp.py), into a real store.

Whatever bytes arrive as a file, a C-STORE dataset or an ingest stream, the walk
returns a Layout whose UIDs are valid and whose header lies within the file, or
raises InvalidInstance with the reason; never another exception, never a long
walk, never more memory than a header needs. Stored instances are never harmed:
after garbage went through the ingest paths, everything stored before restores
byte-identical.
"""

from __future__ import annotations

import io
import tracemalloc
import warnings
import zlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacsmesh.node.chunking import CHUNK_SIZE, chunk_spans
from pacsmesh.node.dicom.query import Key, value_matches
from pacsmesh.node.dicom.store_scp import PREAMBLE, mismatch
from pacsmesh.node.dicom_layout import Layout, scan
from pacsmesh.node.errors import InvalidInstance, StoreFull
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import IngestSession, Prepared, prepare_local
from pacsmesh.node.store import Store
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto import node_pb2
from pacsmesh.sample import StudySpec, make_instance
from tests.fuzz import fuzz, garbage, texts

Outcome = node_pb2.IngestResult.Outcome
SPEC = StudySpec(study_index=81, seed=37, rows=8, columns=8, patient_id="PMFUZZ04")
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def save(ds: Dataset, **kw: bool) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True, **kw)
    return buf.getvalue()


def instance(n: int, syntax: str | None = None) -> Dataset:
    ds = make_instance(SPEC, 1, n)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


def with_sequences_and_fragments() -> bytes:
    ds = instance(5, JPEGBaseline8Bit)
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "T-D4000", "ABDOMEN"
    inner = Dataset()
    inner.CodeValue = "X"
    item.ConceptCodeSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item, Dataset()])
    ds.PixelData = encapsulate([b"\xff\xd8frame1\xff\xd9", b"\xff\xd8frame2\xff\xd9"])
    ds.NumberOfFrames = 2
    return save(ds)


SEEDS = [
    save(instance(1)),
    save(instance(2, ImplicitVRLittleEndian), implicit_vr=True),
    save(instance(3, ExplicitVRBigEndian), implicit_vr=False, little_endian=False),
    save(instance(4, DeflatedExplicitVRLittleEndian)),
    with_sequences_and_fragments(),
    *((PYDICOM_FILES / name).read_bytes() for name in (
        "image_dfl.dcm", "UN_sequence.dcm", "nested_priv_SQ.dcm", "SC_rgb_rle.dcm",
        "MR_small_bigendian.dcm", "empty_charset_LEI.dcm", "JPEG2000.dcm")),
]

def split_meta(data: bytes) -> tuple[bytes, bytes]:
    """(preamble and file meta group, dataset) of a Part 10 file pydicom wrote."""
    group_len = int.from_bytes(data[len(PREAMBLE) + 8 : len(PREAMBLE) + 12], "little")
    end = len(PREAMBLE) + 12 + group_len
    return data[:end], data[end:]


def deflated(dataset: bytes, syntax: str = DeflatedExplicitVRLittleEndian) -> bytes:
    """A Part 10 file whose dataset is `dataset` (explicit VR little endian), deflated."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return split_meta(save(instance(9, syntax)))[0] + z.compress(dataset) + z.flush()


# The C-STORE shape: a dataset off the wire behind a file meta header we wrote.
CSTORE_SEEDS = [split_meta(SEEDS[0])[0] + split_meta(save(instance(n)))[1] for n in (1, 6)]
SOP_CLASS = str(instance(1).SOPClassUID)
SOP_1 = str(instance(1).SOPInstanceUID)


def check_layout(layout: Layout, data: bytes) -> None:
    assert layout.size == len(data) and 0 <= layout.header_len <= layout.size
    for name in ("sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        assert uid_problem(layout.attrs[name]) is None
    assert uid_problem(layout.transfer_syntax_uid) is None


def scan_bytes(data: bytes) -> Layout | None:
    try:
        layout = scan(io.BytesIO(data), len(data))
    except InvalidInstance as exc:
        assert str(exc)
        return None
    check_layout(layout, data)
    return layout


# pure parsing, no IO: a slow example is a bug (a walk that does not end soon)
@settings(fuzz(3), deadline=timedelta(seconds=2))
@given(garbage(SEEDS))
# (regression) a deflated dataset with an element of VR 'SF': pydicom, which read
# deflated datasets then, raised NotImplementedError out of the walk
@example(deflated(b"\x08\x00\x50\x00SF\x02\x00AB"))
def test_scan_refuses_or_finds_a_sound_layout(data: bytes) -> None:
    scan_bytes(data)


@settings(fuzz(), deadline=timedelta(seconds=2))
@given(garbage(CSTORE_SEEDS))
def test_cstore_dataset_checks_refuse_or_agree(data: bytes) -> None:
    layout = scan_bytes(data)
    if layout is None:
        return
    which, why = mismatch(layout, SOP_CLASS, SOP_1)
    agrees = (layout.sop_instance_uid == SOP_1
              and layout.attrs.get("sop_class_uid", SOP_CLASS) == SOP_CLASS)
    assert (which == "") == agrees, why


@settings(fuzz(2), deadline=timedelta(seconds=2))
@given(texts([SOP_1, "1.2.840.10008.1.2", "0.0", "1.02"]))
def test_only_path_safe_uids_pass(value: str) -> None:
    """UIDs become path components on restore (node/uids.py)."""
    why = uid_problem(value)
    if why is None:
        assert 0 < len(value) <= 64 and set(value) <= set("0123456789.")
        assert ".." not in value and not value.startswith(".") and not value.endswith(".")
    else:
        assert 0 < len(why) < 1000  # a reason, however long the value (64 shown, escaped)


def glob_reference(pattern: str, value: str) -> bool:
    """`*` and `?` matching by dynamic programming: slow, obviously right."""
    ok = [[False] * (len(value) + 1) for _ in range(len(pattern) + 1)]
    ok[0][0] = True
    for i, c in enumerate(pattern, 1):
        ok[i][0] = ok[i - 1][0] and c == "*"
        for j in range(1, len(value) + 1):
            ok[i][j] = (ok[i - 1][j] or ok[i][j - 1]) if c == "*" else (
                ok[i - 1][j - 1] and c in ("?", value[j - 1]))
    return ok[-1][-1]


def pn_reference(pattern: str, value: str) -> bool:
    """PN matching of one component group, as README states it: case folded, trailing
    empty components are padding, and `X^*` also covers a value without the `^`."""
    key, have = pattern.casefold().rstrip("^"), value.casefold().rstrip("^")
    if key in ("", "*"):
        return True
    if "*" not in key and "?" not in key:
        return key == have
    padding = "^" * max(0, key.count("^") - have.count("^"))
    return glob_reference(key, have) or glob_reference(key, have + padding)


@settings(fuzz(3), deadline=timedelta(seconds=2))
@given(st.text(alphabet="aAb*?^", max_size=64), st.text(alphabet="aAb^", max_size=64),
       st.booleans())
# (regression) a regex of the pattern backtracked exponentially: this C-FIND key took
# minutes against a 60-letter name, holding the GIL (the whole node froze)
@example("*a" * 8 + "*b", "a" * 60, True)
def test_cfind_wildcards_match_right_in_bounded_time(pattern: str, value: str,
                                                     fold: bool) -> None:
    """C-FIND matching keys come off the network (node/dicom/query.py)."""
    key = Key("PatientName" if fold else "StudyDescription", "PN" if fold else "LO",
              (pattern,))
    expected = pn_reference(pattern, value) if fold else (
        pattern in ("", "*") or glob_reference(pattern, value))
    assert value_matches(key, value) == expected


def test_deflate_bomb_is_walked_in_bounded_memory() -> None:
    """Regression: a deflated dataset was inflated whole (by pydicom) before the walk:
    a 260 KB file that inflates to 256 MiB took 256 MiB of memory, and a larger one
    any amount. The identity attributes come before the bulk; only they are inflated."""
    ds = instance(9)
    dataset = split_meta(save(ds))[1]
    head = dataset[: dataset.index(b"\xe0\x7f\x10\x00")]
    pixels = b"\xe0\x7f\x10\x00OW\x00\x00" + (256 << 20).to_bytes(4, "little")
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [split_meta(deflated(b""))[0], z.compress(head + pixels)]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(256)]
    data = b"".join([*parts, z.flush()])
    assert len(data) < 400_000
    tracemalloc.start()
    try:
        layout = scan_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak >> 20} MiB to walk a {len(data) >> 10} KiB file"
    assert layout is not None and layout.sop_instance_uid == ds.SOPInstanceUID


class Node:
    """A real store holding an instance stored before any garbage."""

    def __init__(self, store: Store, clock: HybridClock, stored: dict[bytes, bytes]) -> None:
        self.store, self.clock, self.stored = store, clock, stored

    def __repr__(self) -> str:
        return "Node(...)"

    def assert_unharmed(self) -> None:
        for mid, data in self.stored.items():
            got = self.store.catalog.get(mid)
            assert got is not None and self.store.catalog.is_held(mid)
            assert b"".join(self.store.chunks.read(c.hash) for c in got[1].chunks) == data


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    store = Store(tmp_path_factory.mktemp("fuzz-dicom") / "node", partitions=16)
    clock = HybridClock()
    stored: dict[bytes, bytes] = {}
    try:
        for data in SEEDS[:5]:
            p = prepare_local(store, "n-fuzz", clock, data, "base")
            assert isinstance(p, Prepared)
            store.submit(p.manifest_id, p.raw, p.manifest).result(30)
            stored[p.manifest_id] = data
        yield Node(store, clock, stored)
    finally:
        store.close()


def store_result(node: Node, p: Prepared, data: bytes) -> None:
    """Commit what passed, as the C-STORE and ingest paths do, and read it back."""
    try:
        node.store.submit(p.manifest_id, p.raw, p.manifest).result(30)
    except InvalidInstance:
        return  # e.g. a known instance in another study: refused with its reason
    got = node.store.catalog.get(p.manifest_id)
    assert got is not None
    assert b"".join(node.store.chunks.read(c.hash) for c in got[1].chunks) == data


@fuzz(0.5)
@given(garbage(SEEDS + CSTORE_SEEDS))
def test_cstore_path_stores_or_refuses_and_harms_nothing(node: Node, data: bytes) -> None:
    """What StoreScp does with a received dataset: the walk, then prepare_local and the
    group commit (NodeDaemon.ingest_bytes)."""
    try:
        out = prepare_local(node.store, "n-fuzz", node.clock, data, "fuzz")
    except (InvalidInstance, StoreFull) as exc:
        assert str(exc)
    else:
        if isinstance(out, Prepared):
            check_layout(scan(io.BytesIO(data), len(data)), data)
            store_result(node, out, data)
        else:
            assert out.outcome == Outcome.DUPLICATE
    node.assert_unharmed()


def honest_stream(data: bytes, compress: bool) -> list[node_pb2.IngestMessage]:
    """What a correct client sends for `data` (its chunking at the header boundary)."""
    try:
        header_len = scan(io.BytesIO(data), len(data)).header_len
    except InvalidInstance:
        header_len = len(data)
    spans = chunk_spans(len(data), header_len, CHUNK_SIZE)
    msgs = [node_pb2.IngestMessage(begin=node_pb2.IngestBegin(
        client_ref="fuzz", size=len(data), file_hash=content_hash(data), header_len=header_len,
        chunk_count=len(spans)))]
    for off, length in spans:
        plain = data[off : off + length]
        payload = zstandard.ZstdCompressor(level=1).compress(plain) if compress else plain
        msgs.append(node_pb2.IngestMessage(part=node_pb2.IngestPart(
            hash=content_hash(plain), plain_len=length, compressed=compress, data=payload)))
    msgs.append(node_pb2.IngestMessage(end=node_pb2.IngestEnd()))
    return msgs


@fuzz(0.5)
@given(garbage(SEEDS), st.booleans())
def test_ingest_stream_walk_over_chunks_agrees(node: Node, data: bytes, compress: bool) -> None:
    """The node walks a streamed file over its chunks (ChunkReader), not a buffer: the
    verdict must be the buffer walk's."""
    session = IngestSession(node.store, "n-fuzz", node.clock)
    out = [r for m in honest_stream(data, compress) if (r := session.on_message(m)) is not None]
    assert session.close() is None
    assert len(out) == 1, out
    expected = scan_bytes(data)
    if isinstance(out[0], Prepared):
        assert expected is not None and out[0].manifest.size == len(data)
        store_result(node, out[0], data)
    else:
        assert out[0].outcome in (Outcome.REJECTED, Outcome.DUPLICATE), out[0]
        assert out[0].outcome == Outcome.DUPLICATE or expected is None, out[0].reason
        assert out[0].outcome == Outcome.DUPLICATE or out[0].reason
    node.assert_unharmed()
