"""The node's HTTP edge on `[metrics] listen`, read-only: `/metrics` (the Prometheus
exposition), `/` (the status page, node/statuspage.py) and `/status.json` (its figures).

With the node's `[tls]` on it speaks HTTPS with the node's own certificate and asks
each client for one from the cluster CA, as the gRPC edge does: roles reader, operator
and node may read; a revoked serial, another role (a modality) or no certificate gets
403 and a sentence saying why. A certificate from another CA fails the handshake.
Without `[tls]` it is plain HTTP, as /metrics always was.

Bounded: at most HANDLERS_MAX requests at once (one more is closed unanswered), each
connection with a short socket timeout (the TLS handshake included, done in the
handler's thread so a slow client never holds up accepting), one request per
connection, request bodies never read. Threads are daemons; close() stops accepting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from pacsmesh.node import pki, statuspage
from pacsmesh.node.errors import ConfigError

LOGGER = logging.getLogger(__name__)
READ_ROLES = frozenset({"reader", "operator", "node"})  # a modality only sends images
HANDLERS_MAX = 16  # a Prometheus or two and a few browsers; more is a flood
REQUEST_TIMEOUT_S = 10.0  # to send a request line and headers, and to read the reply
HANDSHAKE_TIMEOUT_S = 5.0
# BCP 195 (RFC 9325) for TLS 1.2, as the DICOM TLS listener: forward secrecy and AEAD
BCP195_CIPHERS = "ECDHE+AESGCM"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # no script at all: even markup that slipped past escaping could not run
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'none'",
}
NOT_FOUND = ("no such page here: / is the status page, /status.json its figures and "
             "/metrics the Prometheus exposition\n")


@dataclass(frozen=True)
class WebTls:
    """The node's own credentials and the cluster CA, as the gRPC edge uses them."""

    cert: Path
    key: Path
    ca_pem: bytes
    revoked: Callable[[int], bool] | None = None  # the cluster's revocations (CRL)


def https_context(tls: WebTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # OPTIONAL, not REQUIRED: a certificate is verified against the CA when given, and
    # a browser without one gets a 403 saying what it needs instead of a bare failure
    ctx.verify_mode = ssl.CERT_OPTIONAL
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        ctx.load_verify_locations(cadata=tls.ca_pem.decode("ascii"))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"[metrics] HTTPS with [tls] cert {tls.cert} / key {tls.key}: "
                          f"{exc}") from exc
    return ctx


def refusal(der: bytes | None, revoked: Callable[[int], bool] | None) -> str:
    """Why a client with this (CA-verified) certificate may not read, or ""."""
    if not der:
        return ("403: this node serves its status only to a client certificate from the "
                "cluster CA with the role reader, operator or node (pacsmesh ca issue NAME "
                "--role reader); none was presented")
    try:
        identity = pki.identity_of(x509.load_der_x509_certificate(der))
    except ValueError:
        identity = None
    if identity is None:
        return "403: the client certificate names no pacsmesh role"
    if revoked is not None and revoked(identity.serial):
        return f"403: certificate serial {identity.serial:x} ({identity.subject}) is revoked"
    if identity.role not in READ_ROLES:
        return (f"403: {identity.subject} has the role '{identity.role}'; the status page "
                "and /metrics need reader, operator or node")
    return ""


class WebServer:
    """Serves the three paths until close(); `figures` is read once per page view."""

    def __init__(self, listen: str, registry: CollectorRegistry,
                 figures: Callable[[], statuspage.Figures], tls: WebTls | None = None) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        family = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)[0][0]
        self.registry, self.figures, self.tls = registry, figures, tls
        self.context = https_context(tls) if tls is not None else None
        self.scheme = "https" if tls is not None else "http"
        self.httpd = _Server((host, int(port)), family, self)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="metrics-http")
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def refusal(self, sock: socket.socket) -> str:
        if self.tls is None:
            return ""
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        return refusal(der, self.tls.revoked)

    def answer(self, path: str, accept: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return 200, content_type, encoder(self.registry)
        if path in ("/", "/index.html"):
            page = statuspage.render(self.figures())
            return 200, "text/html; charset=utf-8", page.encode()
        if path == "/status.json":
            doc = statuspage.as_json(self.figures())
            return 200, "application/json", (json.dumps(doc, indent=1) + "\n").encode()
        return 404, "text/plain; charset=utf-8", NOT_FOUND.encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up the node's shutdown
    block_on_close = False
    request_queue_size = HANDLERS_MAX

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 app: WebServer) -> None:
        self.address_family = family
        self.app = app
        self.slots = threading.BoundedSemaphore(HANDLERS_MAX)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accept thread: a free slot, or the connection is closed at once."""
        if not self.slots.acquire(blocking=False):
            LOGGER.warning("status/metrics: %d requests in flight; closing one from %s",
                           HANDLERS_MAX, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.app.context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            conn = context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            LOGGER.info("status/metrics: TLS handshake with %s failed: %s",
                        client_address[0], exc)
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            with contextlib.suppress(OSError):
                conn.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "pacsmesh"
    sys_version = ""

    def do_GET(self) -> None:
        self._reply(with_body=True)

    def do_HEAD(self) -> None:
        self._reply(with_body=False)

    def _reply(self, with_body: bool) -> None:
        app = self.server.app
        why = app.refusal(self.connection)
        if why:
            LOGGER.warning("status/metrics: refused %s %s from %s: %s", self.command,
                           self.path[:200], self.client_address[0], why)
            self._send(403, "text/plain; charset=utf-8", (why + "\n").encode(), with_body)
            return
        try:
            status, content_type, body = app.answer(urlsplit(self.path).path,
                                                    self.headers.get("Accept", ""))
        except Exception:
            LOGGER.exception("status/metrics: %s failed", self.path[:200])
            status, content_type = 500, "text/plain; charset=utf-8"
            body = b"the node could not read its status; its log says why\n"
        self._send(status, content_type, body, with_body)

    def _send(self, status: int, content_type: str, body: bytes, with_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in PAGE_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.debug("status/metrics %s: " + format, self.client_address[0], *args)
