"""Bounded resources with thousands of packs: open descriptors and the byte counter.

Real stores (real LMDB, real pack files, real fsync) with 4 KiB packs, so a few
thousand chunks make 3,200 packs: far more than the descriptor cap. Every chunk
is the same size, so a record sits at the same offset in every pack: a pread
through a descriptor of the wrong pack would return a well-formed record of
another chunk, which only the key and hash checks of every read can tell.
The low open-file limit is set in a child process (`python -m
tests.test_pack_bounds`), which prints what it measured as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pacsmesh.node.errors import ChunkCorrupt
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.packs import RECORD_HEADER_LEN, pack_name
from pacsmesh.node.readfds import ReadFds
from pacsmesh.node.scrubber import Scrubber
from pacsmesh.node.store import Store

PACK_SIZE_MAX = 4096
CHUNK_LEN = 1200  # 3 records of 1,252 bytes per 4 KiB pack
CHUNKS = 9600  # -> 3,200 packs
CHILD_FILES_SOFT = 256  # a service manager's limit, scaled down
CHILD_READ_FDS_MAX = 64  # well under it: packs, LMDB, stdio and asyncio share the rest
CHILD_TIMEOUT_S = 120.0
REPO = Path(__file__).resolve().parent.parent


def chunk(i: int) -> bytes:
    return i.to_bytes(4, "little") * (CHUNK_LEN // 4)


def pack_sizes(data_dir: Path) -> dict[int, int]:
    return {int(p.stem.split("-")[1]): p.stat().st_size
            for p in (data_dir / "packs").glob("pack-*.dat")}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # not the listing's own


class FdSampler:
    """The most descriptors this process had open, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = open_fds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FdSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, open_fds())


def build_store(data_dir: Path) -> None:
    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX)
    for i in range(CHUNKS):
        data = chunk(i)
        store.chunks.put(content_hash(data), len(data), data, 0)
    store.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store of 3,200 packs, built once (the fsync per pack is most of the cost)."""
    data_dir = tmp_path_factory.mktemp("built") / "node"
    build_store(data_dir)
    assert len(pack_sizes(data_dir)) >= CHUNKS // 3
    return data_dir


@pytest.fixture
def data_dir(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built store: tests damage and scrub it."""
    out = tmp_path / "node"
    shutil.copytree(built, out)
    return out


# ---- the child: thousands of packs under a low open-file limit ----------------------------


async def scrub_pass(scrubber: Scrubber) -> None:
    scrubber.request_pass()
    await scrubber.step()
    while scrubber.state.running:
        await scrubber.step()


def child(data_dir: Path) -> dict[str, int]:
    """Read every chunk, delete two packs, run a full scrub pass; say what it cost."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (CHILD_FILES_SOFT, hard))
    loop = asyncio.new_event_loop()  # its descriptors belong to the baseline
    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX, read_fds_max=CHILD_READ_FDS_MAX)
    scrubber = Scrubber(store, rate_mb_s=1e6, interval_s=3600.0)
    baseline = open_fds()
    out = {"baseline": baseline, "packs": len(pack_sizes(data_dir))}
    with FdSampler() as sampler:
        order = list(range(CHUNKS))
        random.Random(8).shuffle(order)
        for i in order:
            data = chunk(i)
            if store.chunks.read(content_hash(data)) != data:
                raise AssertionError(f"chunk {i} came back different")
        out["peak_after_reads"] = sampler.peak
        for no in (7, 1500):  # damage the scrub must find, and the counter must follow
            (data_dir / "packs" / pack_name(no)).unlink()
        loop.run_until_complete(scrub_pass(scrubber))
    out["peak"] = sampler.peak
    out["scrubbed"] = scrubber.state.pass_chunks
    out["corrupt_found"] = scrubber.state.corrupt_found
    out["bytes_total"] = store.packs.bytes_total()
    out["bytes_on_disk"] = sum(pack_sizes(data_dir).values())
    store.close()
    loop.close()
    return out


def test_thousands_of_packs_under_a_low_open_file_limit(data_dir: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_pack_bounds", str(data_dir)], cwd=REPO,
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["packs"] > 10 * CHILD_FILES_SOFT  # one descriptor per pack would run out
    # the LRU's cap, plus one spare for a directory fsync; nothing else opens per pack
    assert got["peak"] <= got["baseline"] + CHILD_READ_FDS_MAX + 1, got
    assert got["peak_after_reads"] >= got["baseline"] + CHILD_READ_FDS_MAX // 2, (
        f"the cache never filled: this test did not exercise eviction: {got}")
    assert got["scrubbed"] == CHUNKS - 6, got  # two packs of three records are gone
    assert got["corrupt_found"] == 6, got
    assert got["bytes_total"] == got["bytes_on_disk"], got
    assert time.monotonic() - started < CHILD_TIMEOUT_S


# ---- many threads, a tiny cap ---------------------------------------------------------------


def run_threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            target(t)
        except BaseException as exc:  # reported by the test, with the others
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def test_concurrent_reads_across_thousands_of_packs_with_eight_descriptors(
        data_dir: Path) -> None:
    cap, threads, reads_per_thread = 8, 12, 2000
    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX, read_fds_max=cap)
    baseline = open_fds()

    def reader(t: int) -> None:
        rng = random.Random(t)
        for _ in range(reads_per_thread):
            i = rng.randrange(CHUNKS)
            data = chunk(i)
            got = store.chunks.read(content_hash(data))  # raises on another pack's record
            if got != data:
                raise AssertionError(f"chunk {i} came back different")

    try:
        with FdSampler() as sampler:
            errors = run_threads(threads, reader)
        assert errors == [], errors[:3]
        assert sampler.peak <= baseline + cap, (sampler.peak, baseline)
    finally:
        store.close()


def test_read_fds_never_closes_a_descriptor_in_use(tmp_path: Path) -> None:
    """The LRU alone: each borrower checks it holds its own file (by inode) while other
    threads evict and reopen, so a recycled descriptor number would be caught."""
    files = []
    for k in range(200):
        path = tmp_path / f"f{k}"
        path.write_bytes(b"x")
        files.append(path)
    inodes = [p.stat().st_ino for p in files]
    cap = 4
    fds = ReadFds(lambda k: os.open(files[k], os.O_RDONLY), cap)

    def borrower(t: int) -> None:
        rng = random.Random(t)
        for n in range(1500):
            k = rng.randrange(len(files))
            with fds.borrow(k) as fd:
                if n % 7 == 0:
                    time.sleep(0)  # let other threads evict and reopen meanwhile
                if os.fstat(fd).st_ino != inodes[k]:
                    raise AssertionError(f"descriptor {fd} for file {k} is another file")
                if fds.open_count() > cap:
                    raise AssertionError(f"{fds.open_count()} descriptors open, cap {cap}")

    errors = run_threads(16, borrower)
    assert errors == [], errors[:3]
    before = open_fds()
    fds.close()
    assert fds.open_count() == 0
    assert open_fds() == before - cap


# ---- the byte counter -----------------------------------------------------------------------


def assert_counter_true(store: Store, data_dir: Path) -> None:
    assert store.packs.bytes_total() == sum(pack_sizes(data_dir).values())
    index = (data_dir / "index" / "data.mdb").stat().st_size
    assert store.used_bytes() == store.packs.bytes_total() + index


def forbid_listing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a store's pack listing fail, to show a call does not list the packs."""

    def listing() -> dict[int, int]:
        raise AssertionError("listed every pack")

    monkeypatch.setattr(store.packs, "existing", listing)


