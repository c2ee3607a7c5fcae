"""Storage associations without pynetdicom: one blocking thread per association.

An association whose A-ASSOCIATE-RQ proposes only storage SOP classes and
Verification, with no role selection or extended negotiation (what a modality or
PACS forwarding studies sends), is served here; anything else (queries,
retrieves, Storage Commitment, a C-GET requester's storage role) goes to
pynetdicom as before (listener.py decides, from the request it has peeked at).

Why: pynetdicom's receive path polls, with 1 ms sleeps in the DUL and the
association threads, and reads each PDU 4 KiB per call. With a handler that did
nothing it took ~275 CT instances/s on one association and ~250 on four here,
below Orthanc. This loop blocks in recv_into on the socket and answers as soon as
the instance is durable; there is no other latency in it.

Semantics are the same as the pynetdicom path (store_scp.py does the storing):
contexts are accepted with Explicit VR LE preferred, then Implicit VR LE, then
any other syntax pydicom knows; the calling AE title is checked, as is
`max_associations` (counted together with pynetdicom's associations); a C-STORE
is answered Success only once durable, and audited before that. An instance is
received into memory up to SPOOL_MEMORY_MAX and into a file under the data dir
past that, its hash computed as it arrives, so a multi-GB instance never sits in
RAM. Idle and read timeouts are the socket's (TIMEOUT_S, set by the listener).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacsmesh.node.dicom import ul
from pacsmesh.node.dicom.archive import write_all
from pacsmesh.node.hashing import FileHasher

LOGGER = logging.getLogger(__name__)

SPOOL_MEMORY_MAX = 32 << 20  # bytes of one instance held in memory; the rest to a file
PREAMBLE = b"\x00" * 128 + b"DICM"
PEEK_STALL_S = 0.5  # an A-ASSOCIATE-RQ that stops arriving this long goes to pynetdicom
STATUS_ABORTED = -1  # for `Policy.on_request`: the response never went out


@dataclass
class Requestor:
    """What the admission and the audit trail read of an association's requestor."""

    ae_title: str
    address: str
    port: int
    primitive: Any  # not None: its A-ASSOCIATE-RQ has arrived


class FastAssociation:
    """One storage association served by `serve`; duck-types the parts of a
    pynetdicom Association that admission.py, trail.py and server.py read."""

    is_acceptor = True

    def __init__(self, sock: socket.socket, rq: ul.AssociateRq, host: str, port: int) -> None:
        self.sock, self.rq = sock, rq
        self.requestor = Requestor(rq.calling_ae, host, port, rq)
        self.ident: int | None = threading.get_ident()
        self.is_established = False
        self._alive = True
        self.stored = self.refused = 0

    def is_alive(self) -> bool:
        return self._alive

    def abort(self) -> None:
        """From another thread (shutdown): wakes the association's blocked read."""
        with contextlib.suppress(OSError):
            self.sock.sendall(ul.abort())
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._alive and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class Received:
    """One C-STORE's Part 10 file: in memory, or in a file past SPOOL_MEMORY_MAX; its
    whole-file hash computed as the bytes arrived."""

    tmp_dir: Path
    size: int = 0
    # views of the PDU buffers (each PDU is read into a buffer of its own): joined once
    parts: list[bytes | memoryview] = field(default_factory=list)
    fd: int = -1
    path: str = ""
    hasher: FileHasher = field(default_factory=FileHasher)

    def add(self, piece: bytes | memoryview) -> None:
        self.hasher.update(piece)
        if self.fd < 0 and self.size + len(piece) > SPOOL_MEMORY_MAX:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self.fd, self.path = tempfile.mkstemp(prefix="c-store-", suffix=".dcm",
                                                  dir=self.tmp_dir)
            for part in self.parts:
                write_all(self.fd, part)
            self.parts = []
        if self.fd >= 0:
            write_all(self.fd, piece)
        else:
            self.parts.append(piece)
        self.size += len(piece)

    @property
    def data(self) -> bytes | None:
        """The whole file when it is in memory (None when it is in `path`)."""
        if self.fd >= 0:
            return None
        if len(self.parts) != 1 or not isinstance(self.parts[0], bytes):
            self.parts = [b"".join(self.parts)]
        data = self.parts[0]
        assert isinstance(data, bytes)
        return data

    @property
    def file_hash(self) -> bytes:
        return self.hasher.digest()

    def close(self) -> None:
        self.parts = []
        if self.fd >= 0:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.fd = -1


# (association, SOP class, SOP instance, the received file) -> (status, error comment)
StoreFn = Callable[[FastAssociation, str, str, Received], tuple[int, str]]


