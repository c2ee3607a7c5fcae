"""Which TCP connections may wait for an association, and for how long.

pynetdicom gives every accepted connection its own threads and counts it against
`maximum_associations` before it has sent a byte, and its reads block without a
timeout: four connections that sent one byte of garbage held four slots for
good, locking real modalities out. Here a connection is *pending* from accept
until its association is established, and:

- it must be established within `negotiation_timeout_s` of the accept (TLS
  handshake included), or its socket is shut down, which also wakes a read
  blocked on it; slow, silent and garbage peers alike are cut off then;
- at most `max_pending_per_address` are pending from one IP address: a new one
  past that cuts off the oldest of that address that has not yet sent its
  A-ASSOCIATE-RQ, so a broken device cannot crowd out the others behind the same
  address, and never anyone at another address;
- at most `PENDING_PER_ASSOCIATION * max_associations` are pending in all; past
  that new connections are closed at once.

Pending connections do not count against `max_associations` until their
A-ASSOCIATE-RQ arrives (see server.py), so they cannot lock out associations.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOGGER = logging.getLogger(__name__)

TICK_S = 0.25  # how late past its deadline a connection may be cut off
PENDING_PER_ASSOCIATION = 4  # pending connections in all, per association slot


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, until its association ends."""

    host: str
    port: int
    listener: str  # "dicom" or "dicom-tls"
    sock: socket.socket
    deadline: float  # monotonic: established by then, or cut off
    cert: str = ""  # the verified TLS client certificate, e.g. "operator:alice"
    assoc: Any = None  # the pynetdicom association, once created
    requested: bool = False  # its A-ASSOCIATE-RQ arrived
    established: bool = False
    ended: bool = False  # closed before associating, or given up by its thread
    cut: str = ""  # why admission cut it off ("" = it was not)
    rq_length: int = 0  # its A-ASSOCIATE-RQ's announced length, once peeked (plaintext)
    _woken: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pending(self) -> bool:
        return not (self.established or self.ended or self.cut)


# (connection, kind, reason): a connection refused or cut off, for the audit trail
Refusal = Callable[[Connection, str, str], None]


