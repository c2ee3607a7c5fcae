"""Garbage collection in-process: real LMDB, real packs, a controlled clock.

What is reclaimed (unheld copies, abandoned uploads), what never is (a chunk a
held instance names, shared or not), compaction removing packs and giving the
space back, counts of an older data dir, and every batch far past its size.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from pacsmesh.node import chunkrefs
from pacsmesh.node import gc as gc_mod
from pacsmesh.node import manifest as mf
from pacsmesh.node.chunkrefs import BACKFILL_KEY, FORMAT_KEY
from pacsmesh.node.config import GcSection
from pacsmesh.node.errors import ChunkMissing
from pacsmesh.node.gc import Collector
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.store import Store
from pacsmesh.node.worker import WorkerState
from pacsmesh.proto import node_pb2

GRACE_S = 100.0
CFG = GcSection(rate_mb_s=10_000, interval_s=1e9, loose_grace_s=GRACE_S, compact_below=0.75,
                seal_min_dead_mb=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _chunk(i: int, size: int = 3000) -> bytes:
    return random.Random(i).randbytes(size)


def _instance(store: Store, i: int, chunks: list[bytes], study: str = "1.2.3"
              ) -> tuple[bytes, node_pb2.Manifest]:
    for c in chunks:
        store.chunks.put(content_hash(c), len(c), c, 0)
    body = b"".join(chunks)
    m = node_pb2.Manifest(format=1, sop_instance_uid=f"{study}.{i}", study_instance_uid=study,
                          series_instance_uid=f"{study}.0", size=len(body),
                          file_hash=content_hash(body), received_hlc=(i + 1) << 16)
    for c in chunks:
        m.chunks.add(hash=content_hash(c), size=len(c))
    mid, raw = mf.encode(m)
    store.submit(mid, raw, m).result(30)
    return mid, m


def _run_pass(collector: Collector) -> None:
    async def drive() -> None:
        collector.request_pass()
        for _ in range(1_000_000):
            if await collector.step() == WorkerState.IDLE and not collector.state.running:
                return
        raise AssertionError("gc pass never ended")
    asyncio.run(drive())


def _pack_files(store: Store) -> dict[int, int]:
    return store.packs.existing()


def test_unheld_copies_are_reclaimed_after_the_grace_and_packs_shrink(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, pack_size_max=64 << 10)
    kept = [_instance(store, i, [_chunk(i)]) for i in range(0, 100, 2)]
    dropped = [_instance(store, i, [_chunk(i)]) for i in range(1, 100, 2)]
    used_before = store.packs.bytes_total()
    assert store.unhold([mid for mid, _ in dropped]) == len(dropped)
    collector = Collector(store, CFG, clock=clock)
    assert collector.totals()["loose_chunks"] == len(dropped)

    _run_pass(collector)  # within the grace: nothing goes
    assert collector.state.chunks_reclaimed == 0
    assert all(store.chunks.has(c.hash) for _, m in dropped for c in m.chunks)

    clock.now = time.time() + 2 * GRACE_S  # (loose chunks are stamped by the wall clock)
    _run_pass(collector)
    assert collector.state.chunks_reclaimed == len(dropped)
    assert collector.state.packs_compacted > 0
    assert not any(store.chunks.has(c.hash) for _, m in dropped for c in m.chunks)
    for _, m in kept:  # every held chunk still reads back, verified
        for c in m.chunks:
            assert store.chunks.read(c.hash)
    assert store.packs.bytes_total() < 0.7 * used_before
    assert store.packs.bytes_total() == sum(_pack_files(store).values())
    store.close()
    store = Store(tmp_path, pack_size_max=64 << 10)  # and after a restart
    for _, m in kept:
        for c in m.chunks:
            assert store.chunks.read(c.hash)
    store.close()


def test_a_shared_chunk_stays_while_any_holder_holds_it(tmp_path: Path) -> None:
    clock = Clock()
    clock.now = time.time() + 10 * GRACE_S
    store = Store(tmp_path, pack_size_max=32 << 10)
    shared = _chunk(10_000)
    a, _ = _instance(store, 1, [shared, _chunk(1)])
    b, _ = _instance(store, 2, [shared, _chunk(2)])
    store.unhold([a])
    collector = Collector(store, CFG, clock=clock)
    _run_pass(collector)
    assert store.chunks.read(content_hash(shared)) == shared  # b still names it
    assert not store.chunks.has(content_hash(_chunk(1)))
    store.unhold([b])  # (b's put found it here while a held it: that mark is older)
    _run_pass(collector)
    assert not store.chunks.has(content_hash(shared))
    store.close()


def test_an_abandoned_upload_is_reclaimed_a_held_instance_is_not(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, pack_size_max=32 << 10)
    held, _ = _instance(store, 1, [_chunk(1)])
    orphans = [_chunk(i) for i in range(100, 130)]  # sent, never committed as an instance
    for c in orphans:
        store.chunks.put(content_hash(c), len(c), c, 0)
    store.barrier().result(10)
    collector = Collector(store, CFG, clock=clock)
    assert collector.totals()["loose_chunks"] == len(orphans)
    clock.now = time.time() + 2 * GRACE_S
    _run_pass(collector)
    assert collector.totals()["loose_chunks"] == 0
    assert not any(store.chunks.has(content_hash(c)) for c in orphans)
    assert store.catalog.is_held(held) and store.chunks.read(content_hash(_chunk(1)))
    store.close()


def test_a_chunk_reclaimed_under_an_ingest_fails_that_ingest_not_silently(
        tmp_path: Path) -> None:
    store = Store(tmp_path)
    c = _chunk(7)
    store.chunks.put(content_hash(c), len(c), c, 0)
    store.barrier().result(10)
    with store.env.begin(write=True) as txn:  # GC got there between dedup and commit
        assert store.refs.take_loose(txn, content_hash(c), 1 << 62)
        assert store.chunks.reclaim(txn, content_hash(c))
    m = node_pb2.Manifest(format=1, sop_instance_uid="1.2.9.1", study_instance_uid="1.2.9",
                          series_instance_uid="1.2.9.0", size=len(c), file_hash=content_hash(c),
                          received_hlc=1 << 16)
    m.chunks.add(hash=content_hash(c), size=len(c))
    mid, raw = mf.encode(m)
    with pytest.raises(ChunkMissing, match="send it again"):
        store.submit(mid, raw, m).result(10)
    assert not store.catalog.is_held(mid)
    store.close()


def test_a_reused_chunk_is_left_alone(tmp_path: Path) -> None:
    store = Store(tmp_path)
    c = _chunk(8)
    store.chunks.put(content_hash(c), len(c), c, 0)
    store.barrier().result(10)
    assert store.chunks.missing([content_hash(c)]) == []  # an upload's precheck found it
    collector = Collector(store, CFG, clock=lambda: time.time() + 2 * GRACE_S)
    _run_pass(collector)
    assert store.chunks.has(content_hash(c))
    store.close()


def test_reclaim_and_compaction_far_past_their_batches(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 loose chunks (RECLAIM_BATCH 1024) and packs of hundreds of records each
    (COMPACT_BATCH 64): every dead one goes, every live one stays and reads back."""
    monkeypatch.setattr(gc_mod, "COMPACT_BATCH", 16)
    store = Store(tmp_path, pack_size_max=256 << 10)
    rng = random.Random(5)
    live: list[bytes] = []
    for i in range(20_000):
        c = rng.randbytes(rng.randrange(40, 200)) + i.to_bytes(4, "big")
        store.chunks.put(content_hash(c), len(c), c, 0)
        if i % 5 == 0:
            live.append(c)
    store.barrier().result(30)
    live_keys = {content_hash(c) for c in live}
    with store.env.begin(write=True) as txn:  # a held instance names every fifth chunk
        store.refs.hold(txn, live_keys)
    packs_before = len(_pack_files(store))
    collector = Collector(store, CFG, clock=lambda: time.time() + 2 * GRACE_S)
    _run_pass(collector)
    assert collector.state.chunks_reclaimed == 20_000 - len(live)
    assert store.chunks.count() == len(live)
    for c in live:
        assert store.chunks.read(content_hash(c)) == c
    assert len(_pack_files(store)) < packs_before / 2
    loose, loose_bytes, live_bytes = store.refs.totals()
    assert (loose, loose_bytes) == (0, 0)
    assert live_bytes == sum(store.refs.live_by_pack().values())
    walked = store.chunks.walk((0, -1), 1_000_000)  # the scrubber's walk: exactly the live
    assert {key for _, key in walked} == live_keys
    store.close()


