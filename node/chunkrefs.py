"""Which chunks are still needed: the bookkeeping garbage collection decides from.

    chunk_users  chunk hash -> count(4)        held manifests naming it (each once)
    loose        chunk hash -> since ms(8) record length(4)
                                               indexed, named by no held manifest
    pack_live    pack(4) -> live record bytes(8)   indexed records in that pack
    meta         b"loose_bytes", b"live_bytes" -> running totals(8)

Counts move in the same transaction as what they count (the group commit that
holds or unholds a manifest, indexes or drops a chunk), so a crash can never
leave a chunk counted unused while a held manifest names it. A chunk becomes
loose when its last holder lets go (a trimmed copy, a deleted study) or when it
is indexed with no holder at all (an upload that never finished); GC reclaims it
only after a grace period and only if it is still loose in the reclaiming
transaction. Everything here costs O(chunks changed), never O(archive): GC finds
its work in `loose` and `pack_live`, not by walking the catalog.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable
from typing import Any

from pacsmesh.node import manifest as mf

LOGGER = logging.getLogger(__name__)
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LOOSE = struct.Struct(">QI")
_LOC_LEN = struct.Struct("<IQI")  # the head of a chunkstore location: pack, offset, length
BACKFILL_BATCH = 10_000  # manifests or chunks per transaction when an old data dir is counted
FORMAT_KEY = b"gc_format"  # b"1" once every count below is complete
BACKFILL_KEY = b"gc_backfill"  # present while counting: a crash restarts the count


def now_ms() -> int:
    return int(time.time() * 1000)


class ChunkRefs:
    def __init__(self, env: Any) -> None:
        self.env = env
        self.users = env.open_db(b"chunk_users")
        self.loose = env.open_db(b"loose")
        self.pack_live = env.open_db(b"pack_live")
        self.chunks = env.open_db(b"chunks")  # chunkstore's index: key -> location
        self.meta = env.open_db(b"meta")

    # ---- holders (inside the group commit's transaction) ----------------------------

    def hold(self, txn: Any, keys: Iterable[bytes]) -> None:
        """A manifest naming `keys` became held here."""
        for key in set(keys):
            raw = txn.get(key, db=self.users)
            count = _U32.unpack(raw)[0] if raw is not None else 0
            txn.put(key, _U32.pack(count + 1), db=self.users)
            if count == 0:
                self._unloose(txn, key)

    def release(self, txn: Any, keys: Iterable[bytes], at_ms: int | None = None) -> None:
        """A manifest naming `keys` is no longer held here (trimmed, found bad, deleted)."""
        for key in set(keys):
            raw = txn.get(key, db=self.users)
            if raw is None:  # counted before this data dir had counts: nothing to undo
                continue
            count = _U32.unpack(raw)[0] - 1
            if count > 0:
                txn.put(key, _U32.pack(count), db=self.users)
            else:
                txn.delete(key, db=self.users)
                self.mark_loose(txn, key, now_ms() if at_ms is None else at_ms)

    def in_use(self, txn: Any, key: bytes) -> bool:
        return txn.get(key, db=self.users) is not None

    # ---- loose chunks --------------------------------------------------------------

    def mark_loose(self, txn: Any, key: bytes, at_ms: int) -> None:
        """`key` is named by no held manifest (if indexed: an unindexed key is ignored)."""
        loc = txn.get(key, db=self.chunks)
        if loc is None or txn.get(key, db=self.loose) is not None:
            return
        length = _record_len(bytes(loc))
        txn.put(key, _LOOSE.pack(at_ms, length), db=self.loose)
        self._add(txn, b"loose_bytes", length)

    def forget_loose(self, txn: Any, key: bytes) -> None:
        self._unloose(txn, key)

    def live_of(self, txn: Any, pack: int) -> int:
        raw = txn.get(_U32.pack(pack), db=self.pack_live)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def _unloose(self, txn: Any, key: bytes) -> None:
        raw = txn.get(key, db=self.loose)
        if raw is not None:
            txn.delete(key, db=self.loose)
            self._add(txn, b"loose_bytes", -_LOOSE.unpack(bytes(raw))[1])

    def loose_page(self, after: bytes, limit: int) -> list[tuple[bytes, int, int]]:
        """(key, since ms, record length) of loose chunks in key order after `after`."""
        out: list[tuple[bytes, int, int]] = []
        with self.env.begin(db=self.loose) as txn:
            cur = txn.cursor()
            ok = cur.set_range(after + b"\x00") if after else cur.first()
            while ok and len(out) < limit:
                since, length = _LOOSE.unpack(bytes(cur.value()))
                out.append((bytes(cur.key()), since, length))
                ok = cur.next()
        return out

    def take_loose(self, txn: Any, key: bytes, older_than_ms: int) -> bool:
        """Inside the reclaiming transaction: True (and no longer loose) if `key` is still
        loose since before `older_than_ms` and no held manifest names it."""
        raw = txn.get(key, db=self.loose)
        if raw is None or _LOOSE.unpack(bytes(raw))[0] >= older_than_ms:
            return False
        self._unloose(txn, key)
        return txn.get(key, db=self.users) is None

    # ---- live bytes per pack (chunkstore calls these as the index changes) ------------

    def live_add(self, txn: Any, pack: int, length: int) -> None:
        key = _U32.pack(pack)
        raw = txn.get(key, db=self.pack_live)
        value = (_U64.unpack(raw)[0] if raw is not None else 0) + length
        if value > 0:
            txn.put(key, _U64.pack(value), db=self.pack_live)
        else:
            txn.delete(key, db=self.pack_live)
        self._add(txn, b"live_bytes", length)

    def live_by_pack(self) -> dict[int, int]:
        """pack -> live record bytes, for every pack with something live (O(packs))."""
        with self.env.begin(db=self.pack_live) as txn:
            return {_U32.unpack(k)[0]: _U64.unpack(v)[0] for k, v in txn.cursor()}

    def forget_pack(self, txn: Any, pack: int) -> None:
        raw = txn.get(_U32.pack(pack), db=self.pack_live)
        if raw is not None:
            txn.delete(_U32.pack(pack), db=self.pack_live)
            self._add(txn, b"live_bytes", -_U64.unpack(raw)[0])

    # ---- totals ---------------------------------------------------------------------

    def _add(self, txn: Any, name: bytes, delta: int) -> None:
        raw = txn.get(name, db=self.meta)
        value = max(0, (_U64.unpack(raw)[0] if raw is not None else 0) + delta)
        txn.put(name, _U64.pack(value), db=self.meta)

    def totals(self) -> tuple[int, int, int]:
        """(loose chunks, loose bytes, live bytes)."""
        with self.env.begin() as txn:
            loose = int(txn.stat(self.loose)["entries"])
            lb, live = (txn.get(n, db=self.meta) for n in (b"loose_bytes", b"live_bytes"))
            return (loose, _U64.unpack(lb)[0] if lb else 0, _U64.unpack(live)[0] if live else 0)

    # ---- counting an older data dir once -------------------------------------------

    def backfill(self, manifests_db: Any, held_db: Any) -> None:
        """Count holders, loose chunks and live bytes of a data dir made before GC. Runs
        once, in bounded transactions; a crash part-way starts the count again."""
        with self.env.begin(db=self.meta) as txn:
            if txn.get(FORMAT_KEY) == b"1":
                return
            empty = txn.stat(self.chunks)["entries"] == 0 and txn.get(BACKFILL_KEY) is None
        if empty:
            with self.env.begin(write=True, db=self.meta) as txn:
                txn.put(FORMAT_KEY, b"1")
            return
        LOGGER.info("counting chunk holders for garbage collection (once)")
        with self.env.begin(write=True) as txn:
            for db in (self.users, self.loose, self.pack_live):
                txn.drop(db, delete=False)
            for name in (b"loose_bytes", b"live_bytes"):
                txn.delete(name, db=self.meta)
            txn.put(BACKFILL_KEY, b"1", db=self.meta)
        after = b""
        while True:  # holders: every held manifest's chunks
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=held_db)
                ok = cur.set_range(after + b"\x00") if after else cur.first()
                n = 0
                while ok and n < BACKFILL_BATCH:
                    after, n = bytes(cur.key()), n + 1
                    raw = txn.get(after, db=manifests_db)
                    if raw is not None:
                        m = mf.decode(bytes(raw))
                        self.hold(txn, (c.hash for c in m.chunks))
                    ok = cur.next()
            if not ok:
                break
        after, stamp = b"", now_ms()
        while True:  # live bytes per pack, and chunks no one holds
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self.chunks)
                ok = cur.set_range(after + b"\x00") if after else cur.first()
                n = 0
                while ok and n < BACKFILL_BATCH:
                    after, n = bytes(cur.key()), n + 1
                    loc = bytes(cur.value())
                    if len(loc) >= _LOC_LEN.size:
                        pack, _, length = _LOC_LEN.unpack(loc[:_LOC_LEN.size])
                        self.live_add(txn, pack, length)
                    if txn.get(after, db=self.users) is None:
                        self.mark_loose(txn, after, stamp)
                    ok = cur.next()
            if not ok:
                break
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.delete(BACKFILL_KEY)
            txn.put(FORMAT_KEY, b"1")


def _record_len(loc: bytes) -> int:
    return _LOC_LEN.unpack(loc[:_LOC_LEN.size])[2] if len(loc) >= _LOC_LEN.size else 0