def test_byte_counter_follows_appends_restarts_recovery_and_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "node"
    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX)
    keys = []
    for i in range(300):  # 100 packs
        data = chunk(i)
        keys.append(content_hash(data))
        store.chunks.put(keys[-1], len(data), data, 0)
        if i % 50 == 0:
            assert_counter_true(store, data_dir)
    store.flush()
    forbid_listing(store, monkeypatch)
    store.used_bytes()  # O(1): the listing would raise
    monkeypatch.undo()
    store.close()

    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX)  # restart
    assert_counter_true(store, data_dir)
    # appended, never committed, then a crash: recovery cuts it and the counter follows
    for i in range(300, 310):
        data = chunk(i)
        store.chunks.put(content_hash(data), len(data), data, 0)
    store.packs.close()
    store.env.close()
    os.close(store._lock_fd)
    cut_before = sum(pack_sizes(data_dir).values())
    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX)
    assert sum(pack_sizes(data_dir).values()) < cut_before
    assert_counter_true(store, data_dir)

    # a pack deleted outside pacsmesh, noticed by a read
    loc = store.chunks.locate(keys[30])
    assert loc is not None
    (data_dir / "packs" / pack_name(loc.pack)).unlink()
    with pytest.raises(ChunkCorrupt, match="missing"):
        store.chunks.read(keys[30])
    assert_counter_true(store, data_dir)
    # a pack read from (its descriptor cached), then deleted
    loc = store.chunks.locate(keys[60])
    assert loc is not None
    store.chunks.read(keys[60])
    (data_dir / "packs" / pack_name(loc.pack)).unlink()
    with pytest.raises(ChunkCorrupt, match="missing"):
        store.chunks.read(keys[60])
    assert_counter_true(store, data_dir)
    # a pack cut inside a record, noticed by a read
    loc = store.chunks.locate(keys[91])
    assert loc is not None
    os.truncate(data_dir / "packs" / pack_name(loc.pack), loc.offset + RECORD_HEADER_LEN)
    with pytest.raises(ChunkCorrupt, match="past the end"):
        store.chunks.read(keys[91])
    assert_counter_true(store, data_dir)
    # the active pack deleted, noticed by the next append
    active = max(pack_sizes(data_dir))
    (data_dir / "packs" / pack_name(active)).unlink()
    data = chunk(400)
    store.chunks.put(content_hash(data), len(data), data, 0)
    assert_counter_true(store, data_dir)
    store.close()

    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX)
    assert_counter_true(store, data_dir)
    store.close()


def test_sealed_pack_lengths_are_kept_only_until_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory does not grow per pack, and a failed group commit loses no pack length."""
    data_dir = tmp_path / "node"
    store = Store(data_dir, pack_size_max=PACK_SIZE_MAX)
    for i in range(300):  # 100 packs, a commit every 10 chunks
        data = chunk(i)
        store.chunks.put(content_hash(data), len(data), data, 0)
        if i % 10 == 9:
            store.flush()
    assert store.packs._sealed_len == {}

    def failing_sync(pack_nos: list[int]) -> None:
        raise OSError("injected: fsync failed")

    for i in range(300, 330):  # appended, then their commit fails
        data = chunk(i)
        store.chunks.put(content_hash(data), len(data), data, 0)
    monkeypatch.setattr(store.packs, "sync", failing_sync)
    store.flush()
    monkeypatch.undo()
    for i in range(330, 345):  # more packs sealed before the retry
        data = chunk(i)
        store.chunks.put(content_hash(data), len(data), data, 0)
    store.flush()
    assert store.chunks.committed_pack_lengths() == pack_sizes(data_dir)
    assert store.packs._sealed_len == {}
    store.close()


if __name__ == "__main__":
    print(json.dumps(child(Path(sys.argv[1]))))
