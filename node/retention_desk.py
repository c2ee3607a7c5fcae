"""What operators ask of retention: a study's expiry and holds, legal holds and their
release, a request to delete an expired study; and the one rule deciding deletion.

A study may be deleted only when every one of these holds, checked again in the
transaction that deletes it (Catalog.delete_study):
  - its expiry plus grace_days has passed (node/retention.py, from its record);
  - no legal hold is in force (node/lifecycle.py, replicated to every node);
  - `[retention] delete_expired` is on, or an operator asked for it (`pacsmesh delete`).
Nothing else deletes a study: no API, CLI or DICOM request can before that.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from pacsmesh.node import retention
from pacsmesh.node.errors import LifecycleInvalid, PacsmeshError
from pacsmesh.node.lifecycle import DELETE, HOLD, RELEASE, LifecycleBook
from pacsmesh.node.store import Store
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto import node_pb2


class Refused(PacsmeshError):
    """A lifecycle request refused; the message says why (and is audited)."""


class RetentionDesk:
    def __init__(self, store: Store, book: LifecycleBook, node_id: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.book = book
        self.node_id = node_id
        self.clock = clock
        self.policy = store.catalog.expiry.policy
        # told of every record made here, to push to peers at once (the cluster)
        self.listeners: list[Callable[[list[bytes]], None]] = []

    def today(self) -> dt.date:
        return retention.today_utc(self.clock())

    # ---- the rule ------------------------------------------------------------------

    def first_deletable(self, rec: node_pb2.StudyRecord) -> dt.date | None:
        return self.store.catalog.expiry.first_deletable(rec)

    def state(self, rec: node_pb2.StudyRecord) -> str:
        exp = self.store.catalog.expiry_of(rec)
        if exp.expires is None or self.today() < exp.expires:
            return "kept"
        first = self.first_deletable(rec)
        return "deletable" if first is not None and self.today() >= first else "expired"

    def why_not_deletable(self, rec: node_pb2.StudyRecord) -> str:
        """"" if the study may be deleted now, else why not."""
        exp = self.store.catalog.expiry_of(rec)
        if self.state(rec) != "deletable":
            first = self.first_deletable(rec)
            return (f"not deletable before {first.isoformat()} ({exp.rule}, then "
                    f"{self.policy.grace_days} days of grace, counted from its expiry and "
                    "from its arrival here)" if first else
                    f"never deleted automatically ({exp.rule})")
        if self.book.held(rec.study_uid):
            return "a legal hold is in force"
        if not (self.policy.delete_expired or self.book.delete_requested(rec.study_uid)):
            return "expired, kept: [retention] delete_expired is off and no operator asked"
        return ""

    # ---- reports ---------------------------------------------------------------------

    def report(self, study_uid: str) -> node_pb2.RetentionReply:
        self._check_uid(study_uid)
        out = node_pb2.RetentionReply(study_uid=study_uid, node=self.node_id,
                                      delete_expired=self.policy.delete_expired)
        for rid, h in self.book.holds(study_uid):
            out.holds.add(id=rid, reason=h.reason, who=h.who, node=h.node, at_ms=h.at_ms)
        out.held = bool(out.holds)
        out.delete_granted = self.book.delete_requested(study_uid) is not None
        rec = self.store.catalog.study_record(study_uid)
        if rec is None:
            gone = self.store.catalog.is_deleted(study_uid)
            out.state = "deleted" if gone else "unknown"
            if gone:
                out.rule = (f"deleted here {_day(gone[0] / 1000)} after its retention "
                            f"expired ({_iso(gone[1])})")
                out.expires = _iso(gone[1])
            return out
        exp = self.store.catalog.expiry_of(rec)
        out.expires = exp.expires.isoformat() if exp.expires else ""
        out.rule = exp.rule
        first = self.first_deletable(rec)
        out.deletable_on = first.isoformat() if first else ""
        out.state = self.state(rec)
        return out

    # ---- requests (operator) -----------------------------------------------------------

    def hold(self, study_uid: str, reason: str, who: str) -> node_pb2.RetentionReply:
        self._check_uid(study_uid)
        self._make(HOLD, study_uid, reason, who)
        return self.report(study_uid)

    def release(self, study_uid: str, reason: str, who: str) -> node_pb2.RetentionReply:
        """Ends every hold in force on the study (each by its own RELEASE record)."""
        self._check_uid(study_uid)
        holds = self.book.holds(study_uid)
        if not holds:
            raise Refused(f"study {study_uid} has no legal hold in force")
        for rid, _ in holds:
            self._make(RELEASE, study_uid, reason, who, releases=rid)
        return self.report(study_uid)

    def request_delete(self, study_uid: str, reason: str, who: str
                       ) -> node_pb2.RetentionReply:
        """Asks every node to delete an expired, unheld study (each checks again)."""
        self._check_uid(study_uid)
        rec = self.store.catalog.study_record(study_uid)
        if rec is None:
            raise Refused(f"study {study_uid} is not in this node's catalog")
        exp = self.store.catalog.expiry_of(rec)
        if self.state(rec) != "deletable":
            first = self.first_deletable(rec)
            raise Refused(
                f"study {study_uid} is kept until "
                + (f"{first.isoformat()} ({exp.rule}, plus {self.policy.grace_days} days "
                   "of grace)" if first else f"an operator decides ({exp.rule})")
                + "; records are written once and kept until they expire")
        if self.book.held(study_uid):
            raise Refused(f"study {study_uid} is under a legal hold")
        self._make(DELETE, study_uid, reason, who)
        return self.report(study_uid)

    def _make(self, kind: int, study_uid: str, reason: str, who: str,
              releases: bytes = b"") -> None:
        try:
            _, raw = LifecycleBook.make(kind, study_uid, reason, who,  # type: ignore[arg-type]
                                        self.node_id, int(self.clock() * 1000), releases)
        except LifecycleInvalid as exc:
            raise Refused(str(exc)) from exc
        self.book.add([raw])
        for listener in self.listeners:
            listener([raw])

    @staticmethod
    def _check_uid(study_uid: str) -> None:
        if (problem := uid_problem(study_uid)) is not None:
            raise Refused(f"study UID {problem}")


def _day(seconds: float) -> str:
    return retention.today_utc(seconds).isoformat()


def _iso(key: str) -> str:
    return (f"{key[:4]}-{key[4:6]}-{key[6:8]}" if key != retention.NEVER and len(key) == 8
            else "")
