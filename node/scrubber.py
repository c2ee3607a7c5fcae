"""The scrubber: re-reads and verifies every stored chunk, forever, at a bounded rate.

A pass walks the index in pack order (so the disk reads sequentially), verifies
each record (header CRC, key, decompression, hash of the plain bytes) and
remembers where it is, so a restart resumes mid-pass. A chunk that fails (bit
flip, truncated or missing pack, index entry past the end) is dropped from the
index, the instances that need it stop counting as held here, and the repair
callback (the cluster: fetch a good copy from a peer, verify it) is asked for it.
What cannot be repaired is recorded and shown as an alert by name, never
silently served.

A pass starts `interval_s` after the previous one started, or at once on
request; it reads at most `rate_mb_s` from the packs (bytes as stored, i.e.
compressed: the limit is on disk IO), so a pass must fit in the interval:
status says "overdue" when it does not.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pacsmesh.node import manifest as mf
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing
from pacsmesh.node.store import Store
from pacsmesh.node.worker import Worker, WorkerState

LOGGER = logging.getLogger(__name__)
SCRUB_BATCH_CHUNKS = 64  # chunks verified between two progress saves (~64 MB at most)
UNREPAIRABLE_KEPT_MAX = 100  # names of damaged instances kept for the alert
REPAIR_RETRY_S = 60.0  # an unrepairable chunk is retried this often (a peer may come back)
SUSPECTS_MAX = 10_000  # reported damaged chunks waiting; more are found by the next pass
_STATE_KEY = b"scrub_state"

# (chunk key, manifest ids that need it) -> True once a verified copy is back in the store
Repair = Callable[[bytes, list[bytes]], bool]


@dataclass
class ScrubState:
    running: bool = False
    pass_started_ms: int = 0
    pos_pack: int = 0
    pos_offset: int = -1
    pass_chunks: int = 0
    pass_bytes: int = 0
    last_pass_started_ms: int = 0
    last_pass_completed_ms: int = 0
    chunks_verified: int = 0  # since the data dir was created
    bytes_verified: int = 0
    corrupt_found: int = 0
    repaired: int = 0
    unrepairable: dict[str, str] = field(default_factory=dict)  # chunk hex -> what it breaks
    requested: bool = False


class Scrubber(Worker):
    name = "scrub"

    def __init__(self, store: Store, rate_mb_s: float, interval_s: float,
                 repair: Repair | None = None) -> None:
        self.store = store
        self.rate_bytes_s = max(1.0, rate_mb_s * 1e6)
        self.interval_s = interval_s
        self.repair = repair
        self.idle_s = 1.0  # an idle step is a clock check: `scrub --now` starts within 1 s
        self.state = self._load()
        self._meta = store.catalog.meta
        self._retry_at = 0.0
        # chunks another worker (GC) found damaged: handled here, in this worker's
        # step, so repair and the scrub state stay in one place
        self._suspects: collections.deque[tuple[bytes, Any, str]] = collections.deque(
            maxlen=SUSPECTS_MAX)

    # ---- persistence --------------------------------------------------------------

    def _load(self) -> ScrubState:
        with self.store.env.begin(db=self.store.catalog.meta) as txn:
            raw = txn.get(_STATE_KEY)
        if raw is None:
            return ScrubState()
        try:
            return ScrubState(**json.loads(bytes(raw)))
        except (ValueError, TypeError):
            LOGGER.warning("scrub progress unreadable; starting a fresh pass")
            return ScrubState()

    def _save(self) -> None:
        raw = json.dumps(asdict(self.state)).encode()
        with self.store.env.begin(write=True, db=self._meta) as txn:
            txn.put(_STATE_KEY, raw)

    # ---- control ----------------------------------------------------------------------

    def request_pass(self) -> None:
        """`pacsmesh scrub --now`: start a pass at once (or continue the running one)."""
        self.state.requested = True

    def overdue(self, now_ms: int) -> bool:
        """No full pass completed within the interval (allowing the current one to run)."""
        last = self.state.last_pass_completed_ms
        reference = last or self.state.pass_started_ms or now_ms
        return now_ms - reference > 1.5 * self.interval_s * 1000

    def _clock_stepped_back(self, now_ms: int) -> None:
        """Times recorded while the wall clock ran ahead are pulled back to now: else, after
        the clock is corrected, no pass would be due (and none overdue) until the wall
        clock caught up with them, silently, for as long as it had been ahead."""
        st = self.state
        if max(st.last_pass_started_ms, st.last_pass_completed_ms, st.pass_started_ms) > now_ms:
            LOGGER.warning("scrub: the wall clock went back %.0f s; the scrub schedule "
                           "follows it", (max(st.last_pass_started_ms,
                                               st.last_pass_completed_ms,
                                               st.pass_started_ms) - now_ms) / 1000)
            st.last_pass_started_ms = min(st.last_pass_started_ms, now_ms)
            st.last_pass_completed_ms = min(st.last_pass_completed_ms, now_ms)
            st.pass_started_ms = min(st.pass_started_ms, now_ms)

    def report_suspect(self, key: bytes, at: Any, why: str) -> None:
        """A chunk found damaged elsewhere (any thread): dropped and repaired next step."""
        self._suspects.append((key, at, why))

    async def step(self) -> WorkerState:
        loop = asyncio.get_running_loop()
        while self._suspects:
            key, at, why = self._suspects.popleft()
            await loop.run_in_executor(None, self.bad_chunk, key, at, why)
            await loop.run_in_executor(None, self._save)
        st = self.state
        now_ms = int(time.time() * 1000)
        self._clock_stepped_back(now_ms)
        if not st.running:
            due = st.last_pass_started_ms + self.interval_s * 1000
            if not st.requested and now_ms < due:
                await self._retry_unrepairable(loop)
                return WorkerState.IDLE
            st.running, st.requested = True, False
            st.pass_started_ms, st.pos_pack, st.pos_offset = now_ms, 0, -1
            st.pass_chunks = st.pass_bytes = 0
            LOGGER.info("scrub pass started")
        started = time.monotonic()
        batch = await loop.run_in_executor(
            None, self.store.chunks.walk, (st.pos_pack, st.pos_offset), SCRUB_BATCH_CHUNKS)
        if not batch:
            st.running = False
            st.last_pass_started_ms, st.last_pass_completed_ms = st.pass_started_ms, now_ms
            LOGGER.info("scrub pass complete: %d chunks, %.1f MB verified", st.pass_chunks,
                        st.pass_bytes / 1e6)
            await loop.run_in_executor(None, self._save)
            return WorkerState.IDLE
        read = await loop.run_in_executor(None, self._verify_batch, batch)
        st.pos_pack, st.pos_offset = batch[-1][0].pack, batch[-1][0].offset
        await loop.run_in_executor(None, self._save)
        # rate limit: this batch may take no less than its bytes at the configured rate
        wait = read / self.rate_bytes_s - (time.monotonic() - started)
        if wait > 0:
            await asyncio.sleep(wait)  # THROTTLED would add the runner's error backoff
        return WorkerState.BUSY

    # ---- verification and repair ------------------------------------------------------------

    def _verify_batch(self, batch: list[Any]) -> int:
        read = 0
        for loc, key in batch:
            read += loc.record_len
            try:
                self.store.chunks.read(key)
            except (ChunkCorrupt, ChunkMissing) as exc:
                self.bad_chunk(key, getattr(exc, "location", None), str(exc))
                continue
            self.state.pass_chunks += 1
            self.state.chunks_verified += 1
            self.state.pass_bytes += loc.plain_len
            self.state.bytes_verified += loc.plain_len
        return read

    def bad_chunk(self, key: bytes, at: Any, why: str) -> None:
        """Drop a chunk found damaged at `at` (a ChunkLocation, None: wherever it is),
        stop counting its instances as held, and ask for a repair. GC calls this too."""
        st = self.state
        with self.store.env.begin(write=True) as txn:
            if not self.store.chunks.drop(txn, key, at):
                return  # moved to a good copy since it was read (compaction)
        st.corrupt_found += 1
        users = self.store.catalog.manifests_using(key)
        names = self._names(users)
        LOGGER.error("scrub: %s; needed by %s", why, names or "no instance")
        self.store.unhold(users, damaged=True)  # not safe copies any more; repairable
        if self._try_repair(key, users):
            return
        if len(st.unrepairable) < UNREPAIRABLE_KEPT_MAX:
            st.unrepairable[key.hex()] = names or "no instance"

    def _try_repair(self, key: bytes, users: list[bytes]) -> bool:
        if self.repair is None or not users:
            return False
        try:
            ok = self.repair(key, users)
        except Exception:  # a failed repair must not stop the scrub
            LOGGER.exception("repair of chunk %s failed", key.hex()[:16])
            ok = False
        if ok:
            self.state.repaired += 1
            LOGGER.info("repaired chunk %s from a peer", key.hex()[:16])
        return ok

    def _names(self, manifest_ids: list[bytes]) -> str:
        names = []
        for mid in manifest_ids[:5]:
            got = self.store.catalog.get(mid)
            if got is not None:
                m = mf.decode(got[0])
                names.append(f"instance {m.sop_instance_uid} of study {m.study_instance_uid}")
        more = len(manifest_ids) - len(names)
        return ", ".join(names) + (f" and {more} more" if more > 0 else "")

    async def _retry_unrepairable(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.state.unrepairable or time.monotonic() < self._retry_at:
            return
        self._retry_at = time.monotonic() + REPAIR_RETRY_S
        for hexkey in list(self.state.unrepairable):
            key = bytes.fromhex(hexkey)
            users = await loop.run_in_executor(None, self.store.catalog.manifests_using, key)
            if await loop.run_in_executor(None, self._try_repair, key, users):
                self.state.unrepairable.pop(hexkey, None)
        await loop.run_in_executor(None, self._save)
