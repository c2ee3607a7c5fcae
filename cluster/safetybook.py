"""Safe and unsafe counts, kept up to date by change, never recounted per call.

Each study's verdict (how many safe copies; unsafe or not) is stored in the
catalog (`safety` and the `unsafe` index, oldest first), so `status` reads two
counts and one key, and `ls --unsafe` walks only unsafe studies. A study is
judged again when something it depends on changed:
  - a commit here touched it (new versions, held or dropped copies);
  - a peer's holding of it changed (the holdings exchange says which studies);
  - a holder's state or site changed (alive, suspect, dead, left): every study
    that holder holds, from the holdings cache, is queued for judgement.
Work per step is bounded (STUDIES_PER_STEP_MAX); `pending()` says how far behind
the counts are, and status shows it.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

from cluster.progress import RepairTracker
from cluster.safety import Position, assess
from cluster.transfer import Replicator
from node.worker import Worker, WorkerState

LOGGER = logging.getLogger(__name__)
STUDIES_PER_STEP_MAX = 2000  # judged per step: ~0.1 s of work
# A holder that stops counting (suspect, dead, gone) must stay so this many gossip
# intervals before its studies are judged again: an overloaded node flapping
# alive <-> suspect would otherwise make every peer re-judge everything it holds
# on every flap (and load them more). A holder that starts counting is adopted
# at once: that only ever makes verdicts more accurate sooner.
SETTLE_GOSSIP_ROUNDS = 5
SWEEP_PAGE = 2000
_POSITIONS_KEY = b"safety_positions"
ALL = ""  # a sweep over every study (after an upgrade)


class SafetyWorker(Worker):
    name = "safety"
    idle_s = 0.5

    def __init__(self, r: Replicator, stall_after_s: float, gossip_interval_s: float) -> None:
        self.r = r
        self.settle_s = SETTLE_GOSSIP_ROUNDS * gossip_interval_s
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._sweeps: collections.deque[tuple[str, bytes]] = collections.deque()
        self._judged_positions = self._load_positions()
        # node -> (its new state, since when): changes not yet lasting SETTLE_S
        self._unsettled: dict[str, tuple[list[object] | None, float]] = {}
        self.tracker = RepairTracker(stall_after_s)
        self.judged = 0
        if r.store.catalog.take_sweep_request():
            self._sweeps.append((ALL, b""))
        r.store.study_listeners.append(self.mark)
        r.on_holdings_changed.append(lambda peer, parts, studies: self.mark(studies))

    def mark(self, studies: set[str]) -> None:
        """These studies changed (any thread)."""
        with self._lock:
            self._dirty |= studies

    def pending(self) -> int:
        with self._lock:
            return len(self._dirty) + (SWEEP_PAGE * len(self._sweeps))

    async def step(self) -> WorkerState:
        self._watch_positions()
        with self._lock:
            batch = [self._dirty.pop() for _ in range(min(len(self._dirty),
                                                          STUDIES_PER_STEP_MAX))]
        if len(batch) < STUDIES_PER_STEP_MAX and self._sweeps:
            batch += await self.r._run(self._sweep_page, STUDIES_PER_STEP_MAX - len(batch))
        if batch:
            await self.r._run(self._judge, batch)
        await self.r._run(self._sample)
        return WorkerState.BUSY if (batch and self.pending()) else WorkerState.IDLE

    def _sample(self) -> None:
        _, unsafe, _ = self.r.store.catalog.safety_counts()
        self.tracker.add(time.monotonic(), unsafe, self.backlog_bytes())

    def backlog_bytes(self) -> int:
        """What the cluster still has to copy, as each alive node last told us."""
        alive = {m.node_id for m in self.r.state.snapshot.alive_peers(self.r.node_id)}
        total = self.r.planner.backlog(self.r)[1]
        return total + sum(rep.backlog_bytes for n, rep in self.r.reports.items() if n in alive)

    def _judge(self, studies: list[str]) -> None:
        r = self.r
        positions = self._positions()
        verdicts = []
        for study in studies:
            rec = r.store.catalog.study_record(study)
            if rec is None:
                continue
            verdict = assess(rec.instances, rec.current_digest, r.holdings_for(study),
                             positions, r.state.min_distance_miles)
            verdicts.append((study, verdict.safe_copies,
                             rec.instances == 0 or verdict.safe_copies < r.state.copies))
            LOGGER.debug("judged %s: %d safe copies, full holders %s", study,
                         verdict.safe_copies, verdict.full_holders)
        changed = r.store.catalog.set_safety(verdicts)
        self.judged += len(verdicts)
        if changed:
            LOGGER.info("safety of %d studies changed (%d judged; %d unsafe now)", changed,
                        len(verdicts), sum(1 for _, _, unsafe in verdicts if unsafe))

    def _sweep_page(self, limit: int) -> list[str]:
        peer, after = self._sweeps.popleft()
        if peer == ALL:
            recs = self.r.store.catalog.study_page(after.decode(), limit)
            studies = [rec.study_uid for rec in recs]
            last = studies[-1].encode() if studies else after
        else:
            studies, last = self.r.holdings.studies_of(peer, after, limit)
        if len(studies) >= limit:
            self._sweeps.appendleft((peer, last))
        return studies

    # ---- holders whose state or site changed ----------------------------------------

    def _watch_positions(self) -> None:
        """Adopt holders' settled changes of state or site; queue their studies."""
        live = {n: _key(pos) for n, pos in self.r.state.snapshot.positions().items()
                if n != self.r.node_id}
        t = time.monotonic()
        changed = []
        for n in sorted(live.keys() | self._judged_positions.keys()):
            key = live.get(n)  # None: not in our member table (not counted as a holder)
            if self._judged_positions.get(n) == key:
                self._unsettled.pop(n, None)
                continue
            seen = self._unsettled.get(n)
            if key is not None and key[3]:  # counts from now on: adopt at once
                changed.append(n)
                self._unsettled.pop(n, None)
            elif seen is None or seen[0] != key:
                self._unsettled[n] = (key, t)
            elif t - seen[1] >= self.settle_s:
                changed.append(n)
                del self._unsettled[n]
        if not changed:
            return
        judged = dict(self._judged_positions)
        for node_id in changed:
            key = live.get(node_id)
            if key is None:
                judged.pop(node_id, None)
            else:
                judged[node_id] = key
            if all(p != node_id for p, _ in self._sweeps):
                self._sweeps.append((node_id, b""))
        self._judged_positions = judged  # replaced, not mutated: _judge reads it in a thread
        LOGGER.info("holders changed state (%s): judging their studies again",
                    ", ".join(changed))
        self._save_positions()

    def _positions(self) -> dict[str, Position]:
        """Holders as the stored verdicts see them: every verdict is judged against the
        same settled view, and a settled change re-judges what it touches."""
        out = {n: Position(n, str(k[0]), float(k[1]), float(k[2]), bool(k[3]))  # type: ignore[arg-type]
               for n, k in self._judged_positions.items()}
        me = self.r.state.snapshot.positions().get(self.r.node_id)
        if me is not None:
            out[me.node_id] = me
        return out

    def _load_positions(self) -> dict[str, list[object]]:
        catalog = self.r.store.catalog
        with catalog.env.begin(db=catalog.meta) as txn:
            raw = txn.get(_POSITIONS_KEY)
        return dict(json.loads(bytes(raw))) if raw is not None else {}

    def _save_positions(self) -> None:
        catalog = self.r.store.catalog
        with catalog.env.begin(write=True, db=catalog.meta) as txn:
            txn.put(_POSITIONS_KEY, json.dumps(self._judged_positions).encode())


def _key(pos: Position) -> list[object]:
    return [pos.site, pos.lat, pos.lon, pos.alive]
