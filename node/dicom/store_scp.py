"""C-STORE: an instance is stored exactly as received, and answered Success only
once it is durable on this node.

The Part 10 file written is the dataset bytes as they came off the wire (never
decoded and re-encoded, so compressed pixel data stays as the modality made it)
behind a file meta header naming the transfer syntax actually negotiated and the
sending AE. It then goes through `Archive.ingest_bytes`: the same structure, UID
and capacity checks as `pacsmesh put`, which returns once the group commit that
holds it is on disk.

Statuses (PS3.4 Annex B.2.3): 0x0000 stored or already held; 0xA700 out of
resources (storage or disk full, or the audit trail cannot be written); 0xA900
the dataset's SOP Instance or SOP Class UID is not the one the request names
(nothing is stored: the file would be filed under one UID and hold another);
0xC000 the dataset cannot be archived (malformed, bad UIDs); 0x0110 anything
else. Failures carry the reason in Error Comment.

Every C-STORE is one audit event (trail.py), durable before the status goes back.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode_file_meta

from pacsmesh.node.audit import AuditSlot
from pacsmesh.node.dicom.archive import Archive
from pacsmesh.node.dicom.fast_store import Received
from pacsmesh.node.dicom.status import SUCCESS, status
from pacsmesh.node.dicom.trail import Trail
from pacsmesh.node.dicom_layout import Layout
from pacsmesh.node.errors import Mismatch, PacsmeshError
from pacsmesh.node.telemetry import Telemetry
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)

STATUS_SUCCESS = SUCCESS
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
PREAMBLE = b"\x00" * 128 + b"DICM"
# Words in an ingest rejection that mean "no room", whatever layer said it.
FULL_WORDS = ("storage full", "disk full")


def status_for(result: node_pb2.IngestResult) -> tuple[int, str]:
    if result.outcome in (node_pb2.IngestResult.STORED, node_pb2.IngestResult.DUPLICATE):
        return STATUS_SUCCESS, ""
    reason = result.reason or "rejected"
    if any(word in reason for word in FULL_WORDS):
        return STATUS_OUT_OF_RESOURCES, reason
    if "store is closed" in reason:  # shutting down: not the sender's fault
        return STATUS_PROCESSING_FAILURE, "archive is shutting down; send again"
    return STATUS_CANNOT_UNDERSTAND, reason


def part10(event: Any) -> bytes:
    """The received dataset, untouched, behind a file meta header for it."""
    meta = event.file_meta  # SOP class/instance from the request, the context's syntax
    # the bytes are in the negotiated syntax: the meta must name that one, or the
    # file could not be read back
    assert meta.TransferSyntaxUID == event.context.transfer_syntax, meta.TransferSyntaxUID
    calling = event.assoc.requestor.ae_title
    if calling:
        meta.SourceApplicationEntityTitle = calling
    dataset: bytes = event.request.DataSet.getvalue()
    return b"".join((PREAMBLE, encode_file_meta(meta), dataset))


def mismatch(layout: Layout, sop_class_uid: str, sop_instance_uid: str) -> tuple[str, str]:
    """(which UID is not the request's or "", why in full)."""
    got_instance = layout.attrs.get("sop_instance_uid", "")
    if got_instance != sop_instance_uid:
        return "SOP Instance UID", (f"dataset SOP Instance UID {got_instance or '(none)'} "
                                    f"is not the request's {sop_instance_uid}")
    got_class = layout.attrs.get("sop_class_uid", "")
    if got_class and got_class != sop_class_uid:  # absent: `put` accepts that too
        return "SOP Class UID", (f"dataset SOP Class UID {got_class} is not the request's "
                                 f"{sop_class_uid}")
    return "", ""


class StoreScp:
    def __init__(self, archive: Archive, trail: Trail, telemetry: Telemetry | None = None
                 ) -> None:
        self.archive, self.trail = archive, trail
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        # per association (by id): [stored, refused]; read and dropped when it ends
        self.counts: dict[int, list[int]] = {}

    def handle(self, event: Any) -> Dataset:
        """EVT_C_STORE (pynetdicom's path: TLS, and associations that also query or
        retrieve), in the association's thread."""
        req = event.request
        code, comment = self.store(event.assoc, str(req.AffectedSOPClassUID),
                                   str(req.AffectedSOPInstanceUID), part10(event))
        return status(code, comment)

    def store(self, assoc: Any, sop_class: str, sop_instance: str,
              received: bytes | Received) -> tuple[int, str]:
        """Store one received instance; blocks until durable or refused, and until its
        audit event is durable. (status, error comment)."""
        slot = AuditSlot()
        (code, comment), study, detail, outcome = self._store(assoc, sop_class, sop_instance,
                                                              received, slot)
        ok = code == STATUS_SUCCESS
        size = len(received) if isinstance(received, bytes) else received.size
        self.telemetry.ingested("c-store", outcome, size)
        try:
            if slot.error:
                raise OSError(slot.error)
            if not slot.written:  # refused, already held, or not stored here
                self.trail.record(assoc, "C-STORE", "ok" if ok else "refused", study,
                                  1 if ok else 0, detail)
        except OSError as exc:  # stored, but unaccounted for: the sender must not move on
            LOGGER.error("C-STORE audit event cannot be written: %s", exc)
            code, comment, ok = STATUS_OUT_OF_RESOURCES, "audit trail cannot be written", False
        counts = self.counts.setdefault(id(assoc), [0, 0])
        counts[not ok] += 1  # only this association's thread writes
        return code, comment

    def _store(self, assoc: Any, sop_class: str, sop_instance: str,
               received: bytes | Received, slot: AuditSlot
               ) -> tuple[tuple[int, str], str, str, str]:
        """((status, comment), the study UID if known, what happened in words, and the
        outcome: stored, duplicate or rejected). A new instance's audit event goes in
        `slot`, for the group commit to write."""
        calling = assoc.requestor.ae_title
        study = ""

        def check(layout: Layout) -> None:  # before anything is written
            nonlocal study
            study = layout.attrs.get("study_instance_uid", "")
            which, why = mismatch(layout, sop_class, sop_instance)
            if which:
                raise Mismatch(which, why)
            slot.event = self.trail.event(assoc, "C-STORE", "ok", study, 1, sop_instance)

        try:
            if isinstance(received, bytes):
                result = self.archive.ingest_bytes(received, client_ref=sop_instance,
                                                   check=check, audit=slot)
            elif received.data is not None:
                result = self.archive.ingest_bytes(received.data, client_ref=sop_instance,
                                                   check=check, file_hash=received.file_hash,
                                                   audit=slot)
            else:
                result = self.archive.ingest_file(received.path, client_ref=sop_instance,
                                                  check=check, file_hash=received.file_hash,
                                                  audit=slot)
        except Mismatch as exc:
            LOGGER.warning("C-STORE from %s refused: %s", calling, exc)
            # Error Comment holds 64 characters: the UIDs go to log and audit
            return ((STATUS_DATASET_MISMATCH, f"dataset {exc.which} is not the request's"),
                    study, str(exc), "rejected")
        except PacsmeshError as exc:  # the walk found the dataset malformed
            LOGGER.warning("C-STORE of %s from %s refused: %s", sop_instance, calling, exc,
                           extra={"study": study, "instance": sop_instance})
            return ((STATUS_CANNOT_UNDERSTAND, str(exc)), study, f"{sop_instance}: {exc}",
                    "rejected")
        except Exception as exc:  # never let the sender believe a failure was a success
            LOGGER.exception("C-STORE of %s from %s failed", sop_instance, calling,
                             extra={"study": study, "instance": sop_instance})
            return ((STATUS_PROCESSING_FAILURE, f"internal error: {exc}"), study,
                    f"{sop_instance}: internal error", "rejected")
        answer = status_for(result)
        if answer[0] != STATUS_SUCCESS:
            LOGGER.warning("C-STORE of %s from %s refused (0x%04X): %s", sop_instance,
                           calling, answer[0], result.reason,
                           extra={"study": study, "instance": sop_instance})
            return answer, study, f"{sop_instance}: {result.reason}", "rejected"
        duplicate = result.outcome == node_pb2.IngestResult.DUPLICATE
        return (answer, result.study_instance_uid or study,
                f"{sop_instance}{' (already held)' if duplicate else ''}",
                "duplicate" if duplicate else "stored")
