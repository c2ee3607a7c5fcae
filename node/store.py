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
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from pacsmesh.node.catalog import Catalog
from pacsmesh.node.chunkrefs import ChunkRefs
from pacsmesh.node.chunkstore import ChunkStore, is_lmdb_full
from pacsmesh.node.errors import ChunkMissing, DataDirLocked, InvalidInstance, StoreFull
from pacsmesh.node.manifest import decode as manifest_decode
from pacsmesh.node.packs import PACK_SIZE_MAX, READ_FDS_MAX, PackSet, pack_name
from pacsmesh.node.retention import RetentionSection
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)

_U32 = struct.Struct(">I")
LMDB_MAP_SIZE = 1 << 40  # address space only (sparse); 1 TiB of index is ~10^9 chunks
COMMIT_BATCH_MAX = 4096  # manifests per transaction: bounds one commit's latency
FREE_RESERVE_BYTES = 64 << 20  # kept free so the index can always commit what packs hold
FREE_CACHE_S = 0.5  # a statvfs per instance costs more than the check is worth


@dataclass
class CommitItem:
    manifest_id: bytes
    raw: bytes  # b"": no manifest, only commit the chunks appended so far (`barrier`)
    manifest: node_pb2.Manifest
    future: Future[bool]
    held: bool = True  # every chunk was appended: record this node as a holder
    # written to the audit trail by the committer once the manifest is durable, before
    # the future resolves (one wake-up less per instance than an audit of its own)
    audit: Any = None
    audit_error: str = ""  # the audit event could not be written (the instance is stored)


