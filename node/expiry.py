"""The expiry deleter: deletes studies whose retention ran out, and nothing else.

Every `expiry_check_s` it looks at the studies whose expiry plus grace has passed
(the expiry index, read from its start up to today: cost follows what expired,
not the archive) when `[retention] delete_expired` is on, and at those an
operator asked to delete. Each is deleted only if RetentionDesk.why_not_deletable
finds nothing, checked again inside the deleting transaction, and only while
`confirmed()` says this node knows every legal hold the live cluster knows
(cluster/lifecycle_sync.py): a node that cannot confirm pauses, and says why.
Deletions are audited; the chunks freed go to GC.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable

from pacsmesh.node.audit import AuditLog, Event
from pacsmesh.node.retention_desk import RetentionDesk
from pacsmesh.node.store import Store
from pacsmesh.node.study_index import SEP, split_key
from pacsmesh.node.worker import Worker, WorkerState
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)
CANDIDATES_MAX = 1000  # studies examined per check (the rest wait for the next one)
PAUSE_LOG_EVERY_S = 600.0


def alone() -> str:
    return ""  # a node without peers knows every hold there is


class ExpiryDeleter(Worker):
    name = "expiry"

    def __init__(self, store: Store, desk: RetentionDesk, audit: AuditLog | None,
                 check_s: float, confirmed: Callable[[], str] = alone) -> None:
        self.store = store
        self.desk = desk
        self.audit = audit
        self.check_s = check_s
        self.confirmed = confirmed  # "" when deletion may go on, else why it waits
        self.idle_s = min(1.0, check_s)
        self._next = 0.0
        self.paused = ""  # why the last check could not delete (status shows it)
        self._paused_logged = -1e9
        self.deleted = 0  # since start
        self._resume = b""  # where the next check reads the expiry index from
        self._resume_asked = ""  # and the operators' deletion requests
        self.on_deleted: list[Callable[[list[str]], None]] = []

    async def step(self) -> WorkerState:
        now = time.monotonic()
        if now < self._next:
            return WorkerState.IDLE
        self._next = now + self.check_s
        loop = asyncio.get_running_loop()
        due = await loop.run_in_executor(None, self._due)
        if not due:
            self.paused = ""
            return WorkerState.IDLE
        why = self.confirmed()
        if why:
            self.paused = f"{len(due)} expired studies wait: {why}"
            if now - self._paused_logged > PAUSE_LOG_EVERY_S:
                self._paused_logged = now
                LOGGER.warning("retention: deletion paused: %s", self.paused)
            return WorkerState.IDLE
        self.paused = ""
        gone = await loop.run_in_executor(None, self._delete, due)
        if gone:
            for listener in self.on_deleted:
                listener(gone)
        return WorkerState.IDLE

    def _due(self) -> list[str]:
        """Studies that may be deleted now (checked again when deleted)."""
        uids: dict[str, None] = {}
        policy = self.desk.policy
        if policy.delete_expired:
            cutoff = (self.desk.today() - dt.timedelta(days=policy.grace_days)).strftime(
                "%Y%m%d").encode()
            rows = self.store.catalog.scan("expires", self._resume, CANDIDATES_MAX,
                                           lambda k: split_key(k)[0] <= cutoff)
            # held studies stay in the index: the next check goes on past them, and
            # starts over once it reached the cutoff
            self._resume = rows[-1][0] + SEP if len(rows) == CANDIDATES_MAX else b""
            uids.update((uid, None) for _, uid, _ in rows)
        asked = self.desk.book.delete_requests(self._resume_asked, CANDIDATES_MAX)
        self._resume_asked = asked[-1] if len(asked) == CANDIDATES_MAX else ""
        uids.update(dict.fromkeys(asked))
        recs = self.store.catalog.study_records_of(uids)
        return [uid for uid, rec in recs.items() if not self.desk.why_not_deletable(rec)]

    def _delete(self, due: list[str]) -> list[str]:
        gone: list[str] = []
        for uid in due:
            rule = ""

            def check(rec: node_pb2.StudyRecord) -> bool:
                nonlocal rule
                rule = self.desk.why_not_deletable(rec)
                return not rule

            rec = self.store.catalog.study_record(uid)
            if rec is None:
                continue
            asked = self.desk.book.delete_requested(uid)
            detail = (f"retention expired: {self.store.catalog.expiry_of(rec).rule}; "
                      + (f"deletion asked by {asked.who}: {asked.reason}" if asked else
                         "[retention] delete_expired is on"))
            try:
                # the trail says so before the study goes: a crash between the two
                # leaves an event for a deletion the next check then does, never a
                # deletion without one
                self._audit(uid, rec.instances, "ok", f"deleting: {detail}")
                done = self.store.catalog.delete_study(uid, int(time.time() * 1000), check)
            except Exception as exc:  # one study's failure must not stop the others
                LOGGER.exception("retention: deleting study %s failed", uid, extra={"study": uid})
                self._audit(uid, rec.instances, "failed", f"{detail}; {exc}")
                continue
            if done is None:  # changed meanwhile (a hold, a new version): kept
                self._audit(uid, rec.instances, "refused",
                            f"{detail}; not deleted: {rule or 'it changed meanwhile'}")
                continue
            manifests, instances = done
            gone.append(uid)
            self.deleted += 1
            LOGGER.info("retention: study %s deleted (%d instances, %d versions): %s", uid,
                        instances, manifests, detail, extra={"study": uid})
        return gone

    def _audit(self, uid: str, instances: int, outcome: str, detail: str) -> None:
        if self.audit is not None:
            self.audit.record(Event(time=time.time(), who="retention", role="node",
                                    address="", action="expire", outcome=outcome,
                                    study_uid=uid, instances=instances, detail=detail))
