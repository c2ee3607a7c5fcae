"""The node's DICOM Application Entity: what it accepts, its limits, its lifecycle.

Accepted presentation contexts:
- Verification (C-ECHO);
- every storage SOP class pynetdicom knows, with every transfer syntax pydicom
  knows, so compressed data is stored as the modality sent it. Explicit VR Little
  Endian is preferred when a requester offers several syntaxes in one context:
  it is what most files on disk are in, so storescu sends them unchanged;
- Query/Retrieve FIND, GET and MOVE, Patient Root and Study Root;
- Storage Commitment Push Model.
An unknown SOP class is rejected at association (abstract syntax not supported).

Limits: calling AE titles outside `allowed_calling_aets` are rejected at
association (calling AE title not recognized), as is an association past
`max_associations` (rejected transient, local limit exceeded).

Performance: pynetdicom's own logging of every DIMSE message is switched off (at
hundreds of instances a second it costs more than the work), and the largest
PDU we accept is raised so a C-STORE crosses in a few PDUs, not hundreds.
Each association runs in its own threads; ingest and reads release the GIL.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt

from node.config import DicomSection
from node.dicom.archive import Archive
from node.dicom.commitment import STORAGE_COMMITMENT_PUSH, Commitment
from node.dicom.query import MATCHES_MAX, QueryError, find, parse_keys, response
from node.dicom.retrieve import RetrieveScp
from node.dicom.store_scp import StoreScp, status
from node.errors import PacsmeshError

LOGGER = logging.getLogger(__name__)

PDU_RECEIVE_MAX = 1 << 20  # bytes; pynetdicom's default (16 KiB) splits a CT slice 32 ways
STOP_GRACE_S = 10.0  # associations in flight may finish their current work this long
TIMEOUT_S = 60.0  # association idle, ACSE and DIMSE timeouts: a silent peer is let go
TMP_DIR_NAME = "dicom-tmp"  # under the data dir: instances too big to spool in memory

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_SUCCESS = 0x0000
STATUS_FIND_TOO_MANY = 0xA700  # out of resources
STATUS_FIND_BAD_IDENTIFIER = 0xA900  # identifier does not match SOP class
STATUS_FIND_FAILED = 0xC001  # unable to process

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
# Uncompressed first (explicit before implicit), then every compressed syntax.
STORAGE_SYNTAXES = [_EXPLICIT_LE, _IMPLICIT_LE, *(
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (_EXPLICIT_LE, _IMPLICIT_LE))]
VERIFICATION = "1.2.840.10008.1.1"
# Patient Root and Study Root Query/Retrieve: FIND, MOVE, GET
QUERY_RETRIEVE = tuple(f"1.2.840.10008.5.1.4.1.2.{root}.{op}" for root in (1, 2)
                       for op in (1, 2, 3))


def _configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings this node relies on."""
    _config.LOG_HANDLER_LEVEL = "none"
    # send_c_store(path) streams the file's dataset as is: how retrieve.py sends
    # instances exactly as stored
    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class DicomServer:
    """The DICOM listener of one node; `start` binds (raising PacsmeshError if it
    cannot) and serves from pynetdicom's threads; `stop` lets work in flight end."""

    def __init__(self, archive: Archive, cfg: DicomSection, data_dir: Path) -> None:
        self.archive, self.cfg = archive, cfg
        self.tmp_dir = data_dir / TMP_DIR_NAME
        self.store = StoreScp(archive)
        self.retrieve = RetrieveScp(archive, dict(cfg.destinations), self.tmp_dir)
        self.commitment = Commitment(archive, cfg.ae_title, dict(cfg.destinations),
                                     cfg.commitment_timeout_s)
        self.ae: Any = None
        self.server: Any = None

    def _build_ae(self) -> Any:
        _configure_pynetdicom()
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = PDU_RECEIVE_MAX
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        if self.cfg.allowed_calling_aets:
            ae.require_calling_aet = list(self.cfg.allowed_calling_aets)
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is None:
                continue
            # scp_role: a C-GET requester takes the storage SCP role to receive
            ae.add_supported_context(cx.abstract_syntax, STORAGE_SYNTAXES,
                                     scu_role=False, scp_role=True)
        for uid in QUERY_RETRIEVE:
            ae.add_supported_context(uid)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH)
        return ae

    def start(self) -> None:
        host, _, port = self.cfg.listen.rpartition(":")
        self.ae = self._build_ae()
        handlers = [
            (evt.EVT_C_STORE, self.store.handle),
            (evt.EVT_C_FIND, self.handle_find),
            (evt.EVT_C_GET, self.retrieve.handle_get),
            (evt.EVT_C_MOVE, self.retrieve.handle_move),
            (evt.EVT_N_ACTION, self.commitment.handle_n_action),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self.server = self.ae.start_server((host, int(port)), block=False,
                                               evt_handlers=handlers)
        except OSError as exc:
            raise PacsmeshError(
                f"cannot listen for DICOM on {self.cfg.listen}: {exc.strerror or exc}"
            ) from exc
        self.commitment.start()
        LOGGER.info("DICOM AE %s listening on %s (at most %d associations)",
                    self.cfg.ae_title, self.cfg.listen, self.cfg.max_associations)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, give associations in flight `grace_s` to finish (a C-STORE
        being committed is answered), then abort the rest."""
        if self.server is None:
            return
        server, self.server = self.server, None
        active = list(server.active_associations)
        server.shutdown()
        deadline = time.monotonic() + grace_s
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in active:
            if assoc.is_alive():
                LOGGER.warning("aborting DICOM association from %s at shutdown",
                               assoc.requestor.ae_title)
                assoc.abort()
        self.commitment.stop()
        LOGGER.info("DICOM AE %s stopped", self.cfg.ae_title)

    # -- C-FIND --------------------------------------------------------------------

    def handle_find(self, event: Any) -> Any:
        """EVT_C_FIND: matches streamed as pending responses, at most MATCHES_MAX."""
        calling = event.assoc.requestor.ae_title
        try:
            identifier = event.identifier
            level, keys = parse_keys(identifier)
        except QueryError as exc:
            LOGGER.warning("C-FIND from %s refused: %s", calling, exc)
            yield status(STATUS_FIND_BAD_IDENTIFIER, str(exc)), None
            return
        except Exception as exc:  # an identifier that does not decode
            LOGGER.warning("C-FIND from %s: bad identifier: %s", calling, exc)
            yield status(STATUS_FIND_BAD_IDENTIFIER, f"bad identifier: {exc}"), None
            return
        sent = 0
        try:
            for row in find(self.archive.store.catalog, level, keys):
                if event.is_cancelled:
                    yield STATUS_CANCEL, None
                    return
                if sent >= MATCHES_MAX:
                    LOGGER.warning("C-FIND from %s stopped at %d matches", calling, sent)
                    yield status(STATUS_FIND_TOO_MANY,
                                  f"more than {MATCHES_MAX} matches: narrow the query"), None
                    return
                yield STATUS_PENDING, response(identifier, row, level, self.cfg.ae_title)
                sent += 1
        except Exception as exc:
            LOGGER.exception("C-FIND from %s failed", calling)
            yield status(STATUS_FIND_FAILED, f"internal error: {exc}"), None
            return
        LOGGER.info("C-FIND from %s at %s level: %d matches", calling, level, sent)
        yield STATUS_SUCCESS, None

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        allowed = self.cfg.allowed_calling_aets
        why = (f"calling AE title {requestor.ae_title!r} is not allowed"
               if allowed and requestor.ae_title not in allowed
               else f"more than {self.cfg.max_associations} associations at once")
        LOGGER.warning("DICOM association from %s:%s rejected: %s", requestor.address,
                       requestor.port, why)