def test_counts_of_an_older_data_dir_are_made_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkrefs, "BACKFILL_BATCH", 7)  # far fewer than the 80+ counted
    store = Store(tmp_path, pack_size_max=32 << 10)
    for i in range(40):
        _instance(store, i, [_chunk(i), _chunk(1000 + i % 3)])
    orphan = _chunk(999)
    store.chunks.put(content_hash(orphan), len(orphan), orphan, 0)
    store.barrier().result(10)
    store.unhold(store.catalog.versions_of("1.2.3.5"))
    expected = (store.refs.totals(), store.refs.live_by_pack(), _users(store))
    with store.env.begin(write=True) as txn:  # as a data dir from before GC looks
        for db in (store.refs.users, store.refs.loose, store.refs.pack_live):
            txn.drop(db, delete=False)
        txn.delete(FORMAT_KEY, db=store.refs.meta)
        txn.put(BACKFILL_KEY, b"1", db=store.refs.meta)  # and one interrupted half-way
    store.close()
    store = Store(tmp_path, pack_size_max=32 << 10)
    got = (store.refs.totals(), store.refs.live_by_pack(), _users(store))
    assert got == expected
    store.close()


def _users(store: Store) -> dict[bytes, bytes]:
    with store.env.begin(db=store.refs.users) as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}


