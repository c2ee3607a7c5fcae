"""Fuzz: pack records and the chunk index on disk (node/packs.py, node/chunkstore.py),
and the catalog's stored values behind them.

Disks and operators damage files: bits flip, packs are cut short or overwritten,
index values rot. Whatever the damage, a read returns the exact bytes stored or
raises ChunkCorrupt / ChunkMissing naming the chunk; never another exception,
never other bytes. A damaged data dir still opens, the scrubber walks it to the
end and takes what it finds bad out of the held copies, and every instance
restores byte-identical or fails with ChunkCorrupt / ChunkMissing.
"""

from __future__ import annotations

import io
import shutil
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from pacsmesh.node import codec
from pacsmesh.node.codec import decompress
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import Prepared, prepare_local
from pacsmesh.node.packs import FLAG_ZSTD, pack_name
from pacsmesh.node.scrubber import Scrubber
from pacsmesh.node.store import Store
from pacsmesh.sample import StudySpec, make_instance
from tests.fuzz import fuzz, garbage, mutated

SPEC = StudySpec(study_index=71, seed=31, rows=32, columns=32, patient_id="PMFUZZ03")
PLAIN = [b"", b"a" * 5000, bytes(range(256)) * 40, b"pixel" * 3000, b"\x00"]


def zstd_frame(content_size: int, rle_bytes: int = 100) -> bytes:
    """A zstd frame that declares `content_size` and holds one RLE block."""
    head = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)
    return head + (1 | 1 << 1 | rle_bytes << 3).to_bytes(3, "little") + b"x"


def dicom(i: int) -> bytes:
    buf = io.BytesIO()
    make_instance(SPEC, 1, i).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Built:
    """A data dir holding chunks (plain and zstd) and a study; copied per example."""

    def __init__(self, path: Path, chunks: dict[bytes, bytes], files: dict[str, bytes]) -> None:
        self.path, self.chunks, self.files = path, chunks, files

    def __repr__(self) -> str:
        return "Built(...)"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    path = tmp_path_factory.mktemp("fuzz-packs") / "node"
    store = Store(path, partitions=16)
    chunks: dict[bytes, bytes] = {}
    files: dict[str, bytes] = {}
    try:
        cctx = zstandard.ZstdCompressor(level=1)
        for i, plain in enumerate(PLAIN):
            key = content_hash(plain)
            if i % 2:
                store.chunks.put(key, len(plain), cctx.compress(plain), FLAG_ZSTD)
            else:
                store.chunks.put(key, len(plain), plain, 0)
            chunks[key] = plain
        clock = HybridClock()
        for i in (1, 2):
            data = dicom(i)
            p = prepare_local(store, "n", clock, data, "x")
            assert isinstance(p, Prepared)
            assert store.submit(p.manifest_id, p.raw, p.manifest).result(30)
            files[p.manifest.sop_instance_uid] = data
            offset = 0
            for c in p.manifest.chunks:
                chunks[c.hash] = data[offset : offset + c.size]
                offset += c.size
        store.flush()
    finally:
        store.close()
    return Built(path, chunks, files)


