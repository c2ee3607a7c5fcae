"""Append-only pack files: the bytes of every chunk, one record after another.

A record is self-describing (magic, hash algorithm, flags, key, lengths, a CRC
of the header) so the scrubber and a rebuild can walk packs without the index.
Packs never change in place: a crash can only leave bytes past the last
committed length, and `recover` cuts those off (they were never acknowledged).

Bounds, whatever the number of packs (a 100 TB node has ~200,000):
- open descriptors: at most `read_fds_max` for reads (an LRU, see node/readfds.py),
  1 for appends to the active pack, and 1 for a moment while a sealed pack or the
  directory is fsync'd; the store adds LMDB's own (data.mdb, its meta-sync handle,
  lock.mdb) and the data dir's LOCK;
- `bytes_total` is O(1): a running count, set from one directory listing at
  `recover` and again only after a read or append noticed a pack deleted or cut
  outside pacsmesh.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from pacsmesh.node.errors import ChunkCorrupt, StoreFull
from pacsmesh.node.hashing import HASH_ALGO_ID, HASH_LEN
from pacsmesh.node.readfds import ReadFds

LOGGER = logging.getLogger(__name__)
RECORD_MAGIC = b"PMCK"
RECORD_VERSION = 1
FLAG_ZSTD = 0x01  # one zstd frame
FLAG_SHUFFLE2 = 0x02  # byte-shuffled in 2-byte elements before compression (codec.py)
_HEADER = struct.Struct("<4sBBBB32sII")  # magic, version, algo, flags, reserved, key, plain, stored
_CRC = struct.Struct("<I")
RECORD_HEADER_LEN = _HEADER.size + _CRC.size
PACK_SIZE_MAX = 512 << 20  # small enough to scrub or copy one at a time, big enough to keep few fds
# A quarter of the 1,024 open files a service manager often allows, leaving the rest to
# sockets and LMDB; 256 packs are 128 GiB, more than the hot set of reads (the scrubber
# walks packs in order, so it needs one at a time).
READ_FDS_MAX = 256


@dataclass(frozen=True, slots=True)
class RecordHeader:
    flags: int
    key: bytes
    plain_len: int
    stored_len: int


def encode_header(key: bytes, flags: int, plain_len: int, stored_len: int) -> bytes:
    assert len(key) == HASH_LEN
    head = _HEADER.pack(
        RECORD_MAGIC, RECORD_VERSION, HASH_ALGO_ID, flags, 0, key, plain_len, stored_len
    )
    return head + _CRC.pack(zlib.crc32(head))


def decode_header(raw: bytes, where: str) -> RecordHeader:
    if len(raw) != RECORD_HEADER_LEN:
        raise ChunkCorrupt(f"{where}: record header cut short ({len(raw)} bytes)")
    head, crc = raw[: _HEADER.size], _CRC.unpack(raw[_HEADER.size :])[0]
    magic, version, algo, flags, _, key, plain_len, stored_len = _HEADER.unpack(head)
    if magic != RECORD_MAGIC or zlib.crc32(head) != crc:
        raise ChunkCorrupt(f"{where}: record header is damaged")
    if version != RECORD_VERSION or algo != HASH_ALGO_ID:
        raise ChunkCorrupt(f"{where}: unknown record version {version} or hash algorithm {algo}")
    return RecordHeader(flags=flags, key=key, plain_len=plain_len, stored_len=stored_len)


def pack_name(pack_no: int) -> str:
    return f"pack-{pack_no:08d}.dat"


class PackSet:
    """The pack files of one node. Appends are serialised; reads are concurrent preads
    through a bounded cache of descriptors."""

    def __init__(self, directory: Path, pack_size_max: int = PACK_SIZE_MAX,
                 read_fds_max: int = READ_FDS_MAX) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pack_size_max = pack_size_max
        self._lock = threading.Lock()
        self._reads = ReadFds(self._open_read, read_fds_max)
        self._active_no = 0
        self._active_fd = -1
        self._active_len = 0
        self._dirty: set[int] = set()
        self._sealed_len: dict[int, int] = {}  # final lengths of dirty sealed packs only
        self._bytes = 0  # all packs on disk, under _lock
        self._recount = False  # a pack changed outside pacsmesh: list the directory once
        self._noticed: dict[int, int] = {}  # pack -> size a read found (-1: gone); damage only

    def existing(self) -> dict[int, int]:
        """pack number -> size on disk."""
        out: dict[int, int] = {}
        for path in self.dir.glob("pack-*.dat"):
            try:
                out[int(path.stem.split("-")[1])] = path.stat().st_size
            except (ValueError, IndexError, FileNotFoundError):  # deleted since the listing
                continue
        return out

    def bytes_total(self) -> int:
        """Bytes of all pack files, without listing them (see the module's bounds)."""
        with self._lock:
            if self._recount:
                self._recount = False  # before listing: a change noticed meanwhile recounts
                self._bytes = sum(self.existing().values())
            return self._bytes

    def recover(self, committed: dict[int, int]) -> list[str]:
        """Cut every pack back to its committed length; open the last one for appends.

        Returns one line per repair for the log. Bytes past the committed length
        were written by an ingest that was never acknowledged.
        """
        notes: list[str] = []
        on_disk = self.existing()
        self._bytes = sum(min(size, committed.get(no, 0)) for no, size in on_disk.items())
        for no, size in sorted(on_disk.items()):
            keep = committed.get(no, 0)
            if size > keep:
                with open(self.dir / pack_name(no), "r+b") as f:
                    f.truncate(keep)
                    os.fsync(f.fileno())
                notes.append(f"{pack_name(no)}: dropped {size - keep} unacknowledged bytes")
            elif size < keep:
                notes.append(
                    f"{pack_name(no)}: {keep - size} committed bytes are missing "
                    "(the scrubber will find and repair the chunks)"
                )
        numbers = set(on_disk) | set(committed)
        self._active_no = max(numbers) if numbers else 1
        self._open_active()
        return notes

    def _open_active(self) -> None:
        path = self.dir / pack_name(self._active_no)
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._active_len = os.fstat(self._active_fd).st_size

    def append(self, key: bytes, flags: int, plain_len: int,
               stored: bytes) -> tuple[int, int, int]:
        """Write one record (not yet durable). Returns (pack, offset of record, record length).

        On ENOSPC the partial record is cut off again, so the pack stays a clean
        sequence of records, and StoreFull is raised.
        """
        record = encode_header(key, flags, plain_len, len(stored)) + stored
        with self._lock:
            st = os.fstat(self._active_fd)
            if st.st_nlink == 0 or st.st_size != self._active_len:
                # Someone deleted or cut the pack under us: never append where the index
                # cannot follow. What it lost, the scrubber finds and repairs.
                LOGGER.error("%s was deleted or changed outside pacsmesh; starting a new pack",
                             pack_name(self._active_no))
                self._active_len = st.st_size
                self._recount = True
                self._rotate()
            elif self._active_len > 0 and self._active_len + len(record) > self.pack_size_max:
                self._rotate()
            offset = self._active_len
            try:
                written = os.write(self._active_fd, record)
                if written != len(record):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                os.ftruncate(self._active_fd, offset)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    name = pack_name(self._active_no)
                    raise StoreFull(f"disk full while writing {name}") from exc
                raise
            self._active_len = offset + len(record)
            self._bytes += len(record)
            self._dirty.add(self._active_no)
            return self._active_no, offset, len(record)

    def _rotate(self) -> None:
        os.fsync(self._active_fd)  # the old pack is finished: make it durable before leaving it
        os.close(self._active_fd)
        if self._active_no in self._dirty:  # else the last snapshot took its final length
            self._sealed_len[self._active_no] = self._active_len
        self._active_no += 1
        self._open_active()
        self._sync_dir()

    def remove(self, pack_no: int) -> None:
        """Unlink a sealed pack the index no longer names (compaction), durably."""
        if pack_no == self._active_no:
            raise ValueError("the active pack cannot be removed")
        self._reads.drop(pack_no)
        path = self.dir / pack_name(pack_no)
        try:
            size = path.stat().st_size
            os.unlink(path)
        except FileNotFoundError:
            size = 0
        self._sync_dir()
        with self._lock:
            self._bytes = max(0, self._bytes - size)
            self._dirty.discard(pack_no)
            self._sealed_len.pop(pack_no, None)

    def seal_active(self) -> int:
        """Start a new active pack, so the current one can be compacted; returns the
        number of the pack sealed (its records are committed by the next group commit,
        like any append's)."""
        with self._lock:
            sealed = self._active_no
            self._rotate()
            return sealed

    @property
    def active_no(self) -> int:
        return self._active_no

    def sync_dir(self) -> None:
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def snapshot(self) -> dict[int, int]:
        """Lengths of the packs written since the last sync; call under the caller's ordering."""
        with self._lock:
            dirty = {
                # a sealed pack's length is needed once: pop it, or one entry per pack stays
                no: (self._active_len if no == self._active_no else self._sealed_len.pop(no))
                for no in self._dirty
            }
            self._dirty.clear()
            return dirty

    def mark_dirty(self, pack_nos: dict[int, int]) -> None:
        """Packs of a snapshot whose commit failed: the next snapshot reports them again."""
        with self._lock:
            self._dirty.update(pack_nos)
            for no, length in pack_nos.items():
                if no != self._active_no:  # sealed since, maybe longer than the snapshot saw
                    self._sealed_len[no] = max(self._sealed_len.get(no, 0), length)

    def sync(self, pack_nos: list[int]) -> None:
        for no in pack_nos:
            if no == self._active_no:
                os.fsync(self._active_fd)
            else:
                with open(self.dir / pack_name(no), "rb") as f:
                    os.fsync(f.fileno())

    def size_of(self, pack_no: int) -> int:
        return (self.dir / pack_name(pack_no)).stat().st_size

    def _open_read(self, pack_no: int) -> int:
        return os.open(self.dir / pack_name(pack_no), os.O_RDONLY)

    def read(self, pack_no: int, offset: int, record_len: int) -> tuple[RecordHeader, bytes]:
        where = f"{pack_name(pack_no)}@{offset}"
        raw = self._pread(pack_no, offset, record_len, where)
        if len(raw) != record_len:
            raise ChunkCorrupt(f"{where}: record runs past the end of the pack")
        header = decode_header(raw[:RECORD_HEADER_LEN], where)
        if RECORD_HEADER_LEN + header.stored_len != record_len:
            raise ChunkCorrupt(f"{where}: record length disagrees with the index")
        return header, raw[RECORD_HEADER_LEN:]

    def _pread(self, pack_no: int, offset: int, length: int, where: str) -> bytes:
        for _ in range(2):  # a cached handle of a deleted pack, then the name
            try:
                with self._reads.borrow(pack_no) as fd:
                    st = os.fstat(fd)
                    if st.st_nlink == 0:
                        # Deleted: reading through an old handle would hide the loss (the
                        # bytes die with the handle); look it up by name like a restart would.
                        self._reads.discard(pack_no, fd)
                        continue
                    if offset + length > st.st_size:
                        # cut short, or a damaged index entry: pread would allocate its
                        # length (up to 4 GiB) or fail on an offset past 2**63 first
                        self._notice(pack_no, st.st_size)
                        return b""
                    raw = os.pread(fd, length, offset)
                    if len(raw) != length:
                        self._notice(pack_no, os.fstat(fd).st_size)
                    return raw
            except FileNotFoundError as exc:
                self._notice(pack_no, -1)
                raise ChunkCorrupt(f"{where}: pack file is missing") from exc
        raise ChunkCorrupt(f"{where}: pack file was deleted while being read")

    def _notice(self, pack_no: int, size: int) -> None:
        """A read found a pack cut or gone (-1): recount its bytes, once per change."""
        with self._lock:
            if self._noticed.get(pack_no) != size:
                self._noticed[pack_no] = size
                self._recount = True

    def close(self) -> None:
        with self._lock:
            if self._active_fd >= 0:
                os.fsync(self._active_fd)
                os.close(self._active_fd)
                self._active_fd = -1
            self._reads.close()
