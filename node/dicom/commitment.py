"""Storage Commitment, push model (PS3.4 Annex J): success means safe off-site, and
an accepted request is answered even across restarts of the node.

An N-ACTION (Request Storage Commitment) is answered at once, and success means
taken: the transaction (UID, requester, references, deadline) is committed to
the node's LMDB index (commit_ledger.py) and its request is in the audit trail
before the answer goes out. A background thread then watches each referenced
instance until the node judges its copies safe (N verified copies at sites
pairwise >= D miles apart, `Archive.instance_safety`), and sends one
N-EVENT-REPORT per transaction: event type 1 when every instance is safe, else
type 2 with a Failed SOP Sequence once `commitment_timeout_s` has passed since
the request (wall-clock time, counted across restarts). Each failed item
carries a Failure Reason code and, in a private element, the reason in words:

    (0009,0010) LO  "PACSMESH"          private creator
    (0009,1010) LT  "not safe within 30 s: 1 of 3 safe copies so far"

After a restart or a crash every accepted transaction is read back and judged
again; its report goes out as before. A delivered report's record is deleted.
Delivery is at least once: a crash right after a delivery sends it again.

Where the report goes (commit_outbox.py):
- requester's AE title in [dicom.destinations]: on a new association to it (the
  usual way: requesters rarely keep an association open for as long as safety
  takes), up to 100 reports per association. A requester that cannot be reached
  is tried again after 5 s, doubling up to every 10 min;
- otherwise on the requester's own association while it is open. Once it has
  closed (always, after a restart) the node cannot call the requester, so the
  report waits until the requester (same AE title, and same certificate on the
  TLS listener) sends its next Storage Commitment request, and then goes on that
  association (PS3.4 J.3.3 allows a report on an association other than the
  N-ACTION's). A waiting report is logged as a warning and audited. An operator
  who wants such reports sooner adds the requester to [dicom.destinations] and
  restarts the node: the kept reports then go out on new associations.
A report not delivered 24 h after its deadline is given up: logged as an error,
audited, and deleted.

Limits: at most 50,000 references per request and 8 MB of Action Information
(commit_request.py), and 200,000 references awaiting commitment in all (memory);
past them a request is refused with 0x0213 and an Error Comment, and nothing
already accepted is touched.

Audit: the N-ACTION (transaction, instances; refused ones with the reason) is
recorded before it is answered; the N-EVENT-REPORT (how many safe, how many
failed) when delivered, delayed (once per transaction) or given up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lmdb
from pydicom.dataset import Dataset

from pacsmesh.node.audit import Event
from pacsmesh.node.chunkstore import is_lmdb_full
from pacsmesh.node.dicom.archive import Archive
from pacsmesh.node.dicom.commit_delivery import (
    STORAGE_COMMITMENT_PUSH,
    send_reports,
    send_to_destination,
)
from pacsmesh.node.dicom.commit_ledger import Ledger, LedgerClosed
from pacsmesh.node.dicom.commit_outbox import (
    DESTINATION,
    REQUESTER,
    Outbox,
    Route,
    give_up_at,
)
from pacsmesh.node.dicom.commit_request import (
    STATUS_PROCESSING_FAILURE,
    STATUS_RESOURCE_LIMITATION,
    STATUS_SUCCESS,
    Refused,
    Request,
    error_comment,
    read_request,
)
from pacsmesh.node.dicom.commit_verdict import Transaction, TxnKey, judge, summary
from pacsmesh.node.dicom.trail import ROLE, Trail

__all__ = ["STORAGE_COMMITMENT_PUSH", "Commitment"]

LOGGER = logging.getLogger(__name__)

POLL_S = 0.5  # how soon after becoming safe a commitment is reported
POLL_LOAD_MAX = 0.2  # share of one core the safety checks may take: the interval grows
REFERENCES_PENDING_MAX = 200_000  # instances awaited or reported-to-be, in all (memory)
REPORT_THREADS = 2  # deliveries in flight: a requester that hangs does not block others
FAILED_LOGGED_MAX = 5  # failed instances named in the log per report


class Commitment:
    def __init__(self, archive: Archive, ae_title: str, destinations: dict[str, str],
                 timeout_s: float, clock: Callable[[], float] = time.time,
                 trail: Trail | None = None, ledger: Ledger | None = None,
                 references_max: int = REFERENCES_PENDING_MAX) -> None:
        self.archive, self.ae_title, self.destinations = archive, ae_title, destinations
        self.timeout_s, self.clock, self.trail = timeout_s, clock, trail
        self.references_max = references_max
        self.ledger = ledger if ledger is not None else Ledger(archive.store.env)
        self._lock = threading.Lock()  # guards the four below
        self._pending: dict[TxnKey, Transaction] = {}  # not decided yet
        self._pending_refs = 0
        self._outbox = Outbox()  # decided, report not delivered yet
        self._assocs: dict[Route, Any] = {}  # the association each requester last asked on
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reports = ThreadPoolExecutor(REPORT_THREADS, thread_name_prefix="commit-report")
        self.reported = 0  # reports delivered, for logs and tests

    def route_of(self, txn: Transaction) -> Route:
        if txn.calling_ae in self.destinations:
            return Route(DESTINATION, txn.calling_ae)
        return Route(REQUESTER, txn.who)

    # -- N-ACTION, in an association thread ----------------------------------------

    def handle_n_action(self, event: Any) -> tuple[Dataset, None]:
        """Answers at once: success once the transaction is durable and audited."""
        assoc = event.assoc
        requestor = assoc.requestor
        calling = str(requestor.ae_title or "").strip()
        who = self.trail.who(assoc) if self.trail is not None else f"AE:{calling}"
        address = f"{requestor.address}:{requestor.port}"
        request: Request | None = None
        try:
            request = _read(event)
            txn, replaced = self._accept(request, calling, who, address)
        except Refused as exc:
            LOGGER.warning("storage commitment request from %s refused: %s", calling, exc)
            try:
                self._audit_action(assoc, request, "refused", str(exc))
            except OSError as audit_exc:
                LOGGER.error("storage commitment audit event cannot be written: %s", audit_exc)
            return _status(exc.status, str(exc)), None
        try:
            self._audit_action(assoc, request, "ok", "")
        except OSError as exc:
            LOGGER.error("storage commitment audit event cannot be written: %s", exc)
            self._withdraw(txn, replaced)
            return _status(STATUS_PROCESSING_FAILURE, "audit trail cannot be written"), None
        route = self.route_of(txn)
        if route.kind == REQUESTER:
            LOGGER.warning("storage commitment from %s: that AE is not in [dicom.destinations],"
                           " so the report goes back on its own association while open, else "
                           "on the next one it asks on", calling)
            with self._lock:
                self._assocs[route] = assoc
                waiting = self._outbox.waiting(route)
            if waiting:  # reports kept for it (from before a restart): send them now
                self._reports.submit(self._deliver, route, [], assoc, True)
        LOGGER.info("storage commitment %s from %s: %d instances; reported once safe, or "
                    "as failed after %g s", txn.uid, calling, len(txn.refs), self.timeout_s)
        return _status(STATUS_SUCCESS), None

    def _accept(self, request: Request, calling: str, who: str, address: str
                ) -> tuple[Transaction, Transaction | None]:
        """The transaction, durable, and the earlier one under its UID that it replaced
        (a retry); `Refused` if it cannot be taken."""
        now = self.clock()
        txn = Transaction(request.transaction_uid, calling, request.references, now,
                          now + self.timeout_s, who=who, address=address,
                          serial=os.urandom(8).hex())
        with self._lock:  # one at a time: the check and the reservation are one step
            replaced = self._pending.get(txn.key) or self._outbox.get(txn.key)
            waiting = self._pending_refs + self._outbox.references - (
                len(replaced.refs) if replaced is not None else 0)
            if waiting + len(txn.refs) > self.references_max:
                raise Refused(STATUS_RESOURCE_LIMITATION,
                              f"{waiting} instances await commitment, at most "
                              f"{self.references_max}: ask later")
            try:
                self.ledger.put(txn)
            except LedgerClosed as exc:
                raise Refused(STATUS_PROCESSING_FAILURE, "the archive is stopping") from exc
            except (lmdb.Error, OSError) as exc:
                LOGGER.error("storage commitment %s cannot be recorded: %s", txn.uid, exc)
                if is_lmdb_full(exc):
                    raise Refused(STATUS_RESOURCE_LIMITATION, "storage full") from exc
                raise Refused(STATUS_PROCESSING_FAILURE, "cannot be recorded") from exc
            # a repeated transaction UID is a retry: it starts over, and replaces the old
            self._drop_pending(txn.key)
            self._outbox.discard(txn.key)
            self._pending[txn.key] = txn
            self._pending_refs += len(txn.refs)
        return txn, replaced

    def _withdraw(self, txn: Transaction, replaced: Transaction | None) -> None:
        """Undo an acceptance that cannot be answered with success. A retry that had
        replaced an accepted transaction puts that one back: it was acknowledged, and
        must still be answered."""
        with self._lock:
            if self._pending.get(txn.key) is txn:
                self._drop_pending(txn.key)
        try:
            if replaced is not None:
                self.ledger.put(replaced)  # the same key: the retry's record is gone
            else:
                self.ledger.delete([txn])
        except (LedgerClosed, lmdb.Error, OSError) as exc:
            LOGGER.error("storage commitment %s refused but its record could not be undone "
                         "(%s): a report will be sent after a restart", txn.uid, exc)
        if replaced is not None:
            with self._lock:
                if txn.key not in self._pending:  # decided again by the next watcher pass
                    self._pending[txn.key] = replaced
                    self._pending_refs += len(replaced.refs)

    def _drop_pending(self, key: TxnKey) -> None:
        old = self._pending.pop(key, None)
        if old is not None:
            self._pending_refs -= len(old.refs)

    # -- the watcher ---------------------------------------------------------------

    def start(self) -> None:
        """Reload what was accepted before this start, then watch."""
        self._reload()
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._reports.shutdown(wait=False, cancel_futures=True)
        self.ledger.close()  # waits for a write under way; the store closes after us
        with self._lock:
            kept = len(self._pending) + len(self._outbox)
        if kept:
            LOGGER.info("%d storage commitment transactions kept for the next start", kept)

    def _reload(self) -> None:
        txns, unreadable = self.ledger.load()
        for bad in unreadable:
            LOGGER.error("storage commitment record %r cannot be read (%s): dropped; its "
                         "requester gets no report", bad.key, bad.why)
            self._audit(Event(time=time.time(), who="", role=ROLE, address="",
                              action="N-EVENT-REPORT", outcome="failed",
                              detail=f"storage commitment record {bad.key!r} unreadable, "
                                     f"dropped: {bad.why}"))
        if unreadable:
            self.ledger.drop([bad.key for bad in unreadable])
        with self._lock:
            for txn in txns:
                if txn.key not in self._pending:  # not already retried since we listen
                    self._pending[txn.key] = txn
                    self._pending_refs += len(txn.refs)
        if txns:
            held = sum(1 for t in txns if self.route_of(t).kind == REQUESTER)
            LOGGER.info("%d storage commitment transactions (%d instances) reloaded; %d of "
                        "them for requesters not in [dicom.destinations], whose reports wait "
                        "for their next request", len(txns), sum(len(t.refs) for t in txns),
                        held)

    def _run(self) -> None:
        interval = POLL_S
        while not self._stop.wait(interval):
            started = time.monotonic()
            try:
                self.poll()
            except Exception:  # the watcher must outlive one bad round
                LOGGER.exception("storage commitment round failed")
            spent = time.monotonic() - started
            interval = max(POLL_S, spent / POLL_LOAD_MAX)

    def poll(self) -> None:
        """One round: judge what is pending, start deliveries that are due, give up
        on reports kept too long."""
        with self._lock:
            txns = list(self._pending.values())
        now = self.clock()
        decided = []
        for txn in txns:
            if self._stop.is_set():
                return
            if judge(txn, now, self._lookup, self.archive.instance_safety):
                decided.append(txn)
        held: list[Transaction] = []
        with self._lock:
            for txn in decided:
                if self._pending.get(txn.key) is not txn:
                    continue  # retried meanwhile: the new one is judged on its own
                self._drop_pending(txn.key)
                route = self.route_of(txn)
                self._outbox.add(route, txn)
                if route.kind == REQUESTER and self._open(route) is None:
                    held.append(txn)
            expired = self._outbox.expired(now)  # first: a report days late is not sent
            batches = self._outbox.due(now)
            on_assoc = [(route, assoc) for route in list(self._assocs)
                        if (assoc := self._open(route)) is not None
                        and self._outbox.waiting(route)]
        held = [t for t in held if not any(t is e for e in expired)]
        for route, batch in batches:
            self._reports.submit(self._deliver, route, batch, None)
        for route, assoc in on_assoc:
            self._reports.submit(self._deliver, route, [], assoc)
        if held:
            self._note_held(held)
        if expired:
            self._give_up(expired, now)

    def _open(self, route: Route) -> Any:
        """The requester's association to send on, if it is still established (with
        the lock held); a closed one is forgotten."""
        assoc = self._assocs.get(route)
        if assoc is not None and not assoc.is_established:
            del self._assocs[route]
            return None
        return assoc

    def _lookup(self, sop_instance_uid: str) -> tuple[str, str] | None:
        catalog = self.archive.store.catalog
        versions = catalog.versions_of(sop_instance_uid)
        got = catalog.get(versions[-1]) if versions else None
        if got is None:
            return None
        return got[1].study_instance_uid, got[1].sop_class_uid

    # -- delivery, in a report thread ---------------------------------------------------

    def _deliver(self, route: Route, batch: list[Transaction], assoc: Any,
                 force: bool = False) -> None:
        """Send `batch` (or, when empty, whatever waits for `route`) and keep going batch
        after batch while every send succeeds."""
        if not batch:
            with self._lock:
                batch = self._outbox.take(route, self.clock(), force)
        while batch and not self._stop.is_set():
            sent: list[Transaction] = []
            error = ""
            try:
                if assoc is None:
                    send_to_destination(self.ae_title, route.name,
                                        self.destinations[route.name], batch, sent,
                                        self._stop.is_set)
                else:
                    send_reports(assoc, batch, sent, self._stop.is_set)
            except Exception as exc:  # an unreachable requester, a refused report, a bug
                error = str(exc) or type(exc).__name__
            self._settle(route, batch, sent, error, assoc)
            if error:
                return
            with self._lock:
                batch = self._outbox.take(route, self.clock())

    def _settle(self, route: Route, batch: list[Transaction], sent: list[Transaction],
                error: str, assoc: Any) -> None:
        for txn in batch:
            txn.attempts += 1
        if sent:
            try:
                self.ledger.delete(sent)
            except LedgerClosed:
                LOGGER.info("%d storage commitment reports delivered while stopping; they "
                            "may be sent again after the restart", len(sent))
            except (lmdb.Error, OSError) as exc:
                LOGGER.error("delivered storage commitment reports cannot be forgotten (%s); "
                             "they may be sent again after a restart", exc)
        with self._lock:
            delay = self._outbox.settle(route, sent, error, self.clock())
        self.reported += len(sent)
        how = ("on the requester's association" if assoc is not None else
               f"on a new association to {self.destinations.get(route.name, '?')}")
        for txn in sent:
            LOGGER.info("%s; reported %s", summary(txn), how)
            for ref, (code, why) in list(txn.failed.items())[:FAILED_LOGGED_MAX]:
                LOGGER.warning("  %s failed (0x%04X): %s", ref.sop_instance_uid, code, why)
            outcome = "failed" if not txn.safe else "partial" if txn.failed else "ok"
            retried = f" after {txn.attempts} attempts" if txn.attempts > 1 else ""
            self._audit_report(txn, outcome, f"reported {how}{retried}")
        if not error:
            return
        unsent = [t for t in batch if not any(t is s for s in sent)]
        if assoc is None:
            LOGGER.warning("%d storage commitment reports for %s at %s not delivered: %s; "
                           "next attempt in %g s", len(unsent), route.name,
                           self.destinations.get(route.name, "?"), error, delay)
        else:
            LOGGER.warning("%d storage commitment reports for %s not delivered on its "
                           "association: %s; they wait for its next request", len(unsent),
                           route.name, error)
        for txn in unsent:
            if txn.attempts == 1:  # audited once per transaction, not per retry
                self._audit_report(txn, "failed", f"delayed: {error}; retried until "
                                                  f"{_iso(give_up_at(txn))}")

    def _note_held(self, held: list[Transaction]) -> None:
        by_requester: dict[str, int] = {}
        for txn in held:
            by_requester[txn.calling_ae] = by_requester.get(txn.calling_ae, 0) + 1
            self._audit_report(txn, "failed", "delayed: the requester is not in "
                               "[dicom.destinations] and its association is closed; sent on "
                               "its next association that asks for Storage Commitment, until "
                               f"{_iso(give_up_at(txn))}")
        for calling, count in by_requester.items():
            LOGGER.warning("%d storage commitment reports for %s decided, but %s is not in "
                           "[dicom.destinations] and its association is closed: they wait for "
                           "its next Storage Commitment request (add it to "
                           "[dicom.destinations] to have them sent)", count, calling, calling)

    def _give_up(self, expired: list[Transaction], now: float) -> None:
        try:
            self.ledger.delete(expired)
        except (LedgerClosed, lmdb.Error, OSError) as exc:
            LOGGER.error("storage commitment reports given up cannot be forgotten: %s", exc)
        for txn in expired:
            LOGGER.error("%s; gave up reporting it %g s after its deadline (%d attempts): "
                         "the requester was never reachable", summary(txn), now - txn.deadline,
                         txn.attempts)
            self._audit_report(txn, "failed", f"undeliverable: given up after "
                                              f"{txn.attempts} attempts")

    # -- audit ------------------------------------------------------------------------

    def _audit_action(self, assoc: Any, request: Request | None, outcome: str,
                      why: str) -> None:
        """Raises OSError if the event cannot be made durable."""
        if self.trail is None:
            return
        uid = request.transaction_uid if request is not None else "(no transaction)"
        self.trail.record(assoc, "N-ACTION", outcome,
                          instances=len(request.references) if request is not None else 0,
                          detail=f"storage commitment {uid}{': ' + why if why else ''}")

    def _audit_report(self, txn: Transaction, outcome: str, how: str) -> None:
        self._audit(Event(time=time.time(), who=txn.who, role=ROLE, address=txn.address,
                          action="N-EVENT-REPORT", outcome=outcome, instances=len(txn.safe),
                          detail=f"storage commitment {txn.uid}: {len(txn.safe)} safe, "
                                 f"{len(txn.failed)} failed; {how}"))

    def _audit(self, event: Event) -> None:
        if self.trail is not None:
            self.trail.log.record(event, wait=False)


def _read(event: Any) -> Request:
    raw = event.request.ActionInformation
    syntax = event.context.transfer_syntax
    return read_request(event.action_type, raw.getvalue() if raw is not None else b"",
                        syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)


def _status(code: int, why: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if why:
        ds.ErrorComment = error_comment(why)
    return ds


def _iso(unix_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