class Admission:
    """The registry of connections; thread-safe. Its reaper thread enforces deadlines."""

    def __init__(self, timeout_s: float, per_address: int, total: int, on_refused: Refusal,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.per_address, self.total = timeout_s, per_address, total
        self.on_refused, self.clock = on_refused, clock
        self._lock = threading.Lock()
        self._conns: list[Connection] = []
        self._by_assoc: dict[int, Connection] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_tick: Callable[[], None] | None = None  # runs every tick (audit flushes)

    # ---- the accept path --------------------------------------------------------------

    def admit(self, sock: socket.socket, host: str, port: int,
              listener: str) -> Connection | None:
        """Registers a new connection, or None when it must be closed at once."""
        now = self.clock()
        conn = Connection(host, port, listener, sock, now + self.timeout_s)
        refused: tuple[Connection, str, str] | None = None
        with self._lock:
            pending = [c for c in self._conns if c.pending]
            mine = [c for c in pending if c.host == host]
            idle = [c for c in mine if not c.requested]  # oldest first
            if len(pending) >= self.total:
                refused = (conn, "busy", f"{len(pending)} connections are already waiting "
                                         "for association (the most allowed)")
            elif len(mine) >= self.per_address and not idle:
                refused = (conn, "crowded", f"{len(mine)} connections from {host} are "
                                            "already negotiating")
            else:
                if len(mine) >= self.per_address:
                    self._cut(idle[0], f"more than {self.per_address} connections from "
                                       f"{host} waiting for association; the oldest cut off")
                    refused = (idle[0], "crowded", idle[0].cut)
                self._conns.append(conn)
        if refused is not None:
            self.on_refused(*refused)
        return None if refused is not None and refused[0] is conn else conn

    def rewrap(self, conn: Connection, sock: socket.socket) -> None:
        """The connection is now `sock` (TLS wraps the accepted socket)."""
        with self._lock:
            conn.sock = sock
            if conn.cut:  # cut while being wrapped: the old socket is gone, cut this one
                _shutdown(sock)

    def attach(self, conn: Connection, assoc: Any) -> None:
        with self._lock:
            conn.assoc = assoc
            self._by_assoc[id(assoc)] = conn
            if conn.cut:
                self._wake(conn)

    def give_up(self, conn: Connection) -> None:
        """Its thread is done with a connection that never became a running association."""
        with self._lock:
            conn.ended = True
            if conn in self._conns:
                self._conns.remove(conn)
            if conn.assoc is not None:
                self._by_assoc.pop(id(conn.assoc), None)

    # ---- association events (pynetdicom threads) --------------------------------------

    def of(self, assoc: Any) -> Connection | None:
        with self._lock:
            return self._by_assoc.get(id(assoc))

    def requested(self, assoc: Any) -> None:
        with self._lock:
            if (conn := self._by_assoc.get(id(assoc))) is not None:
                conn.requested = True

    def established(self, assoc: Any) -> None:
        with self._lock:
            if (conn := self._by_assoc.get(id(assoc))) is not None:
                conn.established = True

    def transport_closed(self, assoc: Any) -> Connection | None:
        """The transport closed; returns the connection if it closed while pending and
        before its A-ASSOCIATE-RQ (then its association thread stops waiting for one)."""
        with self._lock:
            conn = self._by_assoc.get(id(assoc))
            if conn is None or conn.established or conn.requested or conn.ended:
                return None
            conn.ended = True
            self._wake(conn)
            return conn

    # ---- deadlines ----------------------------------------------------------------------

    def tick(self) -> None:
        """Cut off connections past their deadline; forget those whose threads ended."""
        now = self.clock()
        refused: list[tuple[Connection, str, str]] = []
        with self._lock:
            keep = []
            for conn in self._conns:
                assoc = conn.assoc
                if assoc is not None and assoc.ident is not None and not assoc.is_alive():
                    self._by_assoc.pop(id(assoc), None)
                    continue
                if conn.ended and assoc is None:
                    continue
                if not conn.established and now >= conn.deadline:
                    if not conn.cut:
                        step = ("TLS handshake" if conn.listener.endswith("tls")
                                and not conn.cert else "association")
                        self._cut(conn, f"no {step} within {self.timeout_s:g} s")
                        if not conn.requested and not conn.ended:
                            refused.append((conn, "timeout", conn.cut))
                    else:
                        _shutdown(conn.sock)  # again: a TLS wrap may have raced the first
                keep.append(conn)
            self._conns = keep
        for conn, kind, why in refused:
            self.on_refused(conn, kind, why)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-admission", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
                if self.on_tick is not None:
                    self.on_tick()
            except Exception:  # the reaper must outlive one bad round
                LOGGER.exception("DICOM admission round failed")

    # ---- under the lock -------------------------------------------------------------------

    def _cut(self, conn: Connection, why: str) -> None:
        conn.cut = why
        _shutdown(conn.sock)
        self._wake(conn)

    def _wake(self, conn: Connection) -> None:
        """An acceptor association thread waits (acse_timeout) for the A-ASSOCIATE-RQ
        on its queue; once the connection is gone, tell it now: its slot frees at once."""
        assoc = conn.assoc
        if assoc is None or conn._woken or assoc.requestor.primitive is not None:
            return
        conn._woken = True
        assoc.dul.to_user_queue.put(None)  # what a timed-out wait returns


def _shutdown(sock: socket.socket) -> None:
    """Shut down without closing: wakes a thread blocked reading it (a close would not),
    and its owner still closes it. The plain socket's method, also on an SSLSocket, so
    the TLS state of a thread mid-handshake is left alone."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
