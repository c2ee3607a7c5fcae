"""Storage Commitment that survives restarts: accepted transactions are durable before
the N-ACTION is answered and are answered after a SIGKILL; limits refuse what cannot
be taken without touching what was. The pure parts (request reading, the outbox, the
ledger) run without processes; the rest against real nodes and a pynetdicom requester.
Every wait is bounded."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lmdb
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode

from pacsmesh.node.audit import AuditLog
from pacsmesh.node.dicom.commit_delivery import no_delay
from pacsmesh.node.dicom.commit_ledger import DB_NAME, Ledger, encode_key
from pacsmesh.node.dicom.commit_outbox import (
    DESTINATION,
    REPORT_KEEP_S,
    REPORTS_PER_ASSOCIATION_MAX,
    RETRY_MAX_S,
    Outbox,
    Route,
    retry_delay_s,
)
from pacsmesh.node.dicom.commit_request import (
    REFERENCES_PER_REQUEST_MAX,
    REQUEST_BYTES_MAX,
    STATUS_INVALID_ARGUMENT,
    STATUS_NO_SUCH_ACTION,
    STATUS_RESOURCE_LIMITATION,
    Reference,
    Refused,
    read_request,
)
from pacsmesh.node.dicom.commit_verdict import Transaction
from pacsmesh.node.dicom.commitment import Commitment
from pacsmesh.node.dicom.trail import Trail
from pacsmesh.sample import StudySpec, write_study
from tests.conftest import require_tool
from tests.dicomproc import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentScu,
    dicom_node,
    private_reason,
    tool,
)
from tests.nodeproc import NodeProc, free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UID_ROOT = "1.2.826.0.1.3680043.10.1455.77"
SCU = "COMMITSCU"
SENDERS = 4  # associations sending requests at once


# ---- encoding requests ---------------------------------------------------------------------


def _element(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def request_bytes(transaction_uid: str, sops: list[str], sop_class: str = CT) -> bytes:
    """Action Information, implicit VR LE, encoded by hand: pydicom takes seconds to
    build and encode 50,000 sequence items, this takes a tenth of that."""
    items = []
    for sop in sops:
        body = _element(0x00081150, sop_class.encode()) + _element(0x00081155, sop.encode())
        items.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body)
    seq = b"".join(items)
    return (_element(0x00081195, transaction_uid.encode())
            + struct.pack("<HHI", 0x0008, 0x1199, len(seq)) + seq)


def as_dataset(raw: bytes) -> Dataset:
    """A lazily decoded dataset: pynetdicom re-encodes its raw elements as they are."""
    return decode(io.BytesIO(raw), True, True)


def send_actions(port: int, aet: str, infos: list[Dataset], action_type: int = 1,
                 syntax: str = IMPLICIT_LE) -> list[Dataset]:
    """N-ACTIONs over one association; their status datasets."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(STORAGE_COMMITMENT, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSMESH",
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: no_delay(e.assoc))])
    assert assoc.is_established
    try:
        statuses = []
        for info in infos:
            status, _ = assoc.send_n_action(info, action_type, STORAGE_COMMITMENT,
                                            STORAGE_COMMITMENT_INSTANCE)
            statuses.append(status)
        return statuses
    finally:
        assoc.release()


def sops(prefix: str, count: int) -> list[str]:
    return [f"{UID_ROOT}.{prefix}.{i + 1}" for i in range(count)]


def records(node: NodeProc) -> list[bytes]:
    """Keys of the commitment records in a stopped node's index."""
    env = lmdb.open(str(node.data_dir / "index"), readonly=True, lock=False, max_dbs=64,
                    subdir=True)
    try:
        db = env.open_db(DB_NAME, create=False)
        with env.begin(db=db) as txn:
            return [bytes(k) for k, _ in txn.cursor()]
    finally:
        env.close()