def test_a_damaged_record_is_not_copied_and_its_pack_stays(tmp_path: Path) -> None:
    store = Store(tmp_path, pack_size_max=16 << 10)
    mids = [_instance(store, i, [_chunk(i)])[0] for i in range(12)]
    store.unhold(mids[1:])  # pack 1 will be mostly dead
    victim = content_hash(_chunk(0))
    loc = store.chunks.locate(victim)
    assert loc is not None
    path = store.packs.dir / f"pack-{loc.pack:08d}.dat"
    with open(path, "r+b") as f:  # flip a byte inside the victim's stored bytes
        f.seek(loc.offset + loc.record_len - 10)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    bad: list[bytes] = []
    collector = Collector(store, CFG, on_bad=lambda key, at, why: bad.append(key),
                          clock=lambda: time.time() + 2 * GRACE_S)
    _run_pass(collector)
    assert bad == [victim]
    assert path.exists()  # still the indexed copy: never removed, never copied as good
    store.close()


def test_a_copy_unheld_for_damage_keeps_its_good_chunks_until_repaired(tmp_path: Path) -> None:
    """The scrubber unholds every instance naming a damaged chunk; their other chunks
    must survive GC (a repair fetches only the bad one), and a repair that holds them
    again must not count them twice."""
    store = Store(tmp_path)
    good, bad = _chunk(1), _chunk(2)
    mid, m = _instance(store, 1, [good, bad])
    store.unhold([mid], damaged=True)
    assert not store.catalog.is_held(mid)
    collector = Collector(store, CFG, clock=lambda: time.time() + 2 * GRACE_S)
    _run_pass(collector)
    assert store.chunks.read(content_hash(good)) == good  # kept for the repair
    store.submit(mid, mf.encode(m)[1], m).result(10)  # repaired: held again
    assert _users(store) == {content_hash(good): b"\x00\x00\x00\x01",
                             content_hash(bad): b"\x00\x00\x00\x01"}
    store.unhold([mid], damaged=True)
    store.unhold([mid])  # then trimmed after all: now the chunks may go
    store.chunks.reused_window_s = 0
    _run_pass(collector)
    assert not store.chunks.has(content_hash(good)) and _users(store) == {}
    store.close()
