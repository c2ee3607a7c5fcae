"""Safe and unsafe counts, kept up to date by change, never recounted per call.

Each study's verdict (how many safe copies; unsafe or not) is stored in the
catalog (`safety` and the `unsafe` index, oldest first), so `status` reads two
counts and one key, and `ls --unsafe` walks only unsafe studies. A study is
judged again when something it depends on changed:
  - a commit here touched it (new versions, held or dropped copies), or a peer's
    holding of it changed (the holdings exchange): the transaction that changed
    it also marks it dirty (`safety_dirty`), so a crash never loses the request;
  - a holder's state or site changed (alive, suspect, dead, left): every study
    that holder holds, from the holdings cache, is swept; the sweeps and their
    cursors are kept in the catalog with the view they bring verdicts up to.
Work per step is bounded (STUDIES_PER_STEP_MAX); `pending()` says how far behind
the counts are, and status shows it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time

from pacsmesh.cluster.progress import RepairTracker
from pacsmesh.cluster.safety import Holding, Position, assess
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.node.logsetup import Tally, n_studies
from pacsmesh.node.worker import Worker, WorkerState

LOGGER = logging.getLogger(__name__)
STUDIES_PER_STEP_MAX = 2000  # judged per step: ~0.1 s of work
# A holder that stops counting (suspect, dead, gone) must stay so this many gossip
# intervals before its studies are judged again: an overloaded node flapping
# alive <-> suspect would otherwise make every peer re-judge everything it holds
# on every flap (and load them more). A holder that starts counting is adopted
# at once: that only ever makes verdicts more accurate sooner.
SETTLE_GOSSIP_ROUNDS = 5
# A holder absent from our member table (we restarted and have not heard of it yet)
# stops counting only after this many rounds: peers normally reappear within a few,
# and each flip re-judges everything that holder holds.
ABSENT_GOSSIP_ROUNDS = 15
SWEEP_PAGE = 2000
_STATE_KEY = b"safety_view"
ALL = ""  # a sweep over every study (after an upgrade)


class SafetyWorker(Worker):
    name = "safety"
    idle_s = 0.5

    def __init__(self, r: Replicator, stall_after_s: float, gossip_interval_s: float) -> None:
        self.r = r
        self.settle_s = SETTLE_GOSSIP_ROUNDS * gossip_interval_s
        self.absent_s = ABSENT_GOSSIP_ROUNDS * gossip_interval_s
        self._judged_positions, sweeps = self._load()
        self._sweeps: collections.deque[tuple[str, bytes]] = collections.deque(sweeps)
        # node -> (its new state, since when): changes not yet lasting settle_s
        self._unsettled: dict[str, tuple[list[object] | None, float]] = {}
        self.tracker = RepairTracker(stall_after_s)
        self.judged = 0
        self.became_unsafe, self.became_safe = Tally(), Tally()
        if r.store.catalog.take_sweep_request():
            self._sweeps.append((ALL, b""))
            self._save()

    def pending(self) -> int:
        return self.r.store.catalog.dirty_count() + SWEEP_PAGE * len(self._sweeps)

    async def step(self) -> WorkerState:
        self._watch_positions()
        marks = await self.r._run(self.r.store.catalog.dirty_page, STUDIES_PER_STEP_MAX)
        batch = [study for study, _ in marks]
        swept = False
        if len(batch) < STUDIES_PER_STEP_MAX and self._sweeps:
            batch += await self.r._run(self._sweep_page, STUDIES_PER_STEP_MAX - len(batch))
            swept = True
        if batch:
            await self.r._run(self._judge, batch, marks)
        if swept:
            await self.r._run(self._save)  # the sweep's cursor, once its page is judged
        await self.r._run(self._sample)
        await self.r._run(self._say)
        return WorkerState.BUSY if (batch and self.pending()) else WorkerState.IDLE

    def _sample(self) -> None:
        _, unsafe, _ = self.r.store.catalog.safety_counts()
        self.tracker.add(time.monotonic(), unsafe, self.backlog_bytes())

    def backlog_bytes(self) -> int:
        """What the cluster still has to copy, as each alive node last told us."""
        alive = {m.node_id for m in self.r.state.snapshot.alive_peers(self.r.node_id)}
        total = self.r.planner.backlog(self.r)[1]
        return total + sum(rep.backlog_bytes for n, rep in self.r.reports.items() if n in alive)

    def _judge(self, studies: list[str], marks: list[tuple[str, bytes]]) -> None:
        r = self.r
        positions = self._positions()
        # the holders of the settled view, not of the live one: a node that has just
        # started knows no peers yet, and its verdicts must not say so
        peers = sorted(self._judged_positions)
        records = r.store.catalog.study_records_of(studies)  # one read for the batch
        holdings = r.holdings.for_studies([(s, rec.partition) for s, rec in records.items()],
                                          peers)
        verdicts = []
        for study, rec in records.items():
            held = holdings.get(study, [])
            if rec.held_instances > 0:
                held.append(Holding(r.node_id, rec.held_instances, rec.held_digest))
            verdict = assess(rec.instances, rec.current_digest, held, positions,
                             r.state.min_distance_miles)
            verdicts.append((study, verdict.safe_copies,
                             rec.instances == 0 or verdict.safe_copies < r.state.copies))
            LOGGER.debug("judged: %d safe copies, full holders %s", verdict.safe_copies,
                         verdict.full_holders, extra={"study": study})
        flips: list[tuple[str, bool]] = []
        r.store.catalog.set_safety(verdicts, marks, flips)
        self.judged += len(verdicts)
        copies = {study: safe for study, safe, _ in verdicts}
        for study, unsafe in flips:
            (self.became_unsafe if unsafe else self.became_safe).add(study)
            LOGGER.debug("study became %s: %d safe copies of %d", "unsafe" if unsafe else "safe",
                         copies[study], r.state.copies, extra={"study": study})

    def _say(self) -> None:
        """The studies that became unsafe or safe, a line per kind and interval at most."""
        now = time.monotonic()
        for tally, what in ((self.became_unsafe, "unsafe"), (self.became_safe, "safe")):
            if got := tally.take(now):
                _, unsafe, _ = self.r.store.catalog.safety_counts()
                LOGGER.info("%s became %s (first: %s); %s unsafe now", n_studies(got.count),
                            what, got.first, f"{unsafe:,}")

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
        live = {n: _key(pos) for n, pos in self.r.positions().items() if n != self.r.node_id}
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
            elif t - seen[1] >= (self.absent_s if key is None else self.settle_s):
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
            # from the start: what an unfinished sweep judged was judged against the
            # view this change replaces
            self._sweeps = collections.deque(s for s in self._sweeps if s[0] != node_id)
            self._sweeps.append((node_id, b""))
        self._judged_positions = judged  # replaced, not mutated: _judge reads it in a thread
        LOGGER.info("holders changed state (%s): judging their studies again",
                    ", ".join(changed))
        self._save()

    def _positions(self) -> dict[str, Position]:
        """Holders as the stored verdicts see them: every verdict is judged against the
        same settled view, and a settled change re-judges what it touches."""
        out = {n: Position(n, str(k[0]), float(k[1]), float(k[2]), bool(k[3]))  # type: ignore[arg-type]
               for n, k in self._judged_positions.items()}
        me = self.r.state.snapshot.positions().get(self.r.node_id)
        if me is not None:
            # we count as alive in our own verdicts even while shutting down ("left"):
            # what we hold is on our disk, and a verdict stored now outlives the stop
            out[me.node_id] = dataclasses.replace(me, alive=True)
        return out

    def _load(self) -> tuple[dict[str, list[object]], list[tuple[str, bytes]]]:
        """The view the stored verdicts are judged against, and the sweeps still owed
        to bring them up to it (kept together: a restart resumes where it stopped)."""
        catalog = self.r.store.catalog
        with catalog.env.begin(db=catalog.meta) as txn:
            raw = txn.get(_STATE_KEY)
        if raw is None:
            return {}, []
        doc = json.loads(bytes(raw))
        return dict(doc["positions"]), [(n, bytes.fromhex(a)) for n, a in doc["sweeps"]]

    def _save(self) -> None:
        doc = {"positions": self._judged_positions,
               "sweeps": [(n, a.hex()) for n, a in list(self._sweeps)]}
        catalog = self.r.store.catalog
        with catalog.env.begin(write=True, db=catalog.meta) as txn:
            txn.put(_STATE_KEY, json.dumps(doc).encode())


def _key(pos: Position) -> list[object]:
    return [pos.site, pos.lat, pos.lon, pos.alive]