@dataclass
class Policy:
    """What an association may do, and the node's answers for it."""

    supported: frozenset[str]  # storage SOP classes
    syntaxes: list[str]  # transfer syntaxes we accept, preferred first
    allowed_calling: frozenset[str]  # empty: any
    max_pdu: int
    enter: Callable[[], bool]  # takes an association slot, or False at the limit
    leave: Callable[[], None]
    # told of every request answered: (service, final status, seconds from the whole
    # request received to its response sent); STATUS_ABORTED: the response could not go
    on_request: Callable[[str, int, float], None] = lambda service, code, seconds: None


def eligible(rq: ul.AssociateRq, supported: frozenset[str]) -> bool:
    """Whether this module serves the association (else pynetdicom does). A role
    selection item that asks for the default roles (requestor SCU only, as some
    modalities send) changes nothing, and needs no answer: the defaults apply."""
    return (all(roles == (1, 0) for roles in rq.roles.values()) and not rq.extended
            and all(cx.abstract_syntax in supported or cx.abstract_syntax == ul.VERIFICATION
                    for cx in rq.contexts))


def negotiate(rq: ul.AssociateRq, policy: Policy) -> list[tuple[int, int, str]]:
    """(context id, result, transfer syntax) for each proposed context."""
    out = []
    for cx in rq.contexts:
        if cx.abstract_syntax not in policy.supported and cx.abstract_syntax != ul.VERIFICATION:
            out.append((cx.context_id, ul.ABSTRACT_SYNTAX_NOT_SUPPORTED, cx.transfer_syntaxes[0]))
            continue
        chosen = next((ts for ts in policy.syntaxes if ts in cx.transfer_syntaxes), "")
        if chosen:
            out.append((cx.context_id, ul.ACCEPTANCE, chosen))
        else:
            out.append((cx.context_id, ul.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                        cx.transfer_syntaxes[0]))
    return out


