"""The node's DICOM Application Entity: what it accepts, its limits, its lifecycle.

Accepted presentation contexts:
- Verification (C-ECHO);
- every storage SOP class pynetdicom knows, with every transfer syntax pydicom
  knows, so compressed data is stored as the modality sent it. Explicit VR Little
  Endian is preferred when a requester offers several syntaxes in one context:
  it is what most files on disk are in, so storescu sends them unchanged. A C-GET
  requester is the exception: its storage contexts follow its own order, and
  instances go back in the accepted syntax, converted losslessly when it is not
  the stored one (see `_on_requested`, retrieve.py, convert.py);
- Query/Retrieve FIND, GET and MOVE, Patient Root and Study Root;
- Storage Commitment Push Model.
An unknown SOP class is rejected at association (abstract syntax not supported).

Listeners: plaintext on `listen`, DICOM TLS on `tls_listen` (listener.py), one
AE behind both, so `max_associations` bounds them together.

Limits: calling AE titles outside `allowed_calling_aets` are rejected at
association (calling AE title not recognized), as is an association past
`max_associations` (rejected transient, local limit exceeded). A connection
counts as an association from its A-ASSOCIATE-RQ on; before that it is pending,
bounded per address and in time by the admission (admission.py).

Audit: every service and every refused association or connection goes to the
node's audit trail (trail.py).

Performance: pynetdicom's own logging of every DIMSE message is switched off (at
hundreds of instances a second it costs more than the work), and the largest
PDU we accept is raised so a C-STORE crosses in a few PDUs, not hundreds.
Each association runs in its own threads; ingest and reads release the GIL.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    evt,
)
from pynetdicom.association import Association

from pacsmesh.node.config import DicomSection
from pacsmesh.node.dicom import fast_store, ul
from pacsmesh.node.dicom.admission import PENDING_PER_ASSOCIATION, Admission, Connection
from pacsmesh.node.dicom.archive import Archive
from pacsmesh.node.dicom.commitment import STORAGE_COMMITMENT_PUSH, Commitment
from pacsmesh.node.dicom.fast_store import FastAssociation
from pacsmesh.node.dicom.listener import BACKSTOP_S, Guard, GuardedServer, tls_context
from pacsmesh.node.dicom.meter import DicomMeter
from pacsmesh.node.dicom.query import FindScp
from pacsmesh.node.dicom.retrieve import RetrieveScp
from pacsmesh.node.dicom.store_scp import StoreScp
from pacsmesh.node.dicom.trail import Trail
from pacsmesh.node.errors import PacsmeshError
from pacsmesh.node.telemetry import Telemetry

LOGGER = logging.getLogger(__name__)

PDU_RECEIVE_MAX = 1 << 20  # bytes; pynetdicom's default (16 KiB) splits a CT slice 32 ways
STOP_GRACE_S = 10.0  # associations in flight may finish their current work this long
ACCEPT_POLL_S = 0.1  # how soon the accept loop notices a shutdown
TIMEOUT_S = 60.0  # association idle, DIMSE and socket read timeouts: a silent peer is let go
TMP_DIR_NAME = "dicom-tmp"  # under the data dir: instances too big to spool in memory

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
# JPIP Referenced syntaxes carry a URL where the pixels would be: an archive that
# took them would call an instance safe while its pixels live elsewhere. Not offered,
# so a sender falls back to a syntax that carries the pixels.
_JPIP_REFERENCED = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95",
                              "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"})
# Uncompressed first (explicit before implicit), then every compressed syntax.
STORAGE_SYNTAXES = [_EXPLICIT_LE, _IMPLICIT_LE, *(
    ts for ts in ALL_TRANSFER_SYNTAXES
    if ts not in (_EXPLICIT_LE, _IMPLICIT_LE) and ts not in _JPIP_REFERENCED)]
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
                            if cx.abstract_syntax)
VERIFICATION = "1.2.840.10008.1.1"
# Patient Root and Study Root Query/Retrieve: FIND, MOVE, GET
QUERY_RETRIEVE = tuple(f"1.2.840.10008.5.1.4.1.2.{root}.{op}" for root in (1, 2)
                       for op in (1, 2, 3))
QUERY_RETRIEVE_GET = frozenset(uid for uid in QUERY_RETRIEVE if uid.endswith(".3"))


def _configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings this node relies on."""
    _config.LOG_HANDLER_LEVEL = "none"
    # send_c_store(path) streams the file's dataset as is: how retrieve.py sends
    # instances exactly as stored
    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its upper layer logs a traceback for every malformed or cut-off PDU a peer sends:
    # a garbage flood would flood the log. The admission and trail log one line each.
    logging.getLogger("pynetdicom.dul").setLevel(logging.CRITICAL)


