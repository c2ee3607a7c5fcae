"""Chunk encodings (node/codec.py): the byte shuffle is lossless for every length,
unknown flags are refused, and what ingest stores decodes to the very bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacsmesh.node import codec
from pacsmesh.node.errors import ChunkCorrupt
from pacsmesh.node.packs import FLAG_SHUFFLE2, FLAG_ZSTD
from pacsmesh.sample import StudySpec, make_instance
from tests.fuzz import fuzz


@fuzz(4)
@given(st.binary(max_size=4099))
def test_shuffle_round_trips_every_length(plain: bytes) -> None:
    assert codec.unshuffle2(bytes(codec.shuffle2(plain))) == plain
    for shuffle in (False, True):
        stored, flags = codec.encode(plain, shuffle)
        assert codec.decode(stored, flags, len(plain)) == plain


def test_shuffle_puts_high_bytes_together() -> None:
    assert bytes(codec.shuffle2(b"\x01\x02\x03\x04\x05")) == b"\x01\x03\x02\x04\x05"


def test_16_bit_pixels_compress_better_shuffled() -> None:
    """Realistic noise on a CT slice: shuffled chunks are smaller (the reason for it)."""
    ds = make_instance(StudySpec(study_index=1, seed=7), 1, 1)
    noise = np.random.default_rng(1).normal(0, 12, ds.pixel_array.shape)
    pixels = (ds.pixel_array + noise).clip(0, 4095).astype(np.uint16).tobytes()
    plain, _ = codec.encode(pixels, False)
    shuffled, flags = codec.encode(pixels, True)
    assert flags == FLAG_ZSTD | FLAG_SHUFFLE2
    assert len(shuffled) < 0.85 * len(plain), (len(shuffled), len(plain))


def test_incompressible_bytes_are_stored_as_they_are() -> None:
    noise = np.random.default_rng(2).integers(0, 256, 65536, dtype=np.uint8).tobytes()
    assert codec.encode(noise, True) == (noise, 0)


@pytest.mark.parametrize("flags", [0x04, 0x80, 0xFF])
def test_unknown_flags_are_refused(flags: int) -> None:
    with pytest.raises(ChunkCorrupt, match="unknown chunk encoding"):
        codec.decode(b"abc", flags, 3)


@pytest.mark.parametrize(("ts", "offset", "want"), [
    ("1.2.840.10008.1.2.1", 4096, True),  # pixel chunk of explicit VR LE
    ("1.2.840.10008.1.2", 4096, True),
    ("1.2.840.10008.1.2.1", 0, False),  # the header chunk
    ("1.2.840.10008.1.2.4.70", 4096, False),  # JPEG Lossless: already compressed
    ("1.2.840.10008.1.2.1.99", 4096, False),  # deflated
])
def test_which_chunks_are_shuffled(ts: str, offset: int, want: bool) -> None:
    assert codec.shuffled(ts, offset, 1024) is want


def test_ingest_stores_pixel_chunks_shuffled(tmp_path: object) -> None:
    from pathlib import Path

    from pacsmesh.node.hlc import HybridClock
    from pacsmesh.node.ingest import Prepared, prepare_local
    from pacsmesh.node.store import Store

    ds = make_instance(StudySpec(study_index=3, seed=3), 1, 1)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    store = Store(Path(str(tmp_path)) / "node")
    try:
        prepared = prepare_local(store, "n1", HybridClock(), data, "ref")
        assert isinstance(prepared, Prepared)
        store.submit(prepared.manifest_id, prepared.raw, prepared.manifest).result()
        refs = list(prepared.manifest.chunks)
        header, *pixels = (store.chunks.locate(c.hash) for c in refs)
        assert header is not None and not header.flags & FLAG_SHUFFLE2
        assert pixels and all(p is not None and p.flags & FLAG_SHUFFLE2 for p in pixels)
        assert b"".join(store.chunks.read(c.hash) for c in refs) == data
    finally:
        store.close()
