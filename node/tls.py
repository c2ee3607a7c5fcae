"""Mutual TLS and roles on the gRPC edge.

Who may do what is decided here, once, for every call: the certificate the
caller presented (verified against the cluster CA by TLS itself) names a
principal and a role (node/pki.py); each method needs one of a set of roles.
A revoked serial is refused on its next call, without a restart: the CRL file
and the config's `revoked_serials` are re-read when they change.

Without TLS (plaintext, loopback only unless `[tls] insecure = true`) there is
no identity: every caller is `anonymous` and every method is open, which is
what the local demo needs and nothing else should use.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import os
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pacsmesh.node import pki
from pacsmesh.node.errors import ConfigError

LOGGER = logging.getLogger(__name__)
PEER_API = "/pacsmesh.peer.PeerApi/"
NODE_API = "/pacsmesh.node.NodeApi/"
HEALTH_API = "/grpc.health.v1.Health/"
REFLECTION_API = "/grpc.reflection.v1alpha.ServerReflection/"
# Reading is a reader's job; everything that writes, repairs or costs (put, scrub,
# drill, audit, holds) is an operator's.
READER_METHODS = frozenset({"Status", "ListStudies", "Locate", "GetStudy", "Retention"})
REFRESH_EVERY_S = 1.0  # how stale a revocation may be, at most
IDENTITY_CACHE_MAX = 1024  # parsed certificates, by PEM


@dataclass(frozen=True)
class Caller:
    """Who made the current call, for authorization and the audit trail."""

    who: str  # "operator:alice", "node:boston", or "anonymous"
    role: str  # node | operator | reader | "" (plaintext: no identity)
    address: str  # the peer address as gRPC reports it
    name: str = ""  # the certificate's name (a node's id)


ANONYMOUS = Caller(who="anonymous", role="", address="")
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=ANONYMOUS)


def roles_for(method: str) -> frozenset[str]:
    """The roles allowed to call a full gRPC method name; empty: nobody."""
    if method.startswith(PEER_API):
        return frozenset({"node"})
    if method.startswith(NODE_API):
        if method[len(NODE_API):] in READER_METHODS:
            return frozenset({"operator", "reader"})
        return frozenset({"operator"})
    if method.startswith(HEALTH_API):
        return frozenset({"node", "operator", "reader"})
    if method.startswith(REFLECTION_API):
        return frozenset({"operator"})
    return frozenset()


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes
    identity: pki.Identity


def load_files(ca: Path, cert: Path, key: Path) -> TlsFiles:
    """Reads and checks a credential set: a clear error now beats a handshake that
    fails later with no reason given."""
    blobs = []
    for what, path in (("ca_cert", ca), ("cert", cert), ("key", key)):
        try:
            blobs.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"[tls] {what} {path}: {exc.strerror}") from exc
    ca_pem, cert_pem, key_pem = blobs
    identity = pki.identity_of_pem(cert_pem)
    if identity is None:
        raise ConfigError(f"[tls] cert {cert} is not a pacsmesh certificate (no role)")
    problem = pki.chain_problem(cert_pem, ca_pem)
    if problem:
        raise ConfigError(f"[tls] cert {cert}: {problem}")
    return TlsFiles(ca_pem, cert_pem, key_pem, identity)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    # require_client_auth: no certificate from the cluster CA, no connection at all.
    # gRPC's TLS stack negotiates TLS 1.3 and accepts nothing below 1.2.
    return grpc.ssl_server_credentials([(files.key, files.cert)], root_certificates=files.ca,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                        certificate_chain=files.cert)


class Revocations:
    """Revoked serials from a CRL file and from the config's `[tls] revoked_serials`,
    re-read when either file changes (checked at most once a second)."""

    def __init__(self, ca_pem: bytes, crl: Path | None, config: Path | None,
                 serials: tuple[str, ...] = ()) -> None:
        self._ca_pem, self._crl, self._config = ca_pem, crl, config
        self._static = parse_serials(serials)
        self._revoked: frozenset[int] = frozenset(self._static)
        self._stamps: tuple[float, float] = (-1.0, -1.0)
        self._checked = 0.0
        self._lock = threading.Lock()
        self.refresh(force=True)

    def _mtime(self, path: Path | None) -> float:
        try:
            return os.stat(path).st_mtime_ns if path is not None else 0.0
        except OSError:
            return -2.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < REFRESH_EVERY_S:
                return
            self._checked = now
            stamps = (self._mtime(self._crl), self._mtime(self._config))
            if stamps == self._stamps and not force:
                return
            revoked = set(self._static)
            if self._crl is not None:
                try:
                    revoked |= pki.read_crl(self._crl, self._ca_pem)
                except pki.PkiError as exc:
                    if force:
                        raise ConfigError(f"[tls] crl: {exc}") from exc
                    LOGGER.error("keeping the previous revocation list: %s", exc)
                    return
            if self._config is not None and stamps[1] != self._stamps[1]:
                try:
                    raw = tomllib.loads(self._config.read_text())
                    listed = raw.get("tls", {}).get("revoked_serials", [])
                    self._static = parse_serials(tuple(listed))
                    revoked |= self._static
                except (OSError, ValueError, ConfigError) as exc:
                    LOGGER.error("cannot re-read revoked_serials from %s: %s", self._config, exc)
            self._stamps = stamps
            if frozenset(revoked) != self._revoked:
                LOGGER.info("revocation list now holds %d serials", len(revoked))
            self._revoked = frozenset(revoked)

    def revoked(self, serial: int) -> bool:
        self.refresh()
        return serial in self._revoked


def parse_serials(values: tuple[str, ...]) -> frozenset[int]:
    out = set()
    for v in values:
        if not isinstance(v, str):
            raise ConfigError(f"[tls] revoked_serials entry {v!r} is not a hex string")
        try:
            out.add(int(v.replace(":", ""), 16))
        except ValueError:
            raise ConfigError(f"[tls] revoked_serials entry {v!r} is not a hex serial"
                              ) from None
    return frozenset(out)


Refusal = Callable[[Caller, str, str], None]  # (caller, method, reason)


class Gate:
    """Identifies the caller of every call and admits it, or aborts the call."""

    def __init__(self, revocations: Revocations | None,
                 on_refused: Refusal | None = None) -> None:
        self.enabled = revocations is not None
        self.revocations = revocations
        self.on_refused = on_refused
        # told the name of a node whose revoked certificate was presented (the cluster
        # then treats it as dead: our calls to it would still succeed)
        self.on_revoked_node: Callable[[str], None] | None = None
        self._identities: dict[bytes, pki.Identity | None] = {}

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Caller, int]:
        address = context.peer() or ""
        if not self.enabled:
            return Caller("anonymous", "", address), 0
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        if not pems:
            return Caller("unauthenticated", "", address), 0
        pem: bytes = pems[0]
        identity = self._identities.get(pem, False)
        if identity is False:
            identity = pki.identity_of_pem(pem)
            if len(self._identities) >= IDENTITY_CACHE_MAX:
                self._identities.clear()
            self._identities[pem] = identity
        if identity is None:
            return Caller("unknown certificate", "", address), 0
        assert isinstance(identity, pki.Identity)
        return Caller(identity.subject, identity.role, address, identity.name), identity.serial

    async def admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        caller, serial = self.caller(context)
        CALLER.set(caller)
        if not self.enabled:
            return
        reason = ""
        code = grpc.StatusCode.PERMISSION_DENIED
        assert self.revocations is not None
        if not caller.role:
            code, reason = grpc.StatusCode.UNAUTHENTICATED, "no pacsmesh role in the certificate"
        elif self.revocations.revoked(serial):
            code, reason = grpc.StatusCode.UNAUTHENTICATED, f"certificate serial {serial:x} " \
                "is revoked"
            if caller.role == "node" and self.on_revoked_node is not None:
                self.on_revoked_node(caller.name)
        elif caller.role not in roles_for(method):
            allowed = ", ".join(sorted(roles_for(method))) or "nobody"
            reason = (f"{caller.who} has role '{caller.role}'; {method.rsplit('/', 1)[-1]} "
                      f"needs {allowed}")
        if reason:
            if self.on_refused is not None:
                self.on_refused(caller, method, reason)
            await context.abort(code, reason)


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Runs the gate before every handler, whatever its streaming shape."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        gate = self.gate
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                await gate.admit(method, context)
                return await uu(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.stream_unary is not None:
            su = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                await gate.admit(method, context)
                return await su(requests, context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner: Any = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            await gate.admit(method, context)
            result: Any = inner(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a handler that writes through context.write
                await result
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming, **kw)
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