class Store:
    def __init__(self, data_dir: Path, capacity_bytes: int = 0,
                 pack_size_max: int = PACK_SIZE_MAX, partitions: int = 1024,
                 read_fds_max: int = READ_FDS_MAX,
                 retention: RetentionSection | None = None) -> None:
        self.data_dir = data_dir
        self.capacity_bytes = capacity_bytes
        self._free_at, self._free_cached, self._admitted_since_check = -1e9, 0, 0
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_data_dir(data_dir)
        self.env: Any = lmdb.open(
            str(data_dir / "index"), map_size=LMDB_MAP_SIZE, max_dbs=64, subdir=True,
            sync=True, metasync=True, readahead=False, max_readers=512,
        )
        self.packs = PackSet(data_dir / "packs", pack_size_max, read_fds_max)
        self.refs = ChunkRefs(self.env)
        self.chunks = ChunkStore(self.env, self.packs, self.refs)
        self.catalog = Catalog(self.env, partitions, self.refs, retention)
        self.retired = self.env.open_db(b"retired_packs")
        self._remove_retired()
        for note in self.packs.recover(self.chunks.committed_pack_lengths()):
            LOGGER.warning("recovery: %s", note)
        self.refs.backfill(self.catalog.manifests, self.catalog.held)
        self._queue: queue.Queue[CommitItem | None] = queue.Queue()
        self._closed = False
        # writes audit events durably, in the committer's thread (AuditLog.record_now)
        self.audit_sink: Callable[[list[Any]], None] | None = None
        self.commits = 0  # group commits done, and the manifests they carried
        self.committed_items = 0
        self._committer = threading.Thread(target=self._commit_loop, name="group-commit",
                                           daemon=True)
        self._committer.start()

    # ---- capacity -----------------------------------------------------------------

    def used_bytes(self) -> int:
        """Packs plus the index, in O(1): called per status request and per admission
        check, so it must not list the packs (a 100 TB node has ~200,000)."""
        return self.packs.bytes_total() + _file_size(self.data_dir / "index" / "data.mdb")

    def free_bytes(self) -> int:
        now = time.monotonic()
        if now - self._free_at < FREE_CACHE_S:
            return self._free_cached
        self._free_at, self._free_cached = now, self._free_bytes()
        self._admitted_since_check = 0  # the fresh reading includes what they wrote
        return self._free_cached

    def _free_bytes(self) -> int:
        disk_free = shutil.disk_usage(self.data_dir).free
        if self.capacity_bytes:
            return max(0, min(disk_free, self.capacity_bytes - self.used_bytes()))
        return disk_free

    def used_fraction(self) -> float:
        """How full this node's storage is: of capacity_bytes when set, else of the disk."""
        if self.capacity_bytes:
            return min(1.0, self.used_bytes() / self.capacity_bytes)
        usage = shutil.disk_usage(self.data_dir)
        return usage.used / usage.total if usage.total else 0.0

    def admit(self, size: int) -> None:
        """Refuse an instance that would not fit, before a byte of it is written."""
        free = max(0, self.free_bytes() - self._admitted_since_check)
        if size + FREE_RESERVE_BYTES > free:
            raise StoreFull(
                f"storage full: {free} bytes free, this instance needs {size} plus a "
                f"{FREE_RESERVE_BYTES} byte reserve"
            )
        self._admitted_since_check += size  # counts until the next fresh reading

    # ---- group commit -----------------------------------------------------------------

    def submit(self, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest,
               held: bool = True, audit: Any = None) -> Future[bool]:
        """Queue a manifest for the next group commit; the future resolves once durable
        (True: new, False: it was already there). `held`: its chunks were appended here.
        `audit`: an event written to the audit trail once the manifest is durable and
        before the future resolves; the item's `audit_error` says if it could not be."""
        return self.submit_item(CommitItem(manifest_id, raw, m, Future(), held, audit))

    def submit_item(self, item: CommitItem) -> Future[bool]:
        if self._closed:
            item.future.set_exception(StoreFull("store is closed"))
        else:
            self._queue.put(item)
        return item.future

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
                results: list[bool | InvalidInstance | ChunkMissing] = [
                    self._add(txn, it, now_ms) for it in batch]
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
        self._audit(batch, results)
        for it, new in zip(batch, results, strict=True):
            if isinstance(new, Exception):
                it.future.set_exception(new)
            else:
                it.future.set_result(new)

    def _audit(self, batch: list[CommitItem],
               results: list[bool | InvalidInstance | ChunkMissing]) -> None:
        events = [it.audit for it, new in zip(batch, results, strict=True)
                  if it.audit is not None and not isinstance(new, Exception)]
        if not events:
            return
        try:
            if self.audit_sink is None:
                raise OSError("no audit trail attached to the store")
            self.audit_sink(events)
        except OSError as exc:
            LOGGER.error("audit events of a group commit cannot be written: %s", exc)
            for it in batch:
                if it.audit is not None:
                    it.audit_error = str(exc)

    def _add(self, txn: Any, it: CommitItem, now_ms: int
             ) -> bool | InvalidInstance | ChunkMissing:
        """One manifest of a group commit; a refused one fails alone, not its batch."""
        if not it.raw:  # a barrier
            return False
        if it.held:
            # every chunk must be indexed as this commits: GC may have reclaimed one an
            # ingest found here and named without sending (rare: it waits out a grace)
            gone = [c.hash for c in it.manifest.chunks
                    if txn.get(c.hash, db=self.chunks.db) is None]
            if gone:
                return ChunkMissing(
                    f"chunk {gone[0].hex()[:16]} of instance {it.manifest.sop_instance_uid} "
                    "was reclaimed as unused while the instance was being stored; "
                    "send it again")
        try:
            return self.catalog.add(txn, it.manifest_id, it.raw, it.manifest,
                                    now_ms if it.held else None)
        except InvalidInstance as exc:
            return exc

    def unhold(self, manifest_ids: list[bytes], damaged: bool = False) -> int:
        """Stop counting this node as a holder of these manifests (trimmed, or found bad:
        `damaged`, whose chunks GC keeps for the repair). Chunks no held manifest needs
        any more are reclaimed by garbage collection."""
        done = 0
        with self.env.begin(write=True) as txn:
            for mid in manifest_ids:
                raw = txn.get(mid, db=self.catalog.manifests)
                if raw is None:
                    continue
                before = txn.get(mid, db=self.catalog.held) is not None
                self.catalog.unset_held(txn, mid, manifest_decode(bytes(raw)), damaged)
                done += before
        return done

    def unhold_unchanged(self, study_uid: str, all_digest: bytes,
                         manifest_ids: list[bytes]) -> int | None:
        """`unhold`, in one transaction with a check that the study's set of versions is
        still the one the caller judged (None: it changed, nothing was done)."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(study_uid.encode(), db=self.catalog.study_recs)
            rec = node_pb2.StudyRecord()
            if raw is None:
                return None
            rec.ParseFromString(bytes(raw))
            if rec.all_digest != all_digest:
                return None
            done = 0
            for mid in manifest_ids:
                m_raw = txn.get(mid, db=self.catalog.manifests)
                if m_raw is None:
                    continue
                done += txn.get(mid, db=self.catalog.held) is not None
                self.catalog.unset_held(txn, mid, manifest_decode(bytes(m_raw)))
        return done

    def barrier(self) -> Future[bool]:
        """Resolves once every chunk appended before this call is durable and indexed
        (through the group committer, in order with the ingests it serves)."""
        return self.submit_item(CommitItem(b"", b"", node_pb2.Manifest(), Future(), False))

    # ---- pack removal (compaction) ------------------------------------------------------

    def retire_pack(self, pack_no: int) -> bool:
        """Remove a pack whose live chunks were all copied elsewhere and committed.

        One transaction checks that no index entry names a record in it and forgets it;
        only then is the file unlinked. A crash between the two leaves it listed in
        `retired_packs`, and the next open removes it. Returns False (nothing done) if a
        chunk still lives there."""
        if pack_no == self.packs.active_no:
            return False
        key = _U32.pack(pack_no)
        start = struct.pack(">IQ", pack_no, 0)
        with self.env.begin(write=True) as txn:
            if self.refs.live_of(txn, pack_no) > 0:
                # the walk missed something the index counts there (e.g. a data dir
                # whose walk entries predate the scrubber): never unlink live bytes
                LOGGER.error("%s: %d live bytes by the index's count though the walk finds "
                             "none; not removed", pack_name(pack_no),
                             self.refs.live_of(txn, pack_no))
                return False
            cur = txn.cursor(db=self.chunks.locs_db)
            dead = []
            ok = cur.set_range(start)
            while ok and bytes(cur.key()[:4]) == key:
                loc_key, chunk = bytes(cur.key()), bytes(cur.value())
                raw = txn.get(chunk, db=self.chunks.db)
                if raw is not None and bytes(raw)[:12] == struct.pack("<IQ", *struct.unpack(
                        ">IQ", loc_key)):
                    return False  # still the indexed copy of `chunk`
                dead.append(loc_key)
                ok = cur.next()
            for loc_key in dead:
                txn.delete(loc_key, db=self.chunks.locs_db)
            txn.delete(key, db=self.chunks.packs_db)
            self.refs.forget_pack(txn, pack_no)
            txn.put(key, b"", db=self.retired)
        self.packs.remove(pack_no)
        with self.env.begin(write=True) as txn:
            txn.delete(key, db=self.retired)
        return True

    def _remove_retired(self) -> None:
        """Packs forgotten by a committed compaction whose files a crash left behind."""
        with self.env.begin(db=self.retired) as txn:
            numbers = [_U32.unpack(k)[0] for k in txn.cursor().iternext(values=False)]
        for no in numbers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.packs.dir / pack_name(no))
                LOGGER.warning("recovery: removed %s, compacted before a crash", pack_name(no))
        if numbers:
            self.packs.sync_dir()
            with self.env.begin(write=True, db=self.retired) as txn:
                for no in numbers:
                    txn.delete(_U32.pack(no))

    def flush(self) -> None:
        """Make every appended chunk durable and indexed (used at shutdown)."""
        self._commit([])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        LOGGER.info("closing store: %d group commits carried %d manifests", self.commits,
                    self.committed_items)
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


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