def audit_events(node: NodeProc) -> list[dict[str, Any]]:
    import json

    out = []
    for path in sorted((node.data_dir / "audit").glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


# ---- pure: what a request may ask -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # too long UIDs, on purpose
@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_requests_that_cannot_be_taken_are_refused_with_the_reason() -> None:
    ok = read_request(1, request_bytes("1.2.3", ["1.1", "1.1", "1.2"]), True, True, False)
    assert ok.transaction_uid == "1.2.3"
    assert ok.references == [Reference(CT, "1.1"), Reference(CT, "1.2")]  # duplicates once

    def refused(raw: bytes, action_type: int = 1, deflated: bool = False) -> Refused:
        with pytest.raises(Refused) as caught:
            read_request(action_type, raw, True, True, deflated)
        return caught.value

    assert refused(b"", action_type=2).status == STATUS_NO_SUCH_ACTION
    assert "no Action Information" in str(refused(b""))
    assert "Transaction UID" in str(refused(request_bytes("", ["1.1"])))
    assert "is empty" in str(refused(request_bytes("1.2.3", [])))
    assert "longer than 64" in str(refused(request_bytes("1." * 40, ["1.1"])))
    assert "longer than 64" in str(refused(request_bytes("1.2.3", ["1." * 40])))
    assert "no SOP Instance UID" in str(refused(request_bytes("1.2.3", [""])))
    garbage = _element(0x00081195, b"1.2.3") + struct.pack("<HHI", 0x0008, 0x1199, 64) + (
        b"\xff" * 64)
    assert refused(garbage).status == STATUS_INVALID_ARGUMENT
    assert refused(b"\x00" * 7).status == STATUS_INVALID_ARGUMENT  # cut short
    too_big = refused(b"\x00" * (REQUEST_BYTES_MAX + 1))
    assert too_big.status == STATUS_RESOURCE_LIMITATION and "split it" in str(too_big)
    assert len(str(too_big)) <= 64  # all of it fits the Error Comment
    # 64 MB of zeros deflates to 64 KB: inflated only as far as the limit
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(b"\x00" * (64 << 20)) + deflater.flush()
    assert len(bomb) < REQUEST_BYTES_MAX
    assert "inflated" in str(refused(bomb, deflated=True))
    assert "does not inflate" in str(refused(b"\xff" * 100, deflated=True))


# ---- pure: the outbox ---------------------------------------------------------------------


def _txn(uid: str, deadline: float = 100.0, refs: int = 1) -> Transaction:
    return Transaction(uid, SCU, [Reference(CT, f"{uid}.{i}") for i in range(refs)], 0.0,
                       deadline, serial=os.urandom(8).hex())


def test_outbox_sends_in_batches_backs_off_per_destination_and_gives_up() -> None:
    box = Outbox(keep_s=1000.0)
    route = Route(DESTINATION, SCU)
    count = 20 * REPORTS_PER_ASSOCIATION_MAX + 7
    for i in range(count):
        box.add(route, _txn(f"9.{i}"))
    assert box.references == count
    (got,) = box.due(0.0)
    assert got[0] == route and len(got[1]) == REPORTS_PER_ASSOCIATION_MAX
    assert box.due(0.0) == [] and box.take(route, 0.0) == []  # one attempt at a time
    sent = 0
    batch = got[1]
    while batch:  # batch after batch on success, oldest first
        assert batch[0].uid == f"9.{sent}"
        assert box.settle(route, batch, "", 1.0) == 0.0
        sent += len(batch)
        batch = box.take(route, 1.0)
    assert sent == count and len(box) == 0 and box.references == 0

    box.add(route, _txn("8.1"))
    delays: list[float] = []
    for attempt in range(12):  # an unreachable requester: 5 s, doubling, at most 10 min
        now = 10.0 * attempt + sum(delays)
        ((_, batch),) = box.due(now)
        assert box.due(now) == []
        delays.append(box.settle(route, [], "connection refused", now))
        assert box.due(now + delays[-1] - 0.01) == []
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0] and delays[-1] == RETRY_MAX_S
    assert retry_delay_s(10_000) == RETRY_MAX_S
    assert box.expired(1099.0) == [] and [t.uid for t in box.expired(1100.0)] == ["8.1"]

    other = Route(DESTINATION, "OTHER")
    box.add(other, _txn("7.1"))  # a retry replaces, and an attempt under way is not undone
    ((_, (first,)),) = box.due(0.0)
    retry = _txn("7.1")
    box.add(other, retry)
    box.settle(other, [first], "", 1.0)
    assert box.get(retry.key) is retry and box.references == 1  # what the limit counts
    assert box.take(other, 1.0) == [retry]


# ---- the ledger, on a real LMDB environment ---------------------------------------------


