"""Storage Commitment verdicts: which referenced instances are safe, which failed and
why, and the N-EVENT-REPORT that says so. Free of IO: the catalog and the safety
judge come in as functions, time as a number.

A transaction's deadline is absolute wall-clock time (unix seconds), so the
timeout counts from the original request even across restarts of the node.
Verdicts are not persisted: after a restart they are judged again from the
catalog, which only ever learns more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsmesh.node.dicom.commit_request import Reference

EVENT_ALL_SUCCESS = 1
EVENT_FAILURES = 2
# Failure Reason (0008,1197) codes, PS3.3 C.14.1.1
FAILURE_PROCESSING = 0x0110
FAILURE_NO_SUCH_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "PACSMESH"
PRIVATE_REASON = 0x10  # element offset in the block: (0009,1010)
NOT_RECEIVED = "not received by the archive"

# (calling AE title, transaction UID): a transaction UID is only trusted within the
# AE that sent it, so one requester cannot replace another's transaction
TxnKey = tuple[str, str]


@dataclass
class Transaction:
    """One accepted N-ACTION: what was asked, by whom, and the verdicts so far (per
    reference: the same instance named under two SOP classes gets two verdicts)."""

    uid: str
    calling_ae: str
    refs: list[Reference]
    received_at: float  # unix seconds
    deadline: float  # unix seconds
    who: str = ""  # as the audit trail names the requester (AE title, certificate)
    address: str = ""  # the requester's ip:port, for the audit trail
    serial: str = ""  # tells this acceptance from a later retry under the same key
    safe: set[Reference] = field(default_factory=set)
    failed: dict[Reference, tuple[int, str]] = field(default_factory=dict)  # (code, why)
    waiting_for: dict[Reference, str] = field(default_factory=dict)  # why not safe yet
    attempts: int = 0  # report deliveries tried (in this run of the node)

    @property
    def key(self) -> TxnKey:
        return self.calling_ae, self.uid

    def undecided(self) -> list[Reference]:
        return [r for r in self.refs if r not in self.safe and r not in self.failed]


# What is known of a stored instance: (study uid, stored SOP class uid), or None.
InstanceLookup = Callable[[str], tuple[str, str] | None]
# Safety of an instance, judged on its whole study: (safe, why not).
SafetyLookup = Callable[[str], tuple[bool, str]]


def judge(txn: Transaction, now: float, lookup: InstanceLookup,
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
    timeout_s = txn.deadline - txn.received_at
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


def summary(txn: Transaction) -> str:
    return (f"storage commitment {txn.uid} for {txn.calling_ae}: {len(txn.safe)} safe, "
            f"{len(txn.failed)} failed")


def _item(r: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = r.sop_class_uid
    item.ReferencedSOPInstanceUID = r.sop_instance_uid
    return item