class Closed(Exception):
    """The peer closed the connection, or it was shut down under us."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise Closed("connection closed")
        got += k
    return buf


def peek_associate_rq(sock: socket.socket, length: int, deadline: float,
                      clock: Callable[[], float] = time.monotonic) -> bytes | None:
    """The whole A-ASSOCIATE-RQ PDU (`length`: its body's, from the header), left
    unread so pynetdicom can still take the association; None if it does not arrive
    whole by `deadline` or stops growing (more than the socket buffer holds)."""
    want = 6 + length
    seen, since = -1, clock()
    while clock() < deadline:
        try:
            got = sock.recv(want, socket.MSG_PEEK)
        except (OSError, ValueError):  # ValueError: an SSLSocket takes no flags
            return None
        if len(got) == want:
            return got
        if not got:
            return None
        if len(got) != seen:
            seen, since = len(got), clock()
        elif clock() - since > PEEK_STALL_S:
            return None
        time.sleep(0.002)
    return None


def consume(sock: socket.socket, n: int) -> None:
    """Read and drop `n` bytes (the A-ASSOCIATE-RQ that was peeked)."""
    _recv_exact(sock, n)


def read_pdu(sock: socket.socket, max_body: int) -> tuple[int, bytearray]:
    head = _recv_exact(sock, 6)
    kind, length = ul.PDU_HEADER.unpack(head)
    if length > max_body:
        raise ul.UlError(f"PDU of {length} bytes is larger than the {max_body} we take")
    return kind, _recv_exact(sock, length)


@dataclass
class _Store:
    """A C-STORE in progress: its command, then its data set arriving."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    received: Received


class StoreAssociation:
    def __init__(self, assoc: FastAssociation, policy: Policy, store: StoreFn,
                 tmp_dir: Path) -> None:
        self.assoc, self.policy, self.store, self.tmp_dir = assoc, policy, store, tmp_dir
        self.accepted: dict[int, tuple[str, str]] = {}  # context id -> (class, syntax)
        self.command = bytearray()
        self.current: _Store | None = None

    def run(self) -> str:
        """Serve until released or aborted; returns how it ended."""
        sock = self.assoc.sock
        try:
            while True:
                kind, body = read_pdu(sock, self.policy.max_pdu)
                if kind == ul.P_DATA_TF:
                    self._p_data(body)
                elif kind == ul.RELEASE_RQ:
                    sock.sendall(ul.release_rp())
                    return "released"
                elif kind == ul.ABORT:
                    return "aborted by the peer"
                else:
                    raise ul.UlError(f"unexpected PDU type 0x{kind:02x} on an association")
        except ul.UlError as exc:
            with contextlib.suppress(OSError):
                sock.sendall(ul.abort(0x02, 0x00))
            return f"aborted: {exc}"
        except (Closed, TimeoutError, OSError) as exc:
            return f"aborted: {exc or 'connection lost'}"
        finally:
            if self.current is not None:
                self.current.received.close()

    def _p_data(self, body: bytearray) -> None:
        view = memoryview(body)
        for pdv in ul.pdvs(body):
            if pdv.context_id not in self.accepted:
                raise ul.UlError(f"PDV on presentation context {pdv.context_id}, which was "
                                 "not accepted")
            if pdv.command:
                if self.current is not None:
                    raise ul.UlError("a command began before the data set of the last ended")
                self.command += view[pdv.start:pdv.end]
                if pdv.last:
                    command, self.command = bytes(self.command), bytearray()
                    self._command(pdv.context_id, ul.parse_command(command))
                continue
            cur = self.current
            if cur is None or pdv.context_id != cur.context_id:
                raise ul.UlError("data set fragment without its C-STORE command")
            cur.received.add(view[pdv.start:pdv.end])
            if pdv.last:
                self.current = None
                self._stored(cur)

    def _command(self, context_id: int, cmd: dict[int, int | str]) -> None:
        field_, message_id = cmd.get(0x0100), int(cmd.get(0x0110, 0))
        sop_class, ts = self.accepted[context_id]
        if field_ == ul.C_ECHO_RQ:
            self._answer("C-ECHO", time.perf_counter(), 0x0000, context_id, ul.response(
                ul.C_ECHO_RSP, message_id, ul.VERIFICATION, "", 0x0000))
            return
        if field_ != ul.C_STORE_RQ:
            raise ul.UlError(f"command 0x{int(field_ or 0):04x} is not served on a storage "
                             "association")
        if cmd.get(0x0800) == ul.NO_DATASET:
            raise ul.UlError("C-STORE without a data set")
        instance = str(cmd.get(0x1000, ""))
        sop_class = str(cmd.get(0x0002, "")) or sop_class
        received = Received(self.tmp_dir)
        received.add(PREAMBLE + ul.file_meta(
            sop_class, instance, ts, str(PYNETDICOM_IMPLEMENTATION_UID),
            str(PYNETDICOM_IMPLEMENTATION_VERSION), self.assoc.requestor.ae_title))
        self.current = _Store(context_id, message_id, sop_class, instance, ts, received)

    def _stored(self, cur: _Store) -> None:
        started = time.perf_counter()
        try:
            code, comment = self.store(self.assoc, cur.sop_class, cur.sop_instance,
                                       cur.received)
        finally:
            cur.received.close()
        if code == 0x0000:
            self.assoc.stored += 1
        else:
            self.assoc.refused += 1
        self._answer("C-STORE", started, code, cur.context_id, ul.response(
            ul.C_STORE_RSP, cur.message_id, cur.sop_class, cur.sop_instance, code, comment))

    def _answer(self, service: str, started: float, code: int, context_id: int,
                command: bytes) -> None:
        """Send a request's response, and tell the policy how it went."""
        try:
            self._send(context_id, command)
        except BaseException:
            self.policy.on_request(service, STATUS_ABORTED, time.perf_counter() - started)
            raise
        self.policy.on_request(service, code, time.perf_counter() - started)

    def _send(self, context_id: int, command: bytes) -> None:
        self.assoc.sock.sendall(ul.p_data(context_id, command))


def serve(sock: socket.socket, rq: ul.AssociateRq, host: str, port: int, policy: Policy,
          store: StoreFn, tmp_dir: Path,
          on_refused: Callable[[FastAssociation, str, str], None],
          on_established: Callable[[FastAssociation], None],
          on_ended: Callable[[FastAssociation, str, float], None]) -> None:
    """Negotiate and serve one association whose A-ASSOCIATE-RQ (`rq`) has been read
    off `sock`. The caller closes the socket."""
    assoc = FastAssociation(sock, rq, host, port)
    try:
        if policy.allowed_calling and rq.calling_ae not in policy.allowed_calling:
            sock.sendall(ul.associate_rj(*ul.REJECT_CALLING_AE))
            on_refused(assoc, "calling-ae", f"calling AE title {rq.calling_ae!r} is not "
                                            "allowed")
            return
        if not policy.enter():
            sock.sendall(ul.associate_rj(*ul.REJECT_LIMIT))
            on_refused(assoc, "limit", "")
            return
        try:
            results = negotiate(rq, policy)
            handler = StoreAssociation(assoc, policy, store, tmp_dir)
            handler.accepted = {cid: (cx.abstract_syntax, ts) for (cid, result, ts), cx
                                in zip(results, rq.contexts, strict=True)
                                if result == ul.ACCEPTANCE}
            sock.sendall(ul.associate_ac(rq, results, policy.max_pdu,
                                         str(PYNETDICOM_IMPLEMENTATION_UID),
                                         str(PYNETDICOM_IMPLEMENTATION_VERSION)))
            assoc.is_established = True
            on_established(assoc)
            started = time.monotonic()
            how = handler.run()
            on_ended(assoc, how, time.monotonic() - started)
        finally:
            policy.leave()
    except OSError as exc:
        LOGGER.info("DICOM association from %s:%s lost while negotiating: %s", host, port, exc)
    finally:
        assoc._alive = False
