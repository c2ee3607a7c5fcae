"""The element walker against pydicom's own test files, truncations and fuzzing."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsmesh.node.chunking import chunk_spans
from pacsmesh.node.dicom_layout import scan
from pacsmesh.node.errors import InvalidInstance
from pacsmesh.node.uids import uid_problem
from pacsmesh.sample import StudySpec, make_instance

PYDICOM_FILES = sorted(
    (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm"))


def _scan_bytes(data: bytes):  # type: ignore[no-untyped-def]
    return scan(io.BytesIO(data), len(data))


def _sample_bytes(**kw: object) -> bytes:
    buf = io.BytesIO()
    make_instance(StudySpec(rows=64, columns=64, **kw), 1, 1).save_as(  # type: ignore[arg-type]
        buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("path", PYDICOM_FILES, ids=lambda p: p.name)
def test_agrees_with_pydicom(path: Path) -> None:
    """Where pydicom reads a Part 10 file with full identity, we find the same UIDs and
    cut the header exactly before the Pixel Data value."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected = (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        has_meta = bool(getattr(ds, "preamble", None) is not None and "TransferSyntaxUID"
                        in ds.file_meta)
    except Exception:  # no identity for pydicom: we must refuse it too
        expected, has_meta = ("", "", ""), False
    if not has_meta or not all(expected):
        with pytest.raises(InvalidInstance):
            scan(open(path, "rb"), path.stat().st_size)  # noqa: SIM115
        return
    data = path.read_bytes()
    try:
        layout = _scan_bytes(data)
    except InvalidInstance as exc:
        assert "truncated" in str(exc) or "UID" in str(exc), exc
        return
    got = (layout.sop_instance_uid, layout.study_instance_uid, layout.series_instance_uid)
    if all(uid_problem(u) is None for u in expected):
        assert got == expected
    if layout.header_len < len(data) and not layout.transfer_syntax_uid.endswith(".99"):
        tag = data[layout.header_len - 12 : layout.header_len - 8]
        tag_implicit = data[layout.header_len - 8 : layout.header_len - 4]
        assert {b"\xe0\x7f", b"\x7f\xe0"} & {tag[:2], tag_implicit[:2]}, "cut not at Pixel Data"


def test_sample_layout() -> None:
    data = _sample_bytes()
    layout = _scan_bytes(data)
    assert layout.size - layout.header_len == 64 * 64 * 2
    assert layout.attrs["patient_name"] == "DOE^JANE"
    assert layout.attrs["modality"] == "CT"


def test_every_truncation_is_refused_with_a_reason() -> None:
    data = _sample_bytes()
    header_len = _scan_bytes(data).header_len
    for cut in list(range(0, header_len + 64)) + list(range(header_len, len(data), 97)):
        piece = data[:cut]
        try:
            layout = _scan_bytes(piece)
        except InvalidInstance as exc:
            if cut > header_len:
                assert "truncated" in str(exc), (cut, exc)
            continue
        # a cut exactly between two header elements is a shorter valid file
        assert cut < header_len and layout.size == cut, cut


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_flipped_bytes_never_crash(data: st.DataObject) -> None:
    raw = bytearray(_sample_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, 1200))
        raw[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(InvalidInstance):
        _scan_bytes(bytes(raw))


def test_clear_reasons() -> None:
    with pytest.raises(InvalidInstance, match="empty file"):
        _scan_bytes(b"")
    with pytest.raises(InvalidInstance, match="not a DICOM Part 10 file"):
        _scan_bytes(b"hello, this is a text file\n" * 20)
    with pytest.raises(InvalidInstance, match="not a DICOM Part 10 file"):
        _scan_bytes(os.urandom(4096))


def test_missing_and_invalid_uids() -> None:
    ds = make_instance(StudySpec(rows=8, columns=8), 1, 1)
    del ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(InvalidInstance, match=r"no SOP Instance UID \(0008,0018\)"):
        _scan_bytes(buf.getvalue())
    for bad in ("1.2.3.abc", "../../etc/passwd", "1." + "2" * 70, "1..2"):
        ds = make_instance(StudySpec(rows=8, columns=8), 1, 1)
        ds.StudyInstanceUID = bad
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with pytest.raises(InvalidInstance, match="invalid Study Instance UID"):
            _scan_bytes(buf.getvalue())


def test_uid_rules() -> None:
    assert uid_problem("1.2.840.10008.1.2") is None
    assert uid_problem("1.2.03") is None  # leading zeros: tolerated, path-safe
    for bad in ("", ".1.2", "1.2.", "1..2", "1.2.a", "1/2", "1.2 ", "1" * 65):
        assert uid_problem(bad) is not None, bad


@given(st.integers(0, 10_000_000), st.data())
def test_chunk_spans_cover_exactly(size: int, data: st.DataObject) -> None:
    header_len = data.draw(st.integers(0, size))
    chunk = data.draw(st.sampled_from([1 << 10, 1 << 16, 1 << 20]))
    spans = chunk_spans(size, header_len, chunk)
    pos = 0
    for offset, length in spans:
        assert offset == pos and 0 < length <= chunk
        pos += length
    assert pos == size
    assert header_len in (0, size) or any(o == header_len for o, _ in spans)
