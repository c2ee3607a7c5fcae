"""One node's storage: packs, the LMDB index and catalog, and the group committer.

What "durable on this node" means, in the order it happens:
  1. chunk records are appended to a pack (ingest threads, any number at once);
  2. the committer takes everything appended so far, fsyncs those packs,
  3. and commits one LMDB transaction (which fsyncs) that indexes the chunks,
     records pack lengths and adds the manifests;
  4. only then are the waiting ingests told their instances are stored.
A crash before 3 leaves bytes past the committed pack length, which `open` cuts
off; a crash after 3 loses nothing acknowledged. Many instances share one
fsync pair (group commit), so the cost per instance falls as load rises.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from node.catalog import Catalog
from node.chunkstore import ChunkStore, is_lmdb_full
from node.errors import DataDirLocked, StoreFull
from node.packs import PACK_SIZE_MAX, PackSet
from proto import node_pb2

LOGGER = logging.getLogger(__name__)

LMDB_MAP_SIZE = 1 << 40  # address space only (sparse); 1 TiB of index is ~10^9 chunks
COMMIT_BATCH_MAX = 4096  # manifests per transaction: bounds one commit's latency
FREE_RESERVE_BYTES = 64 << 20  # kept free so the index can always commit what packs hold


@dataclass
class CommitItem:
    manifest_id: bytes
    raw: bytes
    manifest: node_pb2.Manifest
    future: Future[bool]


class Store:
    def __init__(self, data_dir: Path, capacity_bytes: int = 0,
                 pack_size_max: int = PACK_SIZE_MAX) -> None:
        self.data_dir = data_dir
        self.capacity_bytes = capacity_bytes
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(data_dir)
        self.env: Any = lmdb.open(
            str(data_dir / "index"), map_size=LMDB_MAP_SIZE, max_dbs=16, subdir=True,
            sync=True, metasync=True, readahead=False, max_readers=512,
        )
        self.packs = PackSet(data_dir / "packs", pack_size_max)
        self.chunks = ChunkStore(self.env, self.packs)
        self.catalog = Catalog(self.env)
        for note in self.packs.recover(self.chunks.committed_pack_lengths()):
            LOGGER.warning("recovery: %s", note)
        self._queue: queue.Queue[CommitItem | None] = queue.Queue()
        self._closed = False
        self.commits = 0  # group commits done, and the manifests they carried
        self.committed_items = 0
        self._committer = threading.Thread(target=self._commit_loop, name="group-commit",
                                           daemon=True)
        self._committer.start()

    # ---- capacity -----------------------------------------------------------------

    def used_bytes(self) -> int:
        return sum(self.packs.existing().values()) + _dir_size(self.data_dir / "index")

    def free_bytes(self) -> int:
        disk_free = shutil.disk_usage(self.data_dir).free
        if self.capacity_bytes:
            return max(0, min(disk_free, self.capacity_bytes - self.used_bytes()))
        return disk_free

    def admit(self, size: int) -> None:
        """Refuse an instance that would not fit, before a byte of it is written."""
        free = self.free_bytes()
        if size + FREE_RESERVE_BYTES > free:
            raise StoreFull(
                f"storage full: {free} bytes free, this instance needs {size} plus a "
                f"{FREE_RESERVE_BYTES} byte reserve"
            )

    # ---- group commit -----------------------------------------------------------------

    def submit(self, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest) -> Future[bool]:
        """Queue a manifest whose chunks were appended; the future resolves once durable
        (True: new, False: it was already there)."""
        fut: Future[bool] = Future()
        if self._closed:
            fut.set_exception(StoreFull("store is closed"))
            return fut
        self._queue.put(CommitItem(manifest_id, raw, m, fut))
        return fut

    def _commit_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < COMMIT_BATCH_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[CommitItem]) -> None:
        snap = self.chunks.take_pending()
        now_ms = int(time.time() * 1000)
        try:
            self.packs.sync(sorted(snap.pack_lengths))
            with self.env.begin(write=True) as txn:
                self.chunks.index_pending(txn, snap)
                results = [
                    self.catalog.add(txn, it.manifest_id, it.raw, it.manifest, now_ms)
                    for it in batch
                ]
        except Exception as exc:
            self.chunks.restore_dirty(snap)
            err: Exception = exc
            if is_lmdb_full(exc) or isinstance(exc, OSError):
                err = StoreFull(f"disk full while committing the index: {exc}")
            LOGGER.error("group commit of %d instances failed: %s", len(batch), exc)
            for it in batch:
                it.future.set_exception(err)
            return
        self.chunks.forget_pending(snap)
        self.commits += 1
        self.committed_items += len(batch)
        for it, new in zip(batch, results, strict=True):
            it.future.set_result(new)

    def flush(self) -> None:
        """Make every appended chunk durable and indexed (used at shutdown)."""
        self._commit([])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._committer.join()
        self.flush()
        self.packs.close()
        self.env.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


def _lock_data_dir(data_dir: Path) -> int:
    fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirLocked(
            f"data dir {data_dir} is in use by {holder}; two nodes cannot share one data dir"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def _dir_size(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    except FileNotFoundError:
        return 0
