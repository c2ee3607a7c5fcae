"""C-GET and C-MOVE: send the selected instances as stored (or converted losslessly
to a syntax the peer accepted), one association for all of them, reading ahead
while the current one is on the wire.

Sending as stored: pynetdicom re-encodes any Dataset a handler yields, which
would change bytes (and re-deflate deflated data). It sends a dataset untouched
only from a Part 10 file (`send_c_store(path)` with STORE_SEND_CHUNKED_DATASET,
set by server.py). So the handlers yield `StoredInstance` placeholders, and a
`StoredSender` installed on the association that carries the C-STOREs swaps each
for the path of its spooled file (archive.spool: verified chunks, from peers when
this node lacks them). An instance goes out in its stored transfer syntax when
the peer accepted that syntax for its SOP class; otherwise convert.py converts a
copy in memory to one the peer accepted, losslessly (between the uncompressed
syntaxes, or by decoding lossless JPEG / JPEG-LS / JPEG 2000 / RLE), and that copy
is sent from a file of its own. One that cannot be sent losslessly (lossy data,
or a peer that accepted only compressed syntaxes) is a failed sub-operation with
the reason in the log, Error Comment and audit detail; never a lossy copy.

A C-MOVE store association proposes, per SOP class, each stored syntax plus
Explicit and Implicit VR Little Endian, each in a context of its own.

Status of a sub-operation that cannot be read anywhere, or whose conversion
fails: 0x0110 (processing failure); that has no usable context: 0x0122 (SOP class
not supported). The final response reports them among the failed instances.

Audit: one event per study retrieved (instances sent of those selected, and the
destination of a C-MOVE), durable before the final response; one for a refused
request.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, evt

from pacsmesh.node.dicom.archive import Archive, Spooled, spool, spool_bytes
from pacsmesh.node.dicom.convert import (
    CONVERT_BYTES_MAX,
    EXPLICIT_LE,
    IMPLICIT_LE,
    ConversionError,
    choose,
    convert,
    name,
)
from pacsmesh.node.dicom.query import QueryError, select_instances
from pacsmesh.node.dicom.status import CANCEL, PENDING, status
from pacsmesh.node.dicom.trail import Trail
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)

READ_AHEAD = 4  # instances read while one is sent: hides peer round trips, bounds memory
SEND_QUEUE_MAX = 16  # PDUs queued for pynetdicom's sender thread; past it the sender waits
SEND_QUEUE_WAIT_S = 0.0005
READ_THREADS = 2  # chunk reads verify hashes (release the GIL) or wait on peers
READ_TIMEOUT_S = 300.0  # one instance, read from wherever it is (a huge one from a peer)
CONTEXTS_MAX = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)

STATUS_PROCESSING_FAILURE = 0x0110
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_IDENTIFIER_MISMATCH = 0xA900
STATUS_TOO_MANY_MATCHES = 0xA701  # out of resources: unable to calculate number of matches


class StoredInstance(Dataset):
    """A placeholder for one stored instance: its bytes are read ahead into `future`.
    A Dataset because pynetdicom insists on one (and reads its SOP Instance UID for
    the failed-instances list)."""

    def __init__(self, m: node_pb2.Manifest, future: Future[Spooled], tmp_dir: Path) -> None:
        super().__init__()
        self.SOPClassUID = m.sop_class_uid
        self.SOPInstanceUID = m.sop_instance_uid
        self._manifest = m
        self._future = future
        self._tmp_dir = tmp_dir
        self._used = False
        self.sent = False  # the peer took it (success or warning status)
        self.failure = ""  # why it was not sent, when we know

    @property
    def study_uid(self) -> str:
        return self._manifest.study_instance_uid

    def send(self, original: Any, accepted: list[str], *args: Any, **kwargs: Any) -> Dataset:
        """Send through pynetdicom's own `send_c_store` from the spooled file, or from
        a converted copy when the peer did not accept the stored syntax (`accepted`:
        the syntaxes it accepted for this SOP class, for us as the sender)."""
        self._used = True
        m = self._manifest
        stored = m.transfer_syntax_uid
        try:
            target = choose(stored, accepted)
        except ConversionError as exc:
            return self._fail(STATUS_SOP_CLASS_NOT_SUPPORTED, str(exc))
        try:
            spooled = self._future.result(timeout=READ_TIMEOUT_S)
        except Exception as exc:
            LOGGER.error("instance %s cannot be read on this node or any reachable peer: %s",
                         m.sop_instance_uid, exc, extra={"study": m.study_instance_uid,
                                                         "instance": m.sop_instance_uid})
            return status(STATUS_PROCESSING_FAILURE, f"cannot be read: {exc}")
        if target != stored and m.size > CONVERT_BYTES_MAX:
            spooled.close()
            return self._fail(STATUS_PROCESSING_FAILURE, (
                f"{m.size >> 20} MB stored in {name(stored)} is too large to convert in "
                f"memory (at most {CONVERT_BYTES_MAX >> 20} MB); ask for {name(stored)}"))
        if target != stored:  # convert a copy; the stored bytes stay as they are
            try:
                with open(spooled.path, "rb") as f:
                    data = f.read()
            finally:
                spooled.close()
            try:
                data = convert(data, target)
            except ConversionError as exc:
                return self._fail(STATUS_PROCESSING_FAILURE, str(exc))
            spooled = spool_bytes(data, m.sop_instance_uid, self._tmp_dir)
            del data
            LOGGER.debug("instance %s converted from %s to %s for sending",
                         m.sop_instance_uid, name(stored), name(target))
        try:
            answer: Dataset = original(spooled.path, *args, **kwargs)
            code = int(answer.get("Status", -1)) if answer is not None else -1
            self.sent = code == 0 or 0xB000 <= code <= 0xBFFF
            return answer
        except ValueError as exc:  # the peer accepted no context for this class and syntax
            LOGGER.warning("instance %s not sent: the peer accepted no presentation context "
                           "for SOP class %s in transfer syntax %s (it is sent only as "
                           "stored): %s", m.sop_instance_uid, m.sop_class_uid,
                           m.transfer_syntax_uid, exc)
            return status(STATUS_SOP_CLASS_NOT_SUPPORTED, "no context for its stored syntax")
        finally:
            spooled.close()

    def _fail(self, code: int, why: str) -> Dataset:
        m = self._manifest
        self.failure = why
        LOGGER.warning("instance %s (%s) not sent: %s", m.sop_instance_uid,
                       name(m.transfer_syntax_uid), why,
                       extra={"study": m.study_instance_uid, "instance": m.sop_instance_uid})
        return status(code, why)

    def discard(self) -> None:
        """Never sent (the association went away): free what was read for it."""
        if not self._used:
            self._used = True
            self._future.add_done_callback(_close_result)


def _close_result(future: Future[Spooled]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class StoredSender:
    """Replaces one association's `send_c_store`: StoredInstance placeholders go out
    as their stored files (or converted copies), anything else as pynetdicom would
    send it."""

    def __init__(self, assoc: Any, original: Any) -> None:
        self.assoc, self.original = assoc, original

    def __call__(self, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, StoredInstance):
            return dataset.send(self.original, accepted_syntaxes(
                self.assoc, str(dataset.SOPClassUID)), *args, **kwargs)
        answer: Dataset = self.original(dataset, *args, **kwargs)
        return answer


def accepted_syntaxes(assoc: Any, sop_class: str) -> list[str]:
    """The transfer syntaxes the peer accepted for `sop_class` with us as the C-STORE
    SCU (a C-GET requester must have taken the SCP role), in context order."""
    return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.as_scu]


def install_sender(assoc: Any) -> None:
    if not isinstance(assoc.send_c_store, StoredSender):
        assoc.send_c_store = StoredSender(assoc, assoc.send_c_store)
        _bound_send_queue(assoc)


def _bound_send_queue(assoc: Any) -> None:
    """pynetdicom reads a file being sent one PDU at a time, but queues every PDU for
    its DUL thread without limit: a 2 GB instance sent to a peer that takes 16 KB
    PDUs sat in memory whole. Hold the sender back while SEND_QUEUE_MAX are queued."""
    dul = assoc.dul
    original = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        queued = dul.to_provider_queue
        while queued.qsize() >= SEND_QUEUE_MAX and dul.is_alive() and not assoc.is_aborted:
            time.sleep(SEND_QUEUE_WAIT_S)
        original(primitive)

    dul.send_pdu = send_pdu


class ReadAhead:
    """Placeholders for `manifests` in order, each read (verified, maybe from a peer)
    up to READ_AHEAD instances before pynetdicom asks for it."""

    def __init__(self, archive: Archive, manifests: list[node_pb2.Manifest],
                 tmp_dir: Path) -> None:
        self.archive, self.tmp_dir = archive, tmp_dir
        self._todo = collections.deque(manifests)
        self._ready: collections.deque[StoredInstance] = collections.deque()
        self._given: list[StoredInstance] = []
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="dicom-read")

    def _fill(self) -> None:
        while self._todo and len(self._ready) < READ_AHEAD:
            m = self._todo.popleft()
            self._ready.append(StoredInstance(
                m, self._pool.submit(spool, self.archive, m, self.tmp_dir), self.tmp_dir))

    def __iter__(self) -> Iterator[StoredInstance]:
        self._fill()
        while self._ready:
            item = self._ready.popleft()
            self._fill()
            for old in self._given:  # pynetdicom asks for the next only after sending
                old.discard()
            self._given = [item]
            yield item

    def close(self) -> None:
        for item in [*self._given, *self._ready]:
            item.discard()
        self._ready.clear()
        self._todo.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def contexts_for(manifests: list[node_pb2.Manifest]) -> list[Any]:
    """For each SOP class: one presentation context per stored transfer syntax, plus
    Implicit and Explicit VR Little Endian, each syntax in a context of its own so
    the peer may accept each on its own. Past the 128 contexts one association may
    carry, Implicit VR LE (which every peer takes, and every lossless instance can
    be converted to) comes first, then the stored syntaxes, then Explicit VR LE."""
    classes = list(dict.fromkeys(m.sop_class_uid for m in manifests))
    pairs = dict.fromkeys([
        *((cls, IMPLICIT_LE) for cls in classes),
        *((m.sop_class_uid, m.transfer_syntax_uid) for m in manifests),
        *((cls, EXPLICIT_LE) for cls in classes)])
    if len(pairs) > CONTEXTS_MAX:
        LOGGER.warning("%d SOP class/transfer syntax pairs; only %d fit one association, "
                       "instances that need the rest may fail", len(pairs), CONTEXTS_MAX)
    return [build_context(cls, [ts]) for cls, ts in list(pairs)[:CONTEXTS_MAX]]


class RetrieveScp:
    def __init__(self, archive: Archive, destinations: dict[str, str], tmp_dir: Path,
                 trail: Trail) -> None:
        self.archive, self.destinations, self.tmp_dir = archive, destinations, tmp_dir
        self.trail = trail

    def _audit(self, event: Any, action: str, outcome: str, study_uid: str = "",
               instances: int = 0, detail: str = "") -> None:
        try:
            self.trail.record(event.assoc, action, outcome, study_uid, instances, detail)
        except OSError as exc:  # the retrieve itself is done; say so loudly
            LOGGER.error("%s audit event cannot be written: %s", action, exc)

    def _audit_studies(self, event: Any, action: str, manifests: list[node_pb2.Manifest],
                       given: list[StoredInstance], where: str, cancelled: bool) -> None:
        """One event per study: how many of its selected instances the peer took."""
        counts: dict[str, list[int]] = {}  # study -> [selected, sent]
        failures: dict[str, dict[str, int]] = {}  # study -> why not sent -> instances
        for m in manifests:
            counts.setdefault(m.study_instance_uid, [0, 0])[0] += 1
        for item in given:
            counts[item.study_uid][1] += item.sent
            if item.failure:
                why = failures.setdefault(item.study_uid, {})
                why[item.failure] = why.get(item.failure, 0) + 1
        if not counts:
            self._audit(event, action, "ok", detail=f"{where}nothing matched")
        for study, (selected, sent) in counts.items():
            outcome = "ok" if sent == selected else "partial" if sent else "failed"
            note = "; cancelled" if cancelled else ""
            note += "".join(f"; {n} not sent: {why}"
                            for why, n in failures.get(study, {}).items())
            self._audit(event, action, outcome, study, sent,
                        f"{where}{sent} of {selected} instances sent{note}")

    def _select(self, event: Any) -> tuple[list[node_pb2.Manifest], Dataset | None]:
        """(instances, None), or ([], the failure status to answer with)."""
        try:
            return select_instances(self.archive.store.catalog, event.identifier), None
        except QueryError as exc:
            code = (STATUS_TOO_MANY_MATCHES if "more than" in str(exc)
                    else STATUS_IDENTIFIER_MISMATCH)
            LOGGER.warning("retrieve from %s refused: %s", event.assoc.requestor.ae_title, exc)
            return [], status(code, str(exc))
        except Exception as exc:  # an undecodable identifier: pynetdicom raises on access
            # the type only: a decoder's message may quote the value (a name, an ID)
            LOGGER.warning("retrieve from %s: bad identifier (%s)",
                           event.assoc.requestor.ae_title, type(exc).__name__)
            return [], status(STATUS_IDENTIFIER_MISMATCH, f"bad identifier: {exc}")

    def _suboperations(self, event: Any, manifests: list[node_pb2.Manifest], action: str,
                       where: str = "") -> Iterator[tuple[int, Dataset | None]]:
        """Yields the sub-operations; records the outcome per study once pynetdicom asks
        for the next after the last (before the final response), or on abort."""
        reads = ReadAhead(self.archive, manifests, self.tmp_dir)
        given: list[StoredInstance] = []
        cancelled = False
        try:
            for item in reads:
                if event.is_cancelled:
                    cancelled = True
                    break
                given.append(item)
                yield PENDING, item
        finally:
            reads.close()
            self._audit_studies(event, action, manifests, given, where, cancelled)
        if cancelled:
            yield CANCEL, None

    def handle_get(self, event: Any) -> Iterator[Any]:
        """EVT_C_GET: sub-operations go back over the requester's own association."""
        manifests, failure = self._select(event)
        if failure is not None:
            self._audit(event, "C-GET", "refused", detail=str(failure.get("ErrorComment", "")))
            yield 1
            yield failure, None
            return
        LOGGER.info("C-GET from %s: %d instances", event.assoc.requestor.ae_title,
                    len(manifests))
        if not manifests:  # pynetdicom answers at once, asking for nothing more
            self._audit_studies(event, "C-GET", [], [], "", False)
            yield 0
            return
        yield len(manifests)
        install_sender(event.assoc)
        yield from self._suboperations(event, manifests, "C-GET")

    def handle_move(self, event: Any) -> Iterator[Any]:
        """EVT_C_MOVE: sub-operations go over a new association to a configured AE."""
        destination = _text(event.move_destination)
        address = self.destinations.get(destination)
        calling = event.assoc.requestor.ae_title
        if address is None:
            LOGGER.warning("C-MOVE from %s to unknown destination %r: not in "
                           "[dicom.destinations]", calling, destination)
            self._audit(event, "C-MOVE", "refused",
                        detail=f"unknown destination {destination!r}")
            yield None, None  # pynetdicom answers 0xA801: move destination unknown
            return
        host, _, port = address.rpartition(":")
        manifests, failure = self._select(event)
        kwargs = {"contexts": contexts_for(manifests) or [build_context("1.2.840.10008.1.1")],
                  "evt_handlers": [(evt.EVT_ESTABLISHED, _on_store_association)]}
        yield host, int(port), kwargs
        where = f"to {destination} at {address}: "
        if failure is not None:
            self._audit(event, "C-MOVE", "refused",
                        detail=f"{where}{failure.get('ErrorComment', '')}")
            yield 1
            yield failure, None
            return
        LOGGER.info("C-MOVE from %s: %d instances to %s at %s", calling, len(manifests),
                    destination, address)
        if not manifests:  # pynetdicom answers at once, asking for nothing more
            self._audit_studies(event, "C-MOVE", [], [], where, False)
            yield 0
            return
        try:
            yield len(manifests)  # pynetdicom associates with the destination next
        except GeneratorExit:  # it dropped the request: no association to the destination
            self._audit(event, "C-MOVE", "failed", detail=f"{where}nothing sent: "
                        "the destination did not accept an association")
            raise
        yield from self._suboperations(event, manifests, "C-MOVE", where)


def _on_store_association(event: Any) -> None:
    """The C-MOVE store association is up: make it send as stored."""
    install_sender(event.assoc)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return str(value or "").strip()