class _AcceptorAE(AE):
    """pynetdicom checks `maximum_associations` against every acceptor thread alive,
    including connections that have not sent an A-ASSOCIATE-RQ (garbage, probes):
    those are the admission's to bound, so they are left out of the count. The
    storage associations fast_store.py serves count too."""

    fast: list[FastAssociation]

    @property
    def active_associations(self) -> list[Association]:
        ours: list[Any] = [a for a in super().active_associations
                           if not a.is_acceptor or a.requestor.primitive is not None]
        return ours + list(getattr(self, "fast", []))


class DicomServer:
    """The DICOM listener of one node; `start` binds (raising PacsmeshError if it
    cannot) and serves from pynetdicom's threads; `stop` lets work in flight end."""

    def __init__(self, archive: Archive, cfg: DicomSection, data_dir: Path,
                 revoked: Callable[[int], bool] | None = None,
                 telemetry: Telemetry | None = None) -> None:
        """`revoked`: whether a serial is revoked by the CA that signs TLS clients.
        `telemetry`: the node's, where requests and associations are counted."""
        self.archive, self.cfg, self.revoked = archive, cfg, revoked
        self.meter = DicomMeter(telemetry if telemetry is not None else Telemetry())
        self.tls = (tls_context(Path(cfg.tls_cert), Path(cfg.tls_key), Path(cfg.tls_client_ca))
                    if cfg.tls_listen else None)  # ConfigError: a file is wrong
        self.tmp_dir = data_dir / TMP_DIR_NAME
        self.admission = Admission(cfg.negotiation_timeout_s, cfg.max_pending_per_address,
                                   PENDING_PER_ASSOCIATION * cfg.max_associations,
                                   self._on_refused_connection)
        self.trail = Trail(archive.audit, self.admission)
        self.admission.on_tick = self.trail.flush
        self.store = StoreScp(archive, self.trail, self.meter.telemetry)
        self.find = FindScp(archive.store.catalog, cfg.ae_title, self.trail)
        self.retrieve = RetrieveScp(archive, dict(cfg.destinations), self.tmp_dir, self.trail)
        self.commitment = Commitment(archive, cfg.ae_title, dict(cfg.destinations),
                                     cfg.commitment_timeout_s, trail=self.trail)
        self.ae: Any = None
        self.servers: list[GuardedServer] = []
        self._started: dict[int, float] = {}  # association id -> when it was established
        self._slots = threading.Lock()  # association slots: pynetdicom's and ours
        self.fast: list[FastAssociation] = []  # storage associations served by fast_store
        self.fast_policy = fast_store.Policy(
            supported=STORAGE_CLASSES, syntaxes=STORAGE_SYNTAXES,
            allowed_calling=frozenset(cfg.allowed_calling_aets), max_pdu=PDU_RECEIVE_MAX,
            enter=self._enter, leave=lambda: None, on_request=self.meter.request)

    def _build_ae(self) -> Any:
        _configure_pynetdicom()
        ae = _AcceptorAE(ae_title=self.cfg.ae_title)
        ae.fast = self.fast
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = PDU_RECEIVE_MAX
        ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        # how long an acceptor thread waits for the A-ASSOCIATE-RQ; the admission
        # usually ends the wait sooner (the connection closed or was cut off)
        ae.acse_timeout = self.cfg.negotiation_timeout_s
        if self.cfg.allowed_calling_aets:
            ae.require_calling_aet = list(self.cfg.allowed_calling_aets)
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is None:
                continue
            # Role selection, when a requester sends it: a C-GET requester takes the
            # storage SCP role to receive (scp_role); a modality may state that it is
            # the SCU, as it is by default (scu_role: accepted, not rejected)
            ae.add_supported_context(cx.abstract_syntax, STORAGE_SYNTAXES,
                                     scu_role=True, scp_role=True)
        for uid in QUERY_RETRIEVE:
            ae.add_supported_context(uid)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH)
        return ae

    def start(self) -> None:
        """Binds every configured listener; PacsmeshError if one cannot be bound."""
        cfg = self.cfg
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # spools a crash left behind
        self.ae = self._build_ae()
        handlers = [
            (evt.EVT_C_STORE, self.store.handle),
            (evt.EVT_C_FIND, self.find.handle),
            (evt.EVT_C_GET, self.retrieve.handle_get),
            (evt.EVT_C_MOVE, self.retrieve.handle_move),
            (evt.EVT_N_ACTION, self.commitment.handle_n_action),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_DIMSE_RECV, self.meter.on_dimse_recv),
            (evt.EVT_DIMSE_SENT, self.meter.on_dimse_sent),
        ]
        self.admission.start()
        try:
            if cfg.listen:
                self._serve(cfg.listen, Guard("dicom", self.admission, TIMEOUT_S,
                                              fast=self._fast), handlers)
            if self.tls is not None:
                self._serve(cfg.tls_listen, Guard("dicom-tls", self.admission, TIMEOUT_S,
                                                  self.tls, self.revoked), handlers)
        except BaseException:
            self.stop(0)
            raise
        self.commitment.start()
        LOGGER.info("DICOM AE %s listening on %s (at most %d associations; a connection "
                    "has %g s to associate)", cfg.ae_title,
                    " and ".join(filter(None, (cfg.listen, cfg.tls_listen and
                                               f"{cfg.tls_listen} (TLS)"))),
                    cfg.max_associations, cfg.negotiation_timeout_s)

    def _serve(self, listen: str, guard: Guard, handlers: list[Any]) -> None:
        host, _, port = listen.rpartition(":")
        try:
            server = self.ae.make_server((host, int(port)), evt_handlers=handlers,
                                         server_class=GuardedServer, guard=guard)
        except OSError as exc:
            raise PacsmeshError(
                f"cannot listen for DICOM on {listen}: {exc.strerror or exc}") from exc
        self.ae._servers.append(server)  # where pynetdicom's server.shutdown() looks
        self.servers.append(server)
        # (its shutdown waits up to one poll interval: 0.5 s by default, per listener)
        threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL_S,),
                         name=f"{guard.name}-accept",
                         daemon=True).start()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, give associations in flight `grace_s` to finish (a C-STORE
        being committed is answered), then abort the rest."""
        servers, self.servers = self.servers, []
        try:
            if servers:
                self._stop_servers(servers, grace_s)
        finally:
            self.admission.stop()
            self.trail.flush(everything=True)  # refusals counted but not yet recorded

    def _stop_servers(self, servers: list[GuardedServer], grace_s: float) -> None:
        active: list[Any] = [a for server in servers for a in server.active_associations]
        active += self.fast
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + grace_s
        for assoc in active:
            if assoc.is_established:  # not yet associated: nothing in flight to finish
                assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in active:
            if assoc.is_alive():
                LOGGER.warning("aborting DICOM association from %s at shutdown",
                               assoc.requestor.ae_title)
                assoc.abort()
        self.commitment.stop()
        LOGGER.info("DICOM AE %s stopped", self.cfg.ae_title)

    # ---- storage associations served by fast_store.py ----------------------------------

    def _fast(self, conn: Connection, sock: socket.socket, rq_length: int) -> bool:
        """Serve a storage-only association here (True), else leave it to pynetdicom."""
        deadline = conn.deadline + BACKSTOP_S
        raw = fast_store.peek_associate_rq(sock, rq_length, deadline, self.admission.clock)
        if raw is None or conn.cut:
            return False
        try:
            rq = ul.parse_associate_rq(raw[6:])
        except ul.UlError:
            return False  # pynetdicom answers a malformed request its own way
        if not fast_store.eligible(rq, STORAGE_CLASSES):
            return False
        try:
            fast_store.consume(sock, len(raw))
            fast_store.serve(sock, rq, conn.host, conn.port, self.fast_policy,
                             self.store.store, self.tmp_dir,
                             on_refused=self._fast_refused,
                             on_established=lambda a: self._fast_established(conn, a),
                             on_ended=self._fast_ended)
        except OSError as exc:
            LOGGER.info("DICOM connection from %s lost: %s", conn.address, exc)
        finally:
            with self._slots:
                self._prune_fast()
            self.admission.give_up(conn)
            with contextlib.suppress(OSError):
                sock.close()
        return True

    def _enter(self) -> bool:
        """Take an association slot for a fast association (False at the limit)."""
        with self._slots:
            self._prune_fast()
            return len(self.ae.active_associations) < self.cfg.max_associations

    def _prune_fast(self) -> None:
        """Forget fast associations that ended (under `_slots`; the list is shared
        with the AE, which counts them against max_associations)."""
        for a in self.fast:
            if not a.is_alive():  # ended without on_ended (an error): still not active
                self.meter.ended(a, released=False)
        self.fast[:] = [a for a in self.fast if a.is_alive()]

    def _fast_established(self, conn: Connection, assoc: FastAssociation) -> None:
        with self._slots:
            self.fast.append(assoc)
        self.meter.established(assoc)
        self.admission.attach(conn, assoc)
        self.admission.requested(assoc)
        self.admission.established(assoc)

    def _fast_refused(self, assoc: FastAssociation, kind: str, why: str) -> None:
        self.meter.rejected()
        if kind == "limit":
            why = f"more than {self.cfg.max_associations} associations at once"
        self.trail.refused_association(assoc, kind, why)

    def _fast_ended(self, assoc: FastAssociation, how: str, seconds: float) -> None:
        self.meter.ended(assoc, released=how == "released")
        stored, refused = self.store.counts.pop(id(assoc), [0, 0])
        requestor = assoc.requestor
        level = logging.INFO if how == "released" else logging.WARNING
        work = f": {stored} instances stored, {refused} refused" if stored or refused else ""
        LOGGER.log(level, "DICOM association from %s at %s:%s %s after %.1f s%s",
                   requestor.ae_title, requestor.address, requestor.port, how, seconds, work)

    def _on_requested(self, event: Any) -> None:
        """A C-GET requester receives on storage contexts it proposes in one list of
        syntaxes per SOP class; let its own order choose (a viewer that prefers RLE
        then gets RLE-stored instances as stored, and one that lists Implicit VR LE
        first gets everything in it, converted where stored otherwise). Everyone
        else gets our order: uncompressed first."""
        assoc = event.assoc
        self.admission.requested(assoc)  # an association now: pynetdicom counts it
        requested = assoc.requestor.requested_contexts
        if not any(cx.abstract_syntax in QUERY_RETRIEVE_GET for cx in requested):
            return
        ours = {cx.abstract_syntax: cx for cx in assoc.acceptor.supported_contexts}
        proposed: dict[str, Any] = {}
        for rq in requested:
            proposed.setdefault(rq.abstract_syntax, rq)
        contexts = []
        for uid, cx in ours.items():
            wanted = proposed.get(uid)
            order = [ts for ts in wanted.transfer_syntax if ts in cx.transfer_syntax] if (
                uid in STORAGE_CLASSES and wanted is not None) else []
            if not order:
                contexts.append(cx)
                continue
            theirs = build_context(uid, order)
            theirs.scu_role, theirs.scp_role = True, True
            contexts.append(theirs)
        assoc.acceptor.supported_contexts = contexts

    def _on_established(self, event: Any) -> None:
        self.admission.established(event.assoc)
        self._started[id(event.assoc)] = time.monotonic()
        self.meter.established(event.assoc)

    def _on_conn_close(self, event: Any) -> None:
        """Closed before its A-ASSOCIATE-RQ: if it got that far only by sending what is
        not DICOM (pynetdicom aborted it, Sta13), that is a refusal to record; a peer
        that merely closed (a port probe) is not."""
        assoc = event.assoc
        self.meter.ended(assoc, released=False)  # unless released or aborted already
        state = assoc.dul.state_machine.current_state  # the state the close came in
        conn = self.admission.transport_closed(assoc)
        if conn is not None and state == "Sta13" and not conn.cut:
            self.trail.refused_connection(conn, "garbage", "sent data that is not a DICOM "
                                                           "association request")

    def _on_refused_connection(self, conn: Any, kind: str, why: str) -> None:
        self.trail.refused_connection(conn, kind, why)

    def _on_ended(self, event: Any) -> None:
        """One line per association: who, how it ended, what it stored."""
        key = id(event.assoc)
        started = self._started.pop(key, None)
        stored, refused = self.store.counts.pop(key, [0, 0])
        requestor = event.assoc.requestor
        how = "released" if event.event == evt.EVT_RELEASED else "aborted"
        self.meter.ended(event.assoc, released=how == "released")
        seconds = time.monotonic() - started if started is not None else 0.0
        level = logging.INFO if how == "released" else logging.WARNING
        work = f": {stored} instances stored, {refused} refused" if stored or refused else ""
        LOGGER.log(level, "DICOM association from %s at %s:%s %s after %.1f s%s",
                   requestor.ae_title, requestor.address, requestor.port, how, seconds, work)

    def _on_rejected(self, event: Any) -> None:
        self.meter.rejected()
        requestor = event.assoc.requestor
        allowed = self.cfg.allowed_calling_aets
        if allowed and requestor.ae_title not in allowed:
            self.trail.refused_association(event.assoc, "calling-ae", f"calling AE title "
                                           f"{requestor.ae_title!r} is not allowed")
        else:
            self.trail.refused_association(event.assoc, "limit", f"more than "
                                           f"{self.cfg.max_associations} associations at once")
