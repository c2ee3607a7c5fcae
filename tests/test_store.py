"""The store in-process: real LMDB, real pack files, real fsync."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pacsmesh.node import manifest as mf
from pacsmesh.node.errors import ChunkCorrupt, DataDirLocked
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.packs import FLAG_ZSTD, RECORD_HEADER_LEN, pack_name
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2


def _manifest(i: int, chunk: bytes) -> tuple[bytes, bytes, node_pb2.Manifest]:
    m = node_pb2.Manifest(format=1, sop_instance_uid=f"1.2.3.{i}", study_instance_uid="1.2.3",
                          series_instance_uid="1.2.3.0", size=len(chunk),
                          file_hash=content_hash(chunk), received_hlc=i)
    m.chunks.add(hash=content_hash(chunk), size=len(chunk))
    mid, raw = mf.encode(m)
    return mid, raw, m


def test_put_commit_read(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = b"pixel" * 1000
    key = content_hash(data)
    assert store.chunks.put(key, len(data), data, 0) > len(data)
    assert store.chunks.put(key, len(data), data, 0) == 0  # dedup while pending
    assert store.submit(*_manifest(1, data)).result(10) is True
    assert store.chunks.read(key) == data
    store.close()
    store = Store(tmp_path)  # reopen: everything committed is there
    assert store.chunks.read(key) == data
    assert store.chunks.missing([key, b"\x00" * 32]) == [b"\x00" * 32]
    store.close()


def test_bad_chunk_is_never_returned(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = bytes(range(256)) * 64
    key = content_hash(data)
    store.chunks.put(key, len(data), data, 0)
    store.flush()
    loc = store.chunks.locate(key)
    assert loc is not None
    pack = tmp_path / "packs" / pack_name(loc.pack)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + RECORD_HEADER_LEN + 100] ^= 0x01  # one bit in the chunk's bytes
    pack.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorrupt, match="failed hash verification"):
        store.chunks.read(key)
    raw[loc.offset + 10] ^= 0xFF  # the record header itself
    pack.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorrupt, match="damaged"):
        store.chunks.read(key)
    store.close()


def test_compressed_chunk_with_bad_frame(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = b"x" * 5000
    key = content_hash(data)
    store.chunks.put(key, len(data), b"not a zstd frame", FLAG_ZSTD)
    store.flush()
    with pytest.raises(ChunkCorrupt):
        store.chunks.read(key)
    store.close()


def test_recovery_cuts_unacknowledged_bytes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = b"good" * 100
    store.chunks.put(content_hash(good), len(good), good, 0)
    store.flush()
    committed = store.packs.size_of(1)
    # appended but never committed: what a crash leaves behind
    lost = b"lost" * 100
    store.chunks.put(content_hash(lost), len(lost), lost, 0)
    store.packs.close()
    store.env.close()
    os.close(store._lock_fd)
    assert (tmp_path / "packs" / pack_name(1)).stat().st_size > committed
    store = Store(tmp_path)
    assert (tmp_path / "packs" / pack_name(1)).stat().st_size == committed
    assert store.chunks.read(content_hash(good)) == good
    assert not store.chunks.has(content_hash(lost))
    store.close()


def test_second_store_on_same_dir_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(DataDirLocked, match="in use"):
        Store(tmp_path)
    store.close()


def test_group_commit_batches_concurrent_writers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    futures = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        for i in range(50):
            data = f"{w}-{i}".encode() * 100
            store.chunks.put(content_hash(data), len(data), data, 0)
            fut = store.submit(*_manifest(w * 1000 + i, data))
            with lock:
                futures.append(fut)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(f.result(30) for f in futures)
    assert store.committed_items == 400
    assert store.commits < 400, "every manifest paid its own fsync: no group commit"
    store.close()


def test_pack_rotation(tmp_path: Path) -> None:
    store = Store(tmp_path, pack_size_max=64 << 10)
    keys = []
    for i in range(40):
        data = bytes([i]) * 10_000
        keys.append(content_hash(data))
        store.chunks.put(keys[-1], len(data), data, 0)
    store.flush()
    store.close()
    store = Store(tmp_path, pack_size_max=64 << 10)
    assert len(list((tmp_path / "packs").glob("pack-*.dat"))) > 3
    for i, key in enumerate(keys):
        assert store.chunks.read(key) == bytes([i]) * 10_000
    store.close()
