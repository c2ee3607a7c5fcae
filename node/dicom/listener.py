"""The DICOM listeners: pynetdicom's association server, guarded at accept.

pynetdicom's server accepts in one thread and, on a TLS listener, performs the
handshake in that same thread with no timeout: one silent connection to the TLS
port would stop every later one from being accepted. Here the accept thread only
registers the connection with the admission (admission.py) and hands it to a
thread of its own, which within the connection's deadline:

- on the TLS listener, completes the handshake (BCP 195: TLS 1.2 or later,
  ECDHE with AES-GCM; a client certificate is required and must chain to the
  configured CA, and one from the cluster CA must not be revoked);
- on the plaintext listener, waits for the first PDU header and refuses a peer
  whose first bytes are not an A-ASSOCIATE-RQ of a sane length (HTTP, TLS to the
  wrong port, noise, a length meant to exhaust memory) without ever creating a
  pynetdicom association for it;
- then creates the association as pynetdicom would, with a read timeout on the
  socket so that a read blocked mid-PDU cannot outlive the peer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacsmesh.node import pki
from pacsmesh.node.dicom.admission import Admission, Connection
from pacsmesh.node.errors import ConfigError

LOGGER = logging.getLogger(__name__)

A_ASSOCIATE_RQ = b"\x01"  # PDU type: the only way a requestor may open (PS3.8 9.3.1)
PDU_HEADER_BYTES = 6  # type, reserved, length (big-endian 32 bits)
# An A-ASSOCIATE-RQ proposing 128 contexts with every transfer syntax is ~300 KB;
# a peer announcing more wants memory, not an association.
ASSOCIATE_RQ_BYTES_MAX = 1 << 20
HEADER_POLL_S = 0.05  # while a header trickles in (each connection has its own thread)
# BCP 195 (RFC 9325) for TLS 1.2: forward secrecy and AEAD only. TLS 1.3 suites
# are all AEAD and stay OpenSSL's default.
BCP195_CIPHERS = "ECDHE+AESGCM"
BACKSTOP_S = 2.0  # past a connection's deadline, its own reads give up too


def tls_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The DICOM TLS listener's context; ConfigError says which file is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    ctx.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no association
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[dicom] TLS certificate {cert} / key {key}: {exc}") from exc
    try:
        ctx.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[dicom] TLS client CA {client_ca}: {exc}") from exc
    return ctx


def subject_of(der: bytes) -> tuple[str, int]:
    """(who the certificate names, its serial): "operator:alice" for one of ours."""
    cert = x509.load_der_x509_certificate(der)
    ours = pki.identity_of(cert)
    return (ours.subject if ours else cert.subject.rfc4514_string()), cert.serial_number


@dataclass(frozen=True)
class Guard:
    """What a listener's connections go through before they are associations."""

    name: str  # "dicom" or "dicom-tls"
    admission: Admission
    read_timeout_s: float  # of an established association's socket
    tls: ssl.SSLContext | None = None
    revoked: Callable[[int], bool] | None = None  # serials revoked by the cluster CA
    # serves the association itself and returns True (fast_store.py), or returns False
    # and leaves the socket untouched for pynetdicom
    fast: Callable[[Connection, socket.socket, int], bool] | None = None


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, registering the association it creates."""

    def __init__(self, request: socket.socket, client_address: Any,
                 server: GuardedServer, conn: Connection) -> None:
        self.conn = conn
        super().__init__(request, client_address, server)

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        server = self.server
        assert isinstance(server, GuardedServer)
        server.guard.admission.attach(self.conn, assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    daemon_threads = True  # a connection's thread never holds up shutdown

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: Any,
                 ssl_context: Any = None, evt_handlers: Any = None, *,
                 guard: Guard) -> None:
        self.guard = guard
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers)

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accept thread: admit or close at once, never block."""
        host, port = str(client_address[0]), int(client_address[1])
        # Nagle would hold each small response (C-FIND matches, C-STORE statuses)
        # until the peer's delayed ACK, ~40 ms apiece
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self.guard.admission.admit(request, host, port, self.guard.name)
        if conn is None:
            self.shutdown_request(request)
            return
        threading.Thread(target=self._open, args=(conn,), daemon=True,
                         name=f"{self.guard.name}-open").start()

    def _open(self, conn: Connection) -> None:
        admission = self.guard.admission
        sock: socket.socket | None = conn.sock
        try:
            sock = self._prepare(conn)
            if sock is not None:
                sock.settimeout(self.guard.read_timeout_s)
                fast = self.guard.fast
                if fast is not None and conn.rq_length and fast(conn, sock, conn.rq_length):
                    return
                GuardedHandler(sock, (conn.host, conn.port), self, conn)
        except Exception:
            LOGGER.exception("DICOM connection from %s failed before association",
                             conn.address)
        finally:
            if conn.assoc is None or conn.assoc.ident is None:  # never ran: ours to close
                admission.give_up(conn)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
                with contextlib.suppress(OSError):
                    conn.sock.close()

    def _prepare(self, conn: Connection) -> socket.socket | None:
        """The socket to associate over, or None if the connection was refused."""
        sock = conn.sock
        # The admission's reaper cuts it off at the deadline (and records why), which
        # wakes the reads below; this timeout is only a backstop behind it.
        left = conn.deadline - self.guard.admission.clock()
        sock.settimeout(max(0.0, left) + BACKSTOP_S)
        if self.guard.tls is not None:
            return self._handshake(conn)
        header = self._peek_header(conn)
        if header is None or conn.cut:  # closed without a word (a port probe), or cut off
            return None
        kind, length = header[0], int.from_bytes(header[2:6], "big")
        if kind != A_ASSOCIATE_RQ[0]:
            self.guard.admission.on_refused(conn, f"garbage:{kind}", "sent data that is not "
                                            f"a DICOM association request (0x{kind:02x})")
            return None
        if length > ASSOCIATE_RQ_BYTES_MAX:  # pynetdicom would read it whole into memory
            self.guard.admission.on_refused(conn, "too-long", f"announced a {length}-byte "
                                            "association request")
            return None
        conn.rq_length = length
        return sock

    def _peek_header(self, conn: Connection) -> bytes | None:
        """The first PDU's type and length (6 bytes, left unread), or its first byte if
        that is already not an A-ASSOCIATE-RQ; None if the connection closed or was cut
        off first."""
        clock = self.guard.admission.clock
        while not conn.cut and clock() < conn.deadline + BACKSTOP_S:
            try:
                got = conn.sock.recv(PDU_HEADER_BYTES, socket.MSG_PEEK)
            except OSError:
                return None
            if not got:
                return None
            if len(got) == PDU_HEADER_BYTES or got[:1] != A_ASSOCIATE_RQ:
                return got.ljust(PDU_HEADER_BYTES, b"\x00")
            # a partial header: the rest is slow to come (or never will: a peek sees
            # buffered bytes, not that the peer has gone, hence the deadline above)
            time.sleep(HEADER_POLL_S)
        return None

    def _handshake(self, conn: Connection) -> socket.socket | None:
        guard = self.guard
        assert guard.tls is not None
        try:
            tls = guard.tls.wrap_socket(conn.sock, server_side=True,
                                        do_handshake_on_connect=False)
        except OSError:
            return None
        guard.admission.rewrap(conn, tls)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            if not conn.cut and not isinstance(exc, ssl.SSLEOFError | ConnectionError):
                reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
                guard.admission.on_refused(conn, f"tls:{reason}",  # throttled per reason
                                           f"TLS handshake failed: {reason}")
            return None
        der = tls.getpeercert(binary_form=True)
        if der is None:  # CERT_REQUIRED makes this unreachable; never trust that alone
            guard.admission.on_refused(conn, "tls:none", "no client certificate")
            return None
        conn.cert, serial = subject_of(der)
        if guard.revoked is not None and guard.revoked(serial):
            guard.admission.on_refused(conn, "tls:revoked", f"client certificate serial "
                                       f"{serial:x} is revoked")
            return None
        return tls

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOGGER.exception("DICOM connection from %s failed", client_address)
