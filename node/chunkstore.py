"""Content-addressed chunks: pack records found through an LMDB index.

A chunk becomes visible to readers the moment it is appended (so an instance
can reference a chunk another stream just sent), but it enters the index only
in a group commit, after its pack was fsync'd. Every read verifies the hash of
the plain bytes: a chunk that fails is never returned.
"""

from __future__ import annotations

import collections
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import lmdb
import zstandard

from pacsmesh.node import codec
from pacsmesh.node.chunkrefs import ChunkRefs, now_ms
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.packs import FLAG_SHUFFLE2, FLAG_ZSTD, PackSet

_LOC = struct.Struct("<IQIIB")  # pack, record offset, record length, plain length, flags


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    pack: int
    offset: int
    record_len: int
    plain_len: int
    flags: int

    def encode(self) -> bytes:
        return _LOC.pack(self.pack, self.offset, self.record_len, self.plain_len, self.flags)

    @staticmethod
    def decode(raw: bytes) -> ChunkLocation:
        if len(raw) != _LOC.size:
            raise ChunkCorrupt(f"index entry is {len(raw)} bytes, not {_LOC.size}")
        return ChunkLocation(*_LOC.unpack(raw))


@dataclass(frozen=True, slots=True)
class PendingSnapshot:
    """What one group commit makes durable: chunks appended so far and pack lengths."""

    chunks: dict[bytes, ChunkLocation]
    pack_lengths: dict[int, int]


_tls = threading.local()


FRESH_VERIFIED_S = 60.0
FRESH_VERIFIED_MAX = 65_536  # keys remembered (2 MB)
# Chunks an ingest found here and will name without sending them again (dedup, an
# upload's precheck): GC leaves these alone for this long. The commit re-checks every
# chunk anyway; this keeps that check from ever having to refuse an instance.
REUSED_WINDOW_S = 3600.0
REUSED_MAX = 131_072
WIRE_ZSTD_LEVEL_MAX = 9  # beyond this a level costs far more CPU than it saves bytes


def _cctx(level: int) -> Any:
    level = min(level, WIRE_ZSTD_LEVEL_MAX)
    ctxs = getattr(_tls, "cctx", None)
    if ctxs is None:
        ctxs = _tls.cctx = {}
    if level not in ctxs:  # not thread-safe either: one per thread and level
        ctxs[level] = zstandard.ZstdCompressor(level=level)
    return ctxs[level]