def test_ledger_keeps_thousands_and_a_huge_transaction_across_reopening(tmp_path: Path) -> None:
    def env() -> Any:
        return lmdb.open(str(tmp_path / "index"), map_size=1 << 30, max_dbs=8, sync=True)

    first = env()
    ledger = Ledger(first)
    small = [_txn(f"5.{i}", deadline=float(i)) for i in range(2000)]
    huge = _txn("5.huge", refs=REFERENCES_PER_REQUEST_MAX)
    for txn in [*small, huge]:
        ledger.put(txn)
    replaced = _txn("5.0")
    ledger.put(replaced)  # a retry of 5.0
    assert ledger.delete([small[0], small[1]]) == 1  # 5.0 now belongs to the retry
    with first.begin(write=True, db=ledger.db) as t:
        t.put(encode_key(("CT1", "6.6")), b"0011\n{not json")
    first.close()

    again = Ledger(env())
    txns, bad = again.load()
    assert [b.key for b in bad] == [encode_key(("CT1", "6.6"))]
    by_uid = {t.uid: t for t in txns}
    assert len(by_uid) == 2000 and "5.1" not in by_uid
    assert by_uid["5.0"].serial == replaced.serial
    assert by_uid["5.huge"].refs == huge.refs
    assert by_uid["5.7"].deadline == 7.0 and by_uid["5.7"].calling_ae == SCU
    again.drop([b.key for b in bad])
    again.close()
    with pytest.raises(Exception, match="stopping"):
        again.put(_txn("5.late"))


# ---- the service in one process: the limit on what waits in memory ------------------------


def _event(raw: bytes, calling: str = "CT1") -> Any:
    requestor = SimpleNamespace(ae_title=calling, address="127.0.0.1", port=104)
    return SimpleNamespace(
        assoc=SimpleNamespace(requestor=requestor, is_established=False), action_type=1,
        request=SimpleNamespace(ActionInformation=io.BytesIO(raw)),
        context=SimpleNamespace(transfer_syntax=UID(IMPLICIT_LE)))


def test_pending_limit_refuses_new_requests_and_keeps_accepted_ones(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "index"), map_size=1 << 30, max_dbs=8, sync=True)
    ledger = Ledger(env)
    limit = 1000
    service = Commitment(SimpleNamespace(), "PACSMESH", {}, 60.0, ledger=ledger,
                         references_max=limit)
    statuses = []
    for i in range(30):  # 3,000 references asked, 10 times the limit
        status, _ = service.handle_n_action(_event(request_bytes(f"4.{i}", sops(f"4.{i}", 100))))
        statuses.append(status)
    assert [int(s.Status) for s in statuses] == [0] * 10 + [STATUS_RESOURCE_LIMITATION] * 20
    assert "1000 instances await commitment, at most 1000" in str(statuses[-1].ErrorComment)
    # a retry of an accepted transaction replaces it, so its own references do not count
    status, _ = service.handle_n_action(_event(request_bytes("4.0", sops("4.99", 100))))
    assert int(status.Status) == 0
    txns, _ = ledger.load()
    assert sorted(t.uid for t in txns) == sorted(f"4.{i}" for i in range(10))
    assert next(t for t in txns if t.uid == "4.0").refs[0].sop_instance_uid.endswith("4.99.1")
    service.stop()
    env.close()


def test_a_retry_that_cannot_be_audited_keeps_the_transaction_it_would_replace(
        tmp_path: Path) -> None:
    """A repeated Transaction UID replaces the accepted one only once the retry is
    audited; refused for a failed audit write, the first acceptance stands."""
    env = lmdb.open(str(tmp_path / "index"), map_size=1 << 30, max_dbs=8, sync=True)
    ledger = Ledger(env)
    trail = SimpleNamespace(who=lambda assoc: "AE:X", record=lambda *a, **k: None)
    service = Commitment(SimpleNamespace(), "PACSMESH", {}, 60.0, ledger=ledger,
                         trail=trail)  # type: ignore[arg-type]
    status, _ = service.handle_n_action(_event(request_bytes("5.1", sops("5.1", 3))))
    assert int(status.Status) == 0

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    trail.record = full_disk
    status, _ = service.handle_n_action(_event(request_bytes("5.1", sops("5.9", 7))))
    assert int(status.Status) != 0 and "audit" in str(status.ErrorComment)
    txns, _ = ledger.load()
    assert [(t.uid, len(t.refs)) for t in txns] == [("5.1", 3)]
    assert [len(t.refs) for t in service._pending.values()] == [3]
    service.stop()
    env.close()


