"""Garbage collection: reclaim chunks no held instance needs, then compact packs.

A pass has two phases, each in bounded steps:
1. Reclaim. Chunks loose for longer than `loose_grace_s` (node/chunkrefs.py: a
   trimmed copy, a deleted study, an upload that never finished) leave the index,
   each in a transaction that re-checks it is still loose, so an instance held
   meanwhile keeps it. Their records become dead bytes in their packs.
2. Compact. Sealed packs whose live fraction is below `compact_below` are
   rewritten: each live record is read, verified (a damaged one goes to the
   scrubber's repair, never copied), and appended to the active pack; a group
   commit points the index at the copies; then `Store.retire_pack` forgets the
   pack in one transaction and unlinks it. SIGKILL at any moment leaves either the
   old pack still indexed (the copies past the committed length are cut off at
   the next open) or the copies indexed and the old pack removed at the next open.
   The active pack is sealed first when enough of it is dead.

Compaction copies at most `rate_mb_s` (like the scrubber, the disk is shared with
ingest). A pass starts `interval_s` after the previous one started, or at once on
`pacsmesh gc --now`. Progress counters persist; a pass interrupted by a restart is
simply started again (what it had moved is committed or cut off, both safe).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pacsmesh.node import codec
from pacsmesh.node.config import GcSection
from pacsmesh.node.errors import ChunkCorrupt
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.store import Store
from pacsmesh.node.worker import Worker, WorkerState

LOGGER = logging.getLogger(__name__)
RECLAIM_BATCH = 1024  # loose chunks examined per step (one write transaction)
COMPACT_BATCH = 64  # records copied per step, at most
COMPACT_BATCH_BYTES = 1 << 20  # bytes copied per step, about: the rate limit's grain
_STATE_KEY = b"gc_state"

# (chunk key, the location that failed, why): the scrubber's drop-and-repair
BadChunk = Callable[[bytes, Any, str], None]


@dataclass
class GcState:
    running: bool = False
    requested: bool = False
    phase: str = ""  # reclaim | compact
    pass_started_ms: int = 0
    last_pass_started_ms: int = 0
    last_pass_completed_ms: int = 0
    reclaimed_bytes: int = 0  # pack bytes removed from disk, since the data dir was made
    chunks_reclaimed: int = 0
    packs_compacted: int = 0
    pass_packs: list[int] = field(default_factory=list)
    pass_packs_done: int = 0
    pass_bytes_moved: int = 0
    loose_after: str = ""  # hex key: where the reclaim phase goes on
    pack_after: int = -1  # offset in the pack being compacted


class Collector(Worker):
    name = "gc"

    def __init__(self, store: Store, cfg: GcSection, on_bad: BadChunk | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        self.on_bad = on_bad
        self.clock = clock
        self.rate_bytes_s = max(1.0, cfg.rate_mb_s * 1e6)
        self.idle_s = 1.0  # `gc --now` starts within a second
        self.state = self._load()
        self.state.running = False  # an interrupted pass starts again (see the module doc)

    # ---- persistence ----------------------------------------------------------------

    def _load(self) -> GcState:
        with self.store.env.begin(db=self.store.catalog.meta) as txn:
            raw = txn.get(_STATE_KEY)
        if raw is None:
            return GcState()
        try:
            return GcState(**json.loads(bytes(raw)))
        except (ValueError, TypeError):
            LOGGER.warning("gc progress unreadable; counters start again")
            return GcState()

    def _save(self) -> None:
        raw = json.dumps(asdict(self.state)).encode()
        with self.store.env.begin(write=True, db=self.store.catalog.meta) as txn:
            txn.put(_STATE_KEY, raw)

    # ---- control and reports ----------------------------------------------------------

    def request_pass(self) -> None:
        self.state.requested = True

    def totals(self) -> dict[str, int]:
        """Bytes on disk and what could be freed (O(packs): an operator's question)."""
        loose, loose_bytes, _ = self.store.refs.totals()
        live = self.store.refs.live_by_pack()
        committed = self.store.chunks.committed_pack_lengths()
        dead = sum(max(0, length - live.get(no, 0)) for no, length in committed.items())
        return {"loose_chunks": loose, "loose_bytes": loose_bytes, "dead_bytes": dead,
                "reclaimable_bytes": dead + loose_bytes, "packs": len(committed),
                "pack_bytes": self.store.packs.bytes_total()}

    # ---- the pass -----------------------------------------------------------------------

    async def step(self) -> WorkerState:
        loop = asyncio.get_running_loop()
        st = self.state
        now_ms = int(self.clock() * 1000)
        if not st.running:
            due = st.last_pass_started_ms + self.cfg.interval_s * 1000
            if not st.requested and now_ms < due and now_ms >= st.last_pass_started_ms:
                return WorkerState.IDLE
            st.running, st.requested, st.phase = True, False, "reclaim"
            st.pass_started_ms, st.loose_after = now_ms, ""
            st.pass_packs, st.pass_packs_done, st.pass_bytes_moved = [], 0, 0
            LOGGER.info("gc pass started")
        if st.phase == "reclaim":
            more = await loop.run_in_executor(None, self._reclaim_batch, now_ms)
            if not more:
                st.phase, st.pack_after = "compact", -1
                st.pass_packs = await loop.run_in_executor(None, self._choose_packs)
                if st.pass_packs:
                    LOGGER.info("gc: compacting %d packs", len(st.pass_packs))
            await loop.run_in_executor(None, self._save)
            return WorkerState.BUSY
        if st.pass_packs_done < len(st.pass_packs):
            started = time.monotonic()
            moved = await self._compact_step(loop, st.pass_packs[st.pass_packs_done])
            await loop.run_in_executor(None, self._save)
            wait = moved / self.rate_bytes_s - (time.monotonic() - started)
            if wait > 0:
                await asyncio.sleep(wait)
            return WorkerState.BUSY
        st.running, st.phase = False, ""
        st.last_pass_started_ms, st.last_pass_completed_ms = st.pass_started_ms, now_ms
        await loop.run_in_executor(None, self._save)
        LOGGER.info("gc pass complete: %d packs compacted, %.1f MB moved",
                    st.pass_packs_done, st.pass_bytes_moved / 1e6)
        return WorkerState.IDLE

    def _reclaim_batch(self, now_ms: int) -> bool:
        """One page of loose chunks; True if more may follow."""
        st = self.state
        after = bytes.fromhex(st.loose_after)
        page = self.store.refs.loose_page(after, RECLAIM_BATCH)
        if not page:
            return False
        cutoff = now_ms - int(self.cfg.loose_grace_s * 1000)
        due = [key for key, since, _ in page
               if since < cutoff and not self.store.chunks.reused_since(key, since)]
        if due:
            reclaimed = 0
            with self.store.env.begin(write=True) as txn:
                for key in due:
                    if self.store.refs.take_loose(txn, key, cutoff):
                        if self.store.chunks.reclaim(txn, key):
                            reclaimed += 1
                        self.store.catalog.forget_chunk_refs(txn, key)
            st.chunks_reclaimed += reclaimed
        st.loose_after = page[-1][0].hex()
        return len(page) == RECLAIM_BATCH

    def _choose_packs(self) -> list[int]:
        """Sealed packs below the live fraction, emptiest first; the active pack is
        sealed (and chosen) once enough of it is dead."""
        live = self.store.refs.live_by_pack()
        committed = self.store.chunks.committed_pack_lengths()
        active = self.store.packs.active_no
        chosen: list[tuple[float, int]] = []
        for no, length in committed.items():
            if length <= 0:
                continue
            fraction = live.get(no, 0) / length
            if fraction >= self.cfg.compact_below:
                continue
            if no == active:
                if length - live.get(no, 0) < self.cfg.seal_min_dead_mb * 1e6:
                    continue
                self.store.packs.seal_active()
                self.store.barrier().result()  # its committed length covers every record
            chosen.append((fraction, no))
        return [no for _, no in sorted(chosen)]

    async def _compact_step(self, loop: asyncio.AbstractEventLoop, pack_no: int) -> int:
        st = self.state
        moved, last, more = await loop.run_in_executor(None, self._copy_batch, pack_no,
                                                       st.pack_after)
        st.pass_bytes_moved += moved
        if more:
            st.pack_after = last
            return moved
        await asyncio.wrap_future(self.store.barrier())  # the copies are durable, indexed
        size = await loop.run_in_executor(None, self._size_of, pack_no)
        if await loop.run_in_executor(None, self.store.retire_pack, pack_no):
            st.packs_compacted += 1
            st.reclaimed_bytes += size
            LOGGER.info("gc: pack %d compacted (%.1f MB freed)", pack_no, size / 1e6)
        else:
            LOGGER.warning("gc: pack %d still holds live chunks (moved meanwhile or "
                           "damaged); it is tried again next pass", pack_no)
        st.pass_packs_done += 1
        st.pack_after = -1
        return moved

    def _size_of(self, pack_no: int) -> int:
        try:
            return self.store.packs.size_of(pack_no)
        except FileNotFoundError:
            return 0

    def _copy_batch(self, pack_no: int, after: int) -> tuple[int, int, bool]:
        """Copy the next live records of one pack; (bytes read, last offset, more)."""
        chunks = self.store.chunks
        batch = chunks.walk((pack_no, after), COMPACT_BATCH)
        moved, last = 0, after
        for walked, key in batch:
            if walked.pack != pack_no:
                return moved, last, False
            last = walked.offset
            try:
                loc = chunks.locate(key)
                if loc is None or (loc.pack, loc.offset) != (pack_no, walked.offset):
                    continue  # not the indexed copy any more
                header, stored = self.store.packs.read(pack_no, loc.offset, loc.record_len)
                plain = codec.decode(stored, loc.flags, loc.plain_len)
                if header.key != key or content_hash(plain) != key:
                    raise ChunkCorrupt(f"chunk {key.hex()[:16]} failed hash verification",
                                       loc)
            except (ChunkCorrupt, OSError) as exc:
                # left where it is (so its pack stays) for the scrubber to drop and repair
                LOGGER.error("gc: %s while compacting pack %d; not copied", exc, pack_no)
                if self.on_bad is not None:
                    self.on_bad(key, getattr(exc, "location", None), str(exc))
                continue
            moved += chunks.relocate(key, loc.plain_len, stored, loc.flags, pack_no)
            if moved >= COMPACT_BATCH_BYTES:
                return moved, last, True
        return moved, last, len(batch) == COMPACT_BATCH