class ChunkStore:
    def __init__(self, env: Any, packs: PackSet, refs: ChunkRefs | None = None) -> None:
        self.env = env
        self.refs = refs or ChunkRefs(env)
        self.db = env.open_db(b"chunks")
        self.packs_db = env.open_db(b"packs")
        self.locs_db = env.open_db(b"chunk_locs")  # pack, offset -> key: the scrubber's walk
        self.packs = packs
        self._lock = threading.Lock()
        self._pending: dict[bytes, ChunkLocation] = {}
        # chunks written in the last moments, from bytes hashed just before (ingest) or
        # verified on arrival (peers): serving them again at once (a relay, the first
        # replicas of a fresh study) need not decompress and hash them a second time
        self._fresh: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._reused: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.reused_window_s = REUSED_WINDOW_S

    # ---- startup --------------------------------------------------------------

    def committed_pack_lengths(self) -> dict[int, int]:
        with self.env.begin(db=self.packs_db) as txn:
            return {
                struct.unpack(">I", k)[0]: struct.unpack("<Q", v)[0] for k, v in txn.cursor()
            }

    # ---- write side -------------------------------------------------------------

    def locate(self, key: bytes) -> ChunkLocation | None:
        loc = self._pending.get(key)
        if loc is not None:
            return loc
        with self.env.begin(db=self.db, buffers=False) as txn:
            raw = txn.get(key) if key else None  # LMDB refuses an empty key with an error
        return ChunkLocation.decode(raw) if raw is not None else None

    def has(self, key: bytes) -> bool:
        return self.locate(key) is not None

    def put(self, key: bytes, plain_len: int, stored: bytes, flags: int) -> int:
        """Append a verified chunk unless held already. Returns the bytes written."""
        # (a damaged chunk is still "held" until the scrubber or a read drops or replaces it)
        if self.has(key):
            self.note_reuse([key])
            return 0
        with self._lock:
            if key in self._pending:  # another stream raced us to it
                return 0
            pack, offset, length = self.packs.append(key, flags, plain_len, stored)
            self._pending[key] = ChunkLocation(pack, offset, length, plain_len, flags)
            self._fresh[key] = time.monotonic()
            while len(self._fresh) > FRESH_VERIFIED_MAX:
                self._fresh.popitem(last=False)
        return length

    def note_reuse(self, keys: list[bytes]) -> None:
        """An instance about to be committed names these held chunks without sending them."""
        now = time.time()  # wall clock: compared with when a chunk became loose
        with self._lock:
            for key in keys:
                self._reused[key] = now
                self._reused.move_to_end(key)
            while len(self._reused) > REUSED_MAX:
                self._reused.popitem(last=False)

    def reused_since(self, key: bytes, since_ms: int) -> bool:
        """Did an ingest find `key` here since it became loose (at `since_ms`), lately?
        A mark from before (the chunk was held, then let go) does not count."""
        with self._lock:
            at = self._reused.get(key)
        return (at is not None and at * 1000 >= since_ms
                and time.time() - at < self.reused_window_s)

    def _recently_verified(self, key: bytes) -> bool:
        at = self._fresh.get(key)
        return at is not None and time.monotonic() - at < FRESH_VERIFIED_S

    def replace(self, key: bytes, plain_len: int, stored: bytes, flags: int) -> int:
        """Append a good copy of a chunk whose indexed record is damaged; the next group
        commit points the index at it."""
        with self._lock:
            pack, offset, length = self.packs.append(key, flags, plain_len, stored)
            self._pending[key] = ChunkLocation(pack, offset, length, plain_len, flags)
        return length

    def drop(self, txn: Any, key: bytes, at: ChunkLocation | None = None) -> bool:
        """Forget a damaged chunk (inside a write transaction). `at`: only if the index
        still names that record: compaction may have moved the chunk to a good copy
        since it was read. Returns whether it was dropped."""
        raw = txn.get(key, db=self.db)
        if raw is None or (at is not None and bytes(raw) != at.encode()):
            return False
        self._unwalk(txn, key, bytes(raw))
        txn.delete(key, db=self.db)
        self._unlive(txn, bytes(raw))
        self.refs.forget_loose(txn, key)  # a new copy starts its own grace
        return True

    def reclaim(self, txn: Any, key: bytes) -> int:
        """Take an unneeded chunk out of the index (GC, inside its transaction); its
        record stays in the pack as dead bytes until the pack is compacted. Returns the
        record's length (0: it was not indexed)."""
        raw = txn.get(key, db=self.db)
        if raw is None:
            return 0
        self._unwalk(txn, key, bytes(raw))
        txn.delete(key, db=self.db)
        return self._unlive(txn, bytes(raw))

    def _unlive(self, txn: Any, raw: bytes) -> int:
        try:
            loc = ChunkLocation.decode(raw)
        except ChunkCorrupt:
            return 0
        self.refs.live_add(txn, loc.pack, -loc.record_len)
        return loc.record_len

    def relocate(self, key: bytes, plain_len: int, stored: bytes, flags: int,
                 from_pack: int) -> int:
        """Compaction: append a verified copy of a live chunk of `from_pack`; the next
        group commit points the index at it (unless the chunk moved or went meanwhile).
        Returns the bytes written."""
        with self._lock:
            current = self._pending.get(key)
            if current is not None and current.pack != from_pack:
                return 0  # already re-appended (ingest, repair): that copy will do
            pack, offset, length = self.packs.append(key, flags, plain_len, stored)
            self._pending[key] = ChunkLocation(pack, offset, length, plain_len, flags)
        return length

    def _unwalk(self, txn: Any, key: bytes, raw: bytes) -> None:
        """Take `key`'s record out of the scrubber's walk. A damaged index entry may name
        another chunk's record, whose walk entry must stay; an entry left behind is
        harmless (the walk skips keys the index lacks)."""
        try:
            loc_key = _loc_key(ChunkLocation.decode(raw))
        except ChunkCorrupt:
            return
        if txn.get(loc_key, db=self.locs_db) == key:
            txn.delete(loc_key, db=self.locs_db)

    def walk(self, after: tuple[int, int], limit: int) -> list[tuple[ChunkLocation, bytes]]:
        """Indexed chunks in pack order, strictly after (pack, offset)."""
        out: list[tuple[ChunkLocation, bytes]] = []
        start = struct.pack(">IQ", after[0], after[1] + 1)
        with self.env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self.locs_db)
            if not cur.set_range(start):
                return out
            for loc_key, key in cur:
                raw = txn.get(bytes(key), db=self.db)
                if raw is not None:
                    out.append((_walked(bytes(loc_key), bytes(raw)), bytes(key)))
                if len(out) >= limit:
                    break
        return out

    def take_pending(self) -> PendingSnapshot:
        """Atomically: the chunks appended so far and the pack lengths that cover them."""
        with self._lock:
            return PendingSnapshot(dict(self._pending), self.packs.snapshot())

    def index_pending(self, txn: Any, snap: PendingSnapshot) -> None:
        """Inside the group commit's transaction, after the packs were fsync'd."""
        stamp = now_ms()
        for key, loc in snap.chunks.items():
            old = txn.get(key, db=self.db)
            if old is not None:  # repaired or compacted: the old record leaves the walk
                self._unwalk(txn, key, bytes(old))
                self._unlive(txn, bytes(old))
            txn.put(key, loc.encode(), db=self.db)
            txn.put(_loc_key(loc), key, db=self.locs_db)
            self.refs.live_add(txn, loc.pack, loc.record_len)
            if old is None and not self.refs.in_use(txn, key):
                # no held instance names it yet: an upload's chunk until its manifest
                # commits (often in this same transaction), else garbage after a grace
                self.refs.mark_loose(txn, key, stamp)
        for no, length in snap.pack_lengths.items():
            txn.put(struct.pack(">I", no), struct.pack("<Q", length), db=self.packs_db)

    def forget_pending(self, snap: PendingSnapshot) -> None:
        """After the commit: the index now answers for these chunks."""
        with self._lock:
            for key in snap.chunks:
                self._pending.pop(key, None)

    def restore_dirty(self, snap: PendingSnapshot) -> None:
        """A failed commit: its packs must be synced and recorded in the next one."""
        with self._lock:
            self.packs.mark_dirty(snap.pack_lengths)

    # ---- read side --------------------------------------------------------------

    def read_stored(self, key: bytes) -> tuple[ChunkLocation, bytes]:
        try:
            loc = self.locate(key)
        except ChunkCorrupt as exc:  # a damaged index entry
            raise ChunkCorrupt(f"chunk {key.hex()[:16]}: {exc}") from exc
        if loc is None:
            raise ChunkMissing(f"chunk {key.hex()[:16]} is not held")
        try:
            return loc, self._read_at(key, loc)
        except ChunkCorrupt as exc:
            # compaction may have moved it and removed the old pack since we looked
            try:
                again = self.locate(key)
            except ChunkCorrupt:
                raise exc from None
            if again is None or again == loc:
                raise
            return again, self._read_at(key, again)

    def _read_at(self, key: bytes, loc: ChunkLocation) -> bytes:
        try:
            header, stored = self.packs.read(loc.pack, loc.offset, loc.record_len)
        except ChunkCorrupt as exc:
            raise ChunkCorrupt(f"chunk {key.hex()[:16]}: {exc}", loc) from exc
        if header.key != key:
            raise ChunkCorrupt(f"chunk {key.hex()[:16]}: the record holds another key", loc)
        return stored

    def read(self, key: bytes) -> bytes:
        """The plain bytes of a chunk, verified against its name."""
        loc, stored = self.read_stored(key)
        try:
            plain = codec.decode(stored, loc.flags, loc.plain_len)
        except ChunkCorrupt as exc:
            raise ChunkCorrupt(f"chunk {key.hex()[:16]}: {exc}", loc) from exc
        if len(plain) != loc.plain_len or content_hash(plain) != key:
            raise ChunkCorrupt(f"chunk {key.hex()[:16]} failed hash verification", loc)
        return plain

    def for_peer(self, key: bytes, zstd_level: int = 0, replica: bool = False
                 ) -> tuple[int, int, bytes]:
        """(plain length, flags, bytes) to send a peer: as stored, verified first; with
        `zstd_level`, compressed again at that level when that makes it smaller (a slow
        link is worth the CPU). `replica`: the peer verifies before it stores, so a
        chunk written here in the last minute goes without a second check."""
        loc, stored = self.read_stored(key)
        if replica and zstd_level <= 1 and self._recently_verified(key):
            return loc.plain_len, loc.flags, stored  # (the receiver verifies it anyway)
        plain = codec.decode(stored, loc.flags, loc.plain_len)
        if len(plain) != loc.plain_len or content_hash(plain) != key:
            raise ChunkCorrupt(f"chunk {key.hex()[:16]} failed hash verification", loc)
        if zstd_level > 1:
            shuffle = bool(loc.flags & FLAG_SHUFFLE2)
            again = _cctx(zstd_level).compress(codec.shuffle2(plain) if shuffle else plain)
            if len(again) < len(stored):
                return loc.plain_len, FLAG_ZSTD | (loc.flags & FLAG_SHUFFLE2), again
        return loc.plain_len, loc.flags, stored

    def missing(self, keys: list[bytes]) -> list[bytes]:
        out = []
        with self.env.begin(db=self.db, buffers=True) as txn:
            for key in keys:
                if key not in self._pending and (not key or txn.get(key) is None):
                    out.append(key)
        if len(out) < len(keys):  # the caller will name the others without sending them
            gone = set(out)
            self.note_reuse([k for k in keys if k not in gone])
        return out

    def count(self) -> int:
        with self.env.begin(db=self.db) as txn:
            return int(txn.stat(self.db)["entries"])


def _loc_key(loc: ChunkLocation) -> bytes:
    return struct.pack(">IQ", loc.pack, loc.offset)


def _walked(loc_key: bytes, raw: bytes) -> ChunkLocation:
    """A chunk where the walk found it: the walk's own key is the position (a damaged
    index entry must not move the scrubber back or past what it has yet to verify)."""
    pack, offset = struct.unpack(">IQ", loc_key)
    try:
        loc = ChunkLocation.decode(raw)
    except ChunkCorrupt:  # the scrubber's read fails the same way and drops it
        return ChunkLocation(pack, offset, 0, 0, 0)
    return replace(loc, pack=pack, offset=offset)


def is_lmdb_full(exc: BaseException) -> bool:
    return isinstance(exc, lmdb.MapFullError) or (
        isinstance(exc, lmdb.Error) and "No space" in str(exc)
    )