def _not_stored() -> Any:
    """An archive that holds nothing: every reference fails at its deadline."""
    catalog = SimpleNamespace(versions_of=lambda sop: [], get=lambda manifest_id: None)
    return SimpleNamespace(store=SimpleNamespace(catalog=catalog),
                           instance_safety=lambda sop: (False, "not stored"))


def test_unreachable_requesters_are_retried_with_backoff_then_given_up(tmp_path: Path) -> None:
    """Real deliveries to a port nobody listens on, on a clock the test moves: the
    delay is audited once, attempts back off, a requester that comes back gets its
    report, and one that never does is given up a day after the deadline."""
    env = lmdb.open(str(tmp_path / "index"), map_size=1 << 30, max_dbs=8, sync=True)
    log = AuditLog(tmp_path)
    back_port, gone_port = free_port(), free_port()
    now = [1000.0]
    service = Commitment(_not_stored(), "PACSMESH", {
        SCU: f"127.0.0.1:{back_port}", "GONE": f"127.0.0.1:{gone_port}"}, 10.0,
        clock=lambda: now[0], trail=Trail(log), ledger=Ledger(env))
    for calling, uid in ((SCU, "3.3.1"), ("GONE", "3.3.2")):
        status, _ = service.handle_n_action(_event(request_bytes(uid, ["1.1"]), calling))
        assert int(status.Status) == 0

    def reports(uid: str, count: int) -> list[str]:
        """Its audited report events, once there are `count`, polling as the watcher
        thread would (an attempt under way settles before a later round acts)."""
        deadline = time.monotonic() + 30
        while True:
            got = [e.detail for e in log.read()[0]
                   if e.action == "N-EVENT-REPORT" and uid in e.detail]
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
            service.poll()

    now[0] = 1010.0  # the deadline: both decided, neither requester listening
    service.poll()
    assert "delayed: association to COMMITSCU" in reports("3.3.1", 1)[0]
    assert "delayed: association to GONE" in reports("3.3.2", 1)[0]
    with CommitmentScu(SCU, listen_port=back_port) as scu:
        now[0] = 1014.9  # within the 5 s after the first failure: not tried
        service.poll()
        time.sleep(0.5)
        assert scu.reports == []
        now[0] = 1015.0
        service.poll()
        got = scu.wait(30)
        assert str(got.info.TransactionUID) == "3.3.1" and got.event_type == 2
        assert reports("3.3.1", 2)[1].endswith("reported on a new association to "
                                               f"127.0.0.1:{back_port} after 2 attempts")
    now[0] = 1010.0 + REPORT_KEEP_S - 1
    service.poll()
    time.sleep(0.5)
    assert len(reports("3.3.2", 1)) == 1
    now[0] = 1010.0 + REPORT_KEEP_S
    assert "undeliverable: given up after" in reports("3.3.2", 2)[1]
    assert service.ledger.load() == ([], [])
    service.stop()
    log.close()
    env.close()


# ---- real nodes: a SIGKILL loses no accepted transaction ---------------------------------

TIMEOUT_S = 3.0


def commitment_node(tmp_path: Path, scu_port: int, **cluster: Any) -> tuple[NodeProc, int]:
    return dicom_node(tmp_path, destinations={SCU: f"127.0.0.1:{scu_port}"},
                      commitment_timeout_s=TIMEOUT_S, cluster=cluster or None)


