"""Small instances whose text is in a given character set, and a way to store one as
a version of pacsmesh from before character sets were honoured did: its text read
as Latin-1 (as UTF-8 under ISO_IR 192)."""

from __future__ import annotations

import io

import pydicom

from pacsmesh.node import manifest as mf
from pacsmesh.node.chunking import chunk_spans
from pacsmesh.node.dicom_layout import TEXT_FIELDS, TEXT_VRS, Layout, scan
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2
from pacsmesh.sample import StudySpec, make_instance, study_uid

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
SEED = 77  # keeps these study uids apart from other tests' samples


def spec(index: int, name: str, patient_id: str = "") -> StudySpec:
    return StudySpec(study_index=index, instances=1, rows=8, columns=8, seed=SEED,
                     patient_id=patient_id or f"PM{index:05d}", patient_name=name)


def instance_bytes(index: int, name: str, specific_character_set: str,
                   patient_id: str = "", description: str = "") -> bytes:
    """A Part 10 file of one 8x8 CT slice; pydicom encodes its text in the set."""
    ds = make_instance(spec(index, name, patient_id), 1, 1)
    ds.SpecificCharacterSet = specific_character_set.split("\\")
    if description:
        ds.StudyDescription = description
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def uid_of(index: int) -> str:
    return study_uid(spec(index, ""))


def legacy_text(data: bytes) -> dict[str, str]:
    """Text fields as the old decoding read them (TEXT_VRS: tag -> VR)."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    utf8 = "ISO_IR 192" in str(ds.get_item(0x00080005).value)
    out = {}
    for tag, name in zip(TEXT_VRS, TEXT_FIELDS, strict=True):
        item = ds.get_item(tag)
        if item is not None and item.value:
            raw = bytes(item.value).rstrip(b"\x00 ")
            out[name] = (raw.decode("utf-8", "replace") if utf8 else raw.decode("latin-1")
                         ).strip()
    return out


def store_legacy(store: Store, data: bytes) -> node_pb2.Manifest:
    """Store `data` through the Store API with the old decoding's text in its manifest."""
    layout = scan(io.BytesIO(data), len(data))
    old = Layout(layout.size, layout.header_len, layout.transfer_syntax_uid,
                 {**layout.attrs, **legacy_text(data)})
    chunks = []
    for offset, length in chunk_spans(len(data), layout.header_len):
        part = data[offset : offset + length]
        key = content_hash(part)
        store.chunks.put(key, length, part, 0)
        chunks.append((key, length))
    m = mf.build(old, content_hash(data), chunks, "old-node", 1 << 40)
    mid, raw = mf.encode(m)
    store.submit(mid, raw, m).result(60)
    return m