@pytest.fixture(scope="module")
def live(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """An open store over a copy of `built`, whose files the examples damage and mend."""
    path = tmp_path_factory.mktemp("fuzz-packs-live") / "node"
    shutil.copytree(built.path, path)
    store = Store(path, partitions=16)
    try:
        yield store
    finally:
        store.close()


def pack_path(store: Store) -> Path:
    (path,) = sorted(store.packs.dir.glob("pack-*.dat"))
    return path


def assert_reads_true_or_corrupt(store: Store, chunks: dict[bytes, bytes]) -> None:
    for key, plain in chunks.items():
        try:
            got = store.chunks.read(key)
        except (ChunkCorrupt, ChunkMissing) as exc:
            assert key.hex()[:16] in str(exc), exc
        else:
            assert got == plain, "a damaged chunk read back as other bytes"
        for level in (0, 3):  # as stored, and compressed again for a slow link
            try:
                plain_len, flags, data = store.chunks.for_peer(key, level)
            except (ChunkCorrupt, ChunkMissing):
                break
            got = codec.decode(data, flags, plain_len)
            assert got == plain, "a peer would have been sent other bytes"


def pack_seeds(built: Built) -> list[bytes]:
    return [(built.path / "packs" / pack_name(1)).read_bytes()]


@fuzz()
@given(st.data())
def test_damaged_pack_reads_true_or_corrupt(built: Built, live: Store,
                                            data: st.DataObject) -> None:
    path = pack_path(live)
    original = path.read_bytes()
    damaged = data.draw(mutated([original]))
    try:
        path.write_bytes(damaged)  # in place: the cached descriptors see it
        assert_reads_true_or_corrupt(live, built.chunks)
    finally:
        path.write_bytes(original)
    assert_reads_true_or_corrupt(live, built.chunks)


@fuzz()
@given(st.data())
def test_damaged_index_value_reads_true_or_corrupt(built: Built, live: Store,
                                                   data: st.DataObject) -> None:
    """Regression: an index entry of the wrong length (b'' here) raised struct.error,
    not ChunkCorrupt, from every read and from the scrubber's walk."""
    key = data.draw(st.sampled_from(sorted(built.chunks)))
    with live.env.begin(db=live.chunks.db) as txn:
        original = bytes(txn.get(key))
    damaged = data.draw(garbage([original], max_size=40))
    with live.env.begin(write=True, db=live.chunks.db) as txn:
        txn.put(key, damaged)
    try:
        assert_reads_true_or_corrupt(live, {key: built.chunks[key]})
    finally:
        with live.env.begin(write=True, db=live.chunks.db) as txn:
            txn.put(key, original)


@fuzz(0.25)
@given(st.data())
def test_damaged_data_dir_opens_scrubs_and_restores_true_or_fails(
        built: Built, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    path = tmp_path_factory.mktemp("fuzz-packs-dir") / "node"
    shutil.copytree(built.path, path)
    pack = path / "packs" / pack_name(1)
    if data.draw(st.booleans()):
        pack.write_bytes(data.draw(mutated(pack_seeds(built))))
    store = Store(path, partitions=16)
    try:
        for key in data.draw(st.lists(st.sampled_from(sorted(built.chunks)), max_size=3)):
            with store.env.begin(write=True, db=store.chunks.db) as txn:
                txn.put(key, data.draw(garbage([bytes(txn.get(key))], max_size=40)))
        scrubber = Scrubber(store, rate_mb_s=1000, interval_s=3600)
        after = (0, -1)
        # (regression) an entry naming another chunk's record made the scrubber drop
        # that chunk's walk entry (never verified again), and one naming an earlier or
        # later position moved the pass back or past chunks it had yet to verify
        for _ in range(len(built.chunks) + 1):  # a pass ends, whatever the damage
            batch = store.chunks.walk(after, 4)
            if not batch:
                break
            scrubber._verify_batch(batch)
            assert (batch[-1][0].pack, batch[-1][0].offset) > after
            after = (batch[-1][0].pack, batch[-1][0].offset)
        else:
            raise AssertionError("the scrub pass did not end")
        assert_reads_true_or_corrupt(store, built.chunks)
        walked = {key for _, key in store.chunks.walk((0, -1), 1000)}
        for key in built.chunks:
            if store.chunks.locate(key) is not None:
                assert key in walked, "a chunk still held left the scrubber's walk"
        for study in store.catalog.study_uids():
            for mid, _, m in store.catalog.current_manifests(study):
                try:
                    restored = b"".join(store.chunks.read(c.hash) for c in m.chunks)
                except (ChunkCorrupt, ChunkMissing):
                    assert not store.catalog.is_held(mid), "a damaged copy still counts"
                    continue
                assert restored == built.files[m.sop_instance_uid]
    finally:
        store.close()
        shutil.rmtree(path)


def test_zstd_frame_declaring_a_huge_size_is_corrupt_not_allocated() -> None:
    """Regression: python-zstandard sizes its output by the frame's declared content
    size and ignores max_output_size then: a 16-byte frame declaring 1 TiB raised
    MemoryError (not ChunkCorrupt) from every reader of stored, sent or peer chunks,
    and a declared 2 GiB was allocated."""
    for declared in (1 << 40, 1 << 31, 4 << 20 + 1, 101):
        with pytest.raises(ChunkCorrupt, match=f"declares {declared} bytes, not 100"):
            decompress(zstd_frame(declared), 100)
    assert decompress(zstd_frame(100), 100) == b"x" * 100


def test_a_record_past_the_end_is_corrupt_without_reading_it(live: Store) -> None:
    """Regression: an index entry naming offset 2**63 raised OverflowError from pread
    (not ChunkCorrupt), and one naming a 4 GiB record had 4 GiB allocated for the read
    before it came back short."""
    tracemalloc.start()
    try:
        for offset, length in ((2**63, 100), (0, 2**32 - 1), (2**64 - 1, 2**32 - 1)):
            with pytest.raises(ChunkCorrupt, match="runs past the end of the pack"):
                live.packs.read(1, offset, length)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