def store(port: int, tmp_path: Path, instances: int) -> list[str]:
    """storescu a small study; its SOP Instance UIDs."""
    require_tool("storescu")
    files = write_study(tmp_path / "study", StudySpec(study_index=301, instances=instances,
                                                      rows=32, columns=32, seed=5))
    res = tool("storescu", "-aet", "STORESCU", "-aec", "PACSMESH", "127.0.0.1", str(port),
               *files)
    assert res.returncode == 0, res.stdout
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def test_report_after_sigkill_fails_unsafe_instances_at_the_original_deadline(
        tmp_path: Path) -> None:
    """A lone node can never hold 3 copies 250 miles apart. Both requests are taken,
    then the node is killed and stays down past the deadline: after the restart the
    destination's report comes at once (the timeout counts from the request, not the
    restart), and the report for a requester that is no destination waits for it to
    ask again, then comes on that association."""
    scu_port = free_port()
    node, port = commitment_node(tmp_path, scu_port)
    node.start()
    try:
        stored = store(port, tmp_path, 2)
        refs = [(CT, s) for s in stored] + [(CT, f"{UID_ROOT}.1.999")]
        asked_at = time.monotonic()
        assert CommitmentScu(SCU).request(port, refs, f"{UID_ROOT}.1.1") == 0
        assert CommitmentScu("MODALITY").request(port, refs[:1], f"{UID_ROOT}.1.2") == 0
        node.kill()  # nobody could have been told: the destination is not listening yet
        time.sleep(max(0.0, asked_at + TIMEOUT_S + 0.5 - time.monotonic()))
        with CommitmentScu(SCU, listen_port=scu_port) as scu:
            node.start()
            ready_at = time.monotonic()
            report = scu.wait(TIMEOUT_S + 10)
            assert time.monotonic() - ready_at < TIMEOUT_S - 1, "the timeout started over"
        assert report.how == "new association" and report.event_type == 2
        failed = {str(i.ReferencedSOPInstanceUID): i for i in report.info.FailedSOPSequence}
        assert set(failed) == {s for _, s in refs}
        for sop in stored:
            assert failed[sop].FailureReason == 0x0110
            assert private_reason(failed[sop]) == (
                f"not safe within {TIMEOUT_S:g} s: 1 of 3 safe copies so far")
        assert failed[f"{UID_ROOT}.1.999"].FailureReason == 0x0112

        # the requester not in [dicom.destinations] asks again: its kept report comes first
        modality = CommitmentScu("MODALITY")
        assert modality.request(port, refs[:1], f"{UID_ROOT}.1.3", keep_open_s=10) == 0
        kept = modality.wait(0)
        assert str(kept.info.TransactionUID) == f"{UID_ROOT}.1.2"
        assert kept.how == "same association" and kept.event_type == 2
    finally:
        node.stop()
    assert "wait for its next Storage Commitment request" in node.log_path.read_text()
    events = [e for e in audit_events(node) if e["action"] == "N-EVENT-REPORT"]
    by_uid = {uid: [e["detail"] for e in events if uid in e["detail"]]
              for uid in (f"{UID_ROOT}.1.1", f"{UID_ROOT}.1.2")}
    assert len(by_uid[f"{UID_ROOT}.1.1"]) == 1
    assert "3 failed; reported on a new association" in by_uid[f"{UID_ROOT}.1.1"][0]
    assert ["delayed: the requester is not" in d for d in by_uid[f"{UID_ROOT}.1.2"]] == [
        True, False]
    assert "reported on the requester's association" in by_uid[f"{UID_ROOT}.1.2"][1]
    # delivered reports are forgotten durably; the last request still waits
    assert records(node) == [encode_key(("MODALITY", f"{UID_ROOT}.1.3"))]


def test_report_after_sigkill_commits_safe_instances(tmp_path: Path) -> None:
    """With copies = 1 a lone node's own verified copy is safe: the cheapest safe study.
    Killed right after taking the request, it reports success after the restart."""
    scu_port = free_port()
    node, port = commitment_node(tmp_path, scu_port, copies=1)
    node.start()
    try:
        stored = store(port, tmp_path, 3)
        assert CommitmentScu(SCU).request(port, [(CT, s) for s in stored],
                                          f"{UID_ROOT}.2.1") == 0
        node.kill()
        with CommitmentScu(SCU, listen_port=scu_port) as scu:
            node.start()
            report = scu.wait(TIMEOUT_S + 10)
    finally:
        node.stop()
    assert report.event_type == 1 and "FailedSOPSequence" not in report.info
    assert {str(i.ReferencedSOPInstanceUID) for i in report.info.ReferencedSOPSequence} == set(
        stored)
    assert records(node) == []


