"""Storage Commitment, push model (PS3.4 Annex J): success means safe off-site.

An N-ACTION (Request Storage Commitment) is answered at once: the request is
taken. A background thread then watches each referenced instance until the
node judges its copies safe (N verified copies at sites pairwise >= D miles
apart, `Archive.instance_safety`), and sends one N-EVENT-REPORT per transaction:
event type 1 when every instance is safe, else type 2 with a Failed SOP Sequence
once `commitment_timeout_s` has passed. Each failed item carries a Failure Reason
code and, in a private element, the reason in words:

    (0009,0010) LO  "PACSMESH"          private creator
    (0009,1010) LT  "not safe within 30 s: 1 of 3 safe copies so far"

Delivery: on a new association to the requester when its AE title is in
[dicom.destinations] (the usual way: requesters rarely keep an association open
for as long as safety takes), proposing the SCP role for the Storage Commitment
SOP class; else on the requester's own association if it is still open; else it
cannot be delivered, which is logged as an error. A failed delivery is retried
a few times. Pending transactions live in memory: after a restart the requester
times out and asks again, which is what the standard expects of it.

Audit: the N-ACTION (transaction, instances) is recorded before it is answered,
and the N-EVENT-REPORT (how many safe, how many failed, or undeliverable) when it
has been delivered or given up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_context, build_role

from pacsmesh.node.audit import Event
from pacsmesh.node.dicom.archive import Archive
from pacsmesh.node.dicom.trail import ROLE, Trail

LOGGER = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # SOP class
WELL_KNOWN_INSTANCE_UID = "1.2.840.10008.1.20.1.1"  # its one well-known SOP instance
ACTION_REQUEST_COMMITMENT = 1
EVENT_ALL_SUCCESS = 1
EVENT_FAILURES = 2

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_RESOURCE_LIMITATION = 0x0213
# Failure Reason (0008,1197) codes, PS3.3 C.14.1.1
FAILURE_PROCESSING = 0x0110
FAILURE_NO_SUCH_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "PACSMESH"
PRIVATE_REASON = 0x10  # element offset in the block: (0009,1010)

POLL_S = 0.5  # how soon after becoming safe a commitment is reported
POLL_LOAD_MAX = 0.2  # share of one core the safety checks may take: the interval grows
REFERENCES_PENDING_MAX = 200_000  # instances awaited across all transactions (memory)
REPORT_ATTEMPTS = 3
REPORT_RETRY_S = 5.0
REPORT_THREADS = 2  # deliveries in flight: a requester that hangs does not block others
REPORT_TIMEOUT_S = 15.0  # association and DIMSE timeouts when delivering a report


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Transaction:
    """One N-ACTION: what was asked, by whom, and the verdicts so far (per reference:
    the same instance named under two SOP classes gets two verdicts)."""

    uid: str
    calling_ae: str
    assoc: Any  # the requester's association: a fallback for delivery
    refs: list[Reference]
    received_at: float
    deadline: float
    who: str = ""  # for the audit trail: as the N-ACTION came
    address: str = ""
    safe: set[Reference] = field(default_factory=set)
    failed: dict[Reference, tuple[int, str]] = field(default_factory=dict)  # (code, why)
    waiting_for: dict[Reference, str] = field(default_factory=dict)  # why not safe yet

    def undecided(self) -> list[Reference]:
        return [r for r in self.refs if r not in self.safe and r not in self.failed]


# ---- the verdict, free of IO ---------------------------------------------------------------

# What is known of a stored instance: (study uid, stored SOP class uid), or None.
InstanceLookup = Callable[[str], tuple[str, str] | None]
# Safety of an instance, judged on its whole study: (safe, why not).
SafetyLookup = Callable[[str], tuple[bool, str]]
NOT_RECEIVED = "not received by the archive"


def judge(txn: Transaction, now: float, timeout_s: float, lookup: InstanceLookup,
          safety: SafetyLookup) -> bool:
    """Update the verdicts of a transaction; True once it can be reported."""
    by_study: dict[str, tuple[bool, str]] = {}
    for ref in txn.undecided():
        sop = ref.sop_instance_uid
        known = lookup(sop)
        if known is None:
            txn.waiting_for[ref] = NOT_RECEIVED
            continue
        study, stored_class = known
        if stored_class and ref.sop_class_uid and stored_class != ref.sop_class_uid:
            txn.failed[ref] = (FAILURE_CLASS_INSTANCE_CONFLICT,
                               f"stored as SOP class {stored_class}, not {ref.sop_class_uid}")
            continue
        if study not in by_study:  # safety is per study: one check covers its instances
            by_study[study] = safety(sop)
        safe, why = by_study[study]
        if safe:
            txn.safe.add(ref)
            txn.waiting_for.pop(ref, None)
        else:
            txn.waiting_for[ref] = why or "not safe yet"
    if not txn.undecided():
        return True
    if now < txn.deadline:
        return False
    for ref in txn.undecided():
        why = txn.waiting_for.get(ref, "not safe yet")
        code = FAILURE_NO_SUCH_INSTANCE if why == NOT_RECEIVED else FAILURE_PROCESSING
        txn.failed[ref] = (code, f"not safe within {timeout_s:g} s: {why}")
    return True


def event_report(txn: Transaction) -> tuple[int, Dataset]:
    """(event type, Event Information) of a decided transaction."""
    ds = Dataset()
    ds.TransactionUID = txn.uid
    good = [r for r in txn.refs if r in txn.safe]
    bad = [r for r in txn.refs if r in txn.failed]
    if good:
        ds.ReferencedSOPSequence = Sequence([_item(r) for r in good])
    if not bad:
        return EVENT_ALL_SUCCESS, ds
    items = []
    for r in bad:
        code, why = txn.failed[r]
        item = _item(r)
        item.FailureReason = code
        block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(PRIVATE_REASON, "LT", why)
        items.append(item)
    ds.FailedSOPSequence = Sequence(items)
    return EVENT_FAILURES, ds


def _item(r: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = r.sop_class_uid
    item.ReferencedSOPInstanceUID = r.sop_instance_uid
    return item


def parse_request(info: Dataset) -> tuple[str, list[Reference]]:
    """(transaction uid, references) of an N-ACTION's Action Information; ValueError
    says what is wrong."""
    uid = str(info.get("TransactionUID", "")).strip()
    if not uid:
        raise ValueError("Transaction UID (0008,1195) is missing")
    refs = []
    for item in info.get("ReferencedSOPSequence", []):
        sop = str(item.get("ReferencedSOPInstanceUID", "")).strip()
        if not sop:
            raise ValueError("a Referenced SOP Sequence item has no SOP Instance UID")
        refs.append(Reference(str(item.get("ReferencedSOPClassUID", "")).strip(), sop))
    if not refs:
        raise ValueError("Referenced SOP Sequence (0008,1199) is empty")
    return uid, list(dict.fromkeys(refs))


# ---- the service ------------------------------------------------------------------------------


class Commitment:
    def __init__(self, archive: Archive, ae_title: str, destinations: dict[str, str],
                 timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 trail: Trail | None = None) -> None:
        self.archive, self.ae_title, self.destinations = archive, ae_title, destinations
        self.timeout_s, self.clock, self.trail = timeout_s, clock, trail
        self._pending: dict[str, Transaction] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reports = ThreadPoolExecutor(REPORT_THREADS, thread_name_prefix="commit-report")
        self._same_assoc_lock = threading.Lock()
        self.reported = 0  # transactions reported, for logs and tests

    # -- N-ACTION, in an association thread ----------------------------------------

    def handle_n_action(self, event: Any) -> tuple[int, Dataset | None]:
        """Answers at once, once the request is in the audit trail."""
        code, uid, instances, detail = self._take(event)
        if self.trail is not None:
            try:
                self.trail.record(event.assoc, "N-ACTION",
                                  "ok" if code == STATUS_SUCCESS else "refused",
                                  instances=instances,
                                  detail=f"storage commitment {uid or '(no transaction)'}"
                                         f"{': ' + detail if detail else ''}")
            except OSError as exc:
                LOGGER.error("storage commitment audit event cannot be written: %s", exc)
                if code == STATUS_SUCCESS:
                    with self._lock:
                        self._pending.pop(uid, None)
                return STATUS_PROCESSING_FAILURE, None
        return code, None

    def _take(self, event: Any) -> tuple[int, str, int, str]:
        """(status, transaction uid, instances, why refused)."""
        calling = event.assoc.requestor.ae_title
        if event.action_type != ACTION_REQUEST_COMMITMENT:
            return STATUS_NO_SUCH_ACTION, "", 0, f"no action type {event.action_type}"
        try:
            uid, refs = parse_request(event.action_information)
        except Exception as exc:  # missing keys, or a dataset that does not decode
            LOGGER.warning("storage commitment request from %s refused: %s", calling, exc)
            return STATUS_INVALID_ARGUMENT, "", 0, str(exc)
        now = self.clock()
        requestor = event.assoc.requestor
        txn = Transaction(uid, calling, event.assoc, refs, now, now + self.timeout_s,
                          who=self.trail.who(event.assoc) if self.trail else f"AE:{calling}",
                          address=f"{requestor.address}:{requestor.port}")
        with self._lock:
            waiting = sum(len(t.refs) for t in self._pending.values())
            if waiting + len(refs) > REFERENCES_PENDING_MAX:
                LOGGER.error("storage commitment from %s refused: %d instances already "
                             "awaited (at most %d)", calling, waiting, REFERENCES_PENDING_MAX)
                return (STATUS_RESOURCE_LIMITATION, uid, len(refs),
                        f"{waiting} instances already awaited")
            self._pending[uid] = txn  # a repeated transaction UID is a retry: start over
        if calling not in self.destinations:
            LOGGER.warning("storage commitment from %s: that AE is not in "
                           "[dicom.destinations], so the report can only go back on its "
                           "own association, if it is still open then", calling)
        LOGGER.info("storage commitment %s from %s: %d instances; reported once safe, or "
                    "as failed after %g s", uid, calling, len(refs), self.timeout_s)
        return STATUS_SUCCESS, uid, len(refs), ""

    # -- the watcher ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._reports.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._pending:
                LOGGER.warning("%d storage commitment transactions dropped at shutdown; "
                               "their requesters will ask again", len(self._pending))
            self._pending.clear()

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
        with self._lock:
            txns = list(self._pending.values())
        now = self.clock()
        for txn in txns:
            if self._stop.is_set():
                return
            if judge(txn, now, self.timeout_s, self._lookup, self.archive.instance_safety):
                with self._lock:
                    if self._pending.get(txn.uid) is txn:
                        del self._pending[txn.uid]
                self._reports.submit(self._deliver, txn)

    def _lookup(self, sop_instance_uid: str) -> tuple[str, str] | None:
        catalog = self.archive.store.catalog
        versions = catalog.versions_of(sop_instance_uid)
        got = catalog.get(versions[-1]) if versions else None
        if got is None:
            return None
        return got[1].study_instance_uid, got[1].sop_class_uid

    # -- delivery ------------------------------------------------------------------

    def _deliver(self, txn: Transaction) -> None:
        event_type, info = event_report(txn)
        summary = (f"storage commitment {txn.uid} for {txn.calling_ae}: {len(txn.safe)} safe, "
                   f"{len(txn.failed)} failed")
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            if self._stop.is_set():
                return
            try:
                how = self._send(txn, event_type, info)
            except Exception as exc:
                how, error = "", str(exc)
            else:
                error = "" if how else "no route"
            if how:
                self.reported += 1
                LOGGER.info("%s; reported %s", summary, how)
                for ref, (code, why) in list(txn.failed.items())[:5]:
                    LOGGER.warning("  %s failed (0x%04X): %s", ref.sop_instance_uid, code, why)
                outcome = "failed" if not txn.safe else "partial" if txn.failed else "ok"
                self._audit_report(txn, outcome, f"reported {how}")
                return
            if error == "no route":
                LOGGER.error("%s; cannot report it: its association is closed and %s is "
                             "not in [dicom.destinations]", summary, txn.calling_ae)
                self._audit_report(txn, "failed", "undeliverable: no route to the requester")
                return
            LOGGER.warning("%s; report attempt %d of %d failed: %s", summary, attempt,
                           REPORT_ATTEMPTS, error)
            if self._stop.wait(REPORT_RETRY_S):
                return
        LOGGER.error("%s; gave up reporting it after %d attempts", summary, REPORT_ATTEMPTS)
        self._audit_report(txn, "failed", f"undeliverable after {REPORT_ATTEMPTS} attempts")

    def _audit_report(self, txn: Transaction, outcome: str, how: str) -> None:
        if self.trail is None:
            return
        self.trail.log.record(Event(
            time=time.time(), who=txn.who, role=ROLE, address=txn.address,
            action="N-EVENT-REPORT", outcome=outcome, instances=len(txn.safe),
            detail=f"storage commitment {txn.uid}: {len(txn.safe)} safe, "
                   f"{len(txn.failed)} failed; {how}"), wait=False)

    def _send(self, txn: Transaction, event_type: int, info: Dataset) -> str:
        """How the report went out ('' = no way to send it); raises on failure."""
        address = self.destinations.get(txn.calling_ae)
        if address is not None:
            self._send_new_association(txn.calling_ae, address, event_type, info)
            return f"on a new association to {address}"
        if txn.assoc is not None and txn.assoc.is_established:
            with self._same_assoc_lock:
                status, _ = txn.assoc.send_n_event_report(
                    info, event_type, STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE_UID)
            _check(status)
            return "on the requester's association"
        return ""

    def _send_new_association(self, ae_title: str, address: str, event_type: int,
                              info: Dataset) -> None:
        host, _, port = address.rpartition(":")
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = REPORT_TIMEOUT_S
        # we act as the SCP of the SOP class on an association we request (PS3.4 J.3.3)
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate(host, int(port), contexts=[build_context(
            STORAGE_COMMITMENT_PUSH)], ae_title=ae_title, ext_neg=[role])
        if not assoc.is_established:
            raise ConnectionError(f"association to {ae_title} at {address} was not "
                                  "established")
        try:
            status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH,
                                                  WELL_KNOWN_INSTANCE_UID)
            _check(status)
        finally:
            if assoc.is_established:
                assoc.release()


def _check(status: Dataset) -> None:
    code = status.get("Status") if status is not None else None
    if code is None:
        raise ConnectionError("no answer to the N-EVENT-REPORT")
    if code != STATUS_SUCCESS:
        raise ConnectionError(f"the requester answered the N-EVENT-REPORT with 0x{code:04X}")