def test_thousands_of_transactions_and_a_huge_one_survive_a_restart(tmp_path: Path) -> None:
    """1,000 transactions (10 associations' worth of reports) and one of 20,000
    references are accepted while the destination is down, the node is killed, and
    after the restart every one is answered, each once."""
    count = 10 * REPORTS_PER_ASSOCIATION_MAX
    huge_refs = 20_000
    scu_port = free_port()
    node, port = commitment_node(tmp_path, scu_port)
    node.start()
    try:
        started = time.monotonic()
        infos = [as_dataset(request_bytes(f"{UID_ROOT}.3.{i}", sops(f"3.{i}", 1)))
                 for i in range(count)]
        infos.append(as_dataset(request_bytes(f"{UID_ROOT}.3.1000000",
                                              sops("3.1000000", huge_refs))))
        with ThreadPoolExecutor(SENDERS) as pool:  # a round trip is mostly waiting
            parts = pool.map(lambda part: send_actions(port, SCU, part),
                             [infos[i::SENDERS] for i in range(SENDERS)])
            statuses = [s for part in parts for s in part]
        assert [int(s.Status) for s in statuses] == [0] * (count + 1)
        print(f"{count + 1} requests taken in {time.monotonic() - started:.1f} s")
        node.kill()
        with CommitmentScu(SCU, listen_port=scu_port) as scu:
            node.start()
            started = time.monotonic()
            got = scu.wait_for(count + 1, 120)
            print(f"{count + 1} reports in {time.monotonic() - started:.1f} s")
    finally:
        node.stop()
    assert set(got) == {f"{UID_ROOT}.3.{i}" for i in range(count)} | {f"{UID_ROOT}.3.1000000"}
    assert {r.event_type for r in got.values()} == {2}
    huge = got[f"{UID_ROOT}.3.1000000"].info.FailedSOPSequence
    assert len(huge) == huge_refs
    assert "not received" in private_reason(huge[-1])
    assert len(scu.reports) == count + 1  # each once
    assert records(node) == []
    log = node.log_path.read_text()
    assert (f"{count + 1} storage commitment transactions "
            f"({count + huge_refs} instances) reloaded") in log


def test_bad_and_huge_requests_are_refused_and_harm_nothing_pending(tmp_path: Path) -> None:
    """Each refusal says why, in the status and its Error Comment, and the audit trail;
    a transaction already taken is answered as taken, even when a refused request
    reused its Transaction UID."""
    scu_port = free_port()
    node, port = commitment_node(tmp_path, scu_port)
    kept = f"{UID_ROOT}.4.1"
    node.start()
    try:
        with CommitmentScu(SCU, listen_port=scu_port) as scu:
            assert scu.request(port, [(CT, f"{UID_ROOT}.4.1.1")], kept) == 0
            many = [f"1.{i}" for i in range(2 * REFERENCES_PER_REQUEST_MAX)]  # short UIDs
            garbage = (_element(0x00081195, kept.encode())
                       + struct.pack("<HHI", 0x0008, 0x1199, 64) + b"\xff" * 64)
            bad = {  # what is sent -> (status, words in its Error Comment)
                "too many": (request_bytes(kept, many, "1.2"), 0x0213, "at most 50000 per"),
                "too big": (request_bytes(kept, ["1.1"]) + _element(0x00420011, b"\x00" * (
                    2 * REQUEST_BYTES_MAX)), 0x0213, "bytes of Action Information, at"),
                "no uid": (request_bytes("", ["1.1"]), 0x0115, "Transaction UID"),
                "long uid": (request_bytes("1." * 40, ["1.1"]), 0x0115, "longer than 64"),
                "empty": (request_bytes(kept, []), 0x0115, "is empty"),
                "garbage": (garbage, 0x0115, "does not decode"),
            }
            statuses = send_actions(port, SCU, [as_dataset(raw) for raw, _, _ in bad.values()])
            for (what, (_, code, words)), status in zip(bad.items(), statuses, strict=True):
                assert int(status.Status) == code, what
                assert words in str(status.get("ErrorComment", "")), (what, status)
            (wrong_action,) = send_actions(port, SCU, [as_dataset(request_bytes(kept, ["1.1"]))],
                                           action_type=2)
            assert int(wrong_action.Status) == 0x0123
            # deflated: 64 MB of zeros travel as 64 KB, and are inflated only to the limit
            bomb = Dataset()
            bomb.TransactionUID = kept
            bomb.EncapsulatedDocument = b"\x00" * (64 << 20)
            (deflated,) = send_actions(port, SCU, [bomb], syntax=DEFLATED)
            assert int(deflated.Status) == 0x0213
            assert "Information inflated: split it" in str(deflated.ErrorComment)

            report = scu.wait(TIMEOUT_S + 10)
        assert str(report.info.TransactionUID) == kept and report.event_type == 2
        assert [str(i.ReferencedSOPInstanceUID) for i in report.info.FailedSOPSequence] == [
            f"{UID_ROOT}.4.1.1"]
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()
    assert "Traceback" not in node.log_path.read_text()
    refused = [e for e in audit_events(node) if e["action"] == "N-ACTION"
               and e["outcome"] == "refused"]
    assert len(refused) == len(bad) + 2
    assert all(e["who"] == f"AE:{SCU}" and ": " in e["detail"] for e in refused)
    assert records(node) == []
