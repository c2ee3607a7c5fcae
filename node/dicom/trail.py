"""DICOM events for the node's audit trail (node/audit.py).

Who: "AE:<calling AE title>", plus " cert:<subject>" on the TLS listener (the
verified client certificate); before an association there is no AE title, so
"cert:<subject>" or "unidentified". Role "dicom", address "ip:port".

Service events (C-STORE, C-FIND, ...) are recorded with `wait`: durable before
the response that acknowledges the work goes out. Connection refusals are not
waited for, and are throttled per address and kind: a port scanner or a flood of
garbage must not turn the audit trail into a disk-filling tool. The first of a
kind is recorded at once, the rest of its window are counted and recorded as one
event when the window ends.

Never a patient name, ID or birth date: studies and instances by UID; C-FIND
records which keys were used, never their values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pacsmesh.node.audit import AuditLog, Event
from pacsmesh.node.dicom.admission import Admission, Connection

LOGGER = logging.getLogger(__name__)

ROLE = "dicom"
THROTTLE_WINDOW_S = 10.0  # one refusal event per address and kind this often, at most
THROTTLE_KEYS_MAX = 4096  # addresses tracked at once; past this every refusal is recorded


class Trail:
    def __init__(self, log: AuditLog, admission: Admission | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.admission, self.clock = log, admission, clock
        self._lock = threading.Lock()
        # (host, kind) -> [window end, refusals suppressed, last detail]
        self._windows: dict[tuple[str, str], list[Any]] = {}

    def who(self, assoc: Any) -> str:
        calling = str(assoc.requestor.ae_title or "").strip()
        conn = self.admission.of(assoc) if self.admission is not None else None
        cert = f" cert:{conn.cert}" if conn is not None and conn.cert else ""
        return f"AE:{calling}{cert}"

    def record(self, assoc: Any, action: str, outcome: str, study_uid: str = "",
               instances: int = 0, detail: str = "", wait: bool = True) -> None:
        """One service event; with `wait`, returns once it is durable (raises OSError
        if it cannot be written: the caller must then not report success)."""
        self.log.record(self.event(assoc, action, outcome, study_uid, instances, detail),
                        wait=wait)

    def event(self, assoc: Any, action: str, outcome: str, study_uid: str = "",
              instances: int = 0, detail: str = "") -> Event:
        """A service event, not yet recorded (the store's group commit writes a stored
        instance's own, with it)."""
        requestor = assoc.requestor
        return Event(time=time.time(), who=self.who(assoc), role=ROLE,
                     address=f"{requestor.address}:{requestor.port}", action=action,
                     outcome=outcome, study_uid=study_uid, instances=instances, detail=detail)

    def refused_association(self, assoc: Any, kind: str, why: str) -> None:
        """An A-ASSOCIATE-RQ rejected (calling AE, association limit)."""
        requestor = assoc.requestor
        self._refusal(str(requestor.address), f"{requestor.address}:{requestor.port}",
                      self.who(assoc), kind, why)

    def refused_connection(self, conn: Connection, kind: str, why: str) -> None:
        """A connection cut off or closed before it became an association. `kind` is
        what refusals are throttled by (with the address): e.g. "timeout", "tls:<why>"."""
        who = f"cert:{conn.cert}" if conn.cert else "unidentified"
        self._refusal(conn.host, conn.address, who, f"{conn.listener}:{kind}",
                      f"{why} (on {conn.listener})")

    def _refusal(self, host: str, address: str, who: str, kind: str, detail: str) -> None:
        now = self.clock()
        with self._lock:
            window = self._windows.get((host, kind))
            if window is not None and now < window[0]:
                window[1] += 1
                window[2] = (address, who, detail)
                return
            if len(self._windows) < THROTTLE_KEYS_MAX:
                self._windows[(host, kind)] = [now + THROTTLE_WINDOW_S, 0, None]
        LOGGER.warning("DICOM connection from %s (%s) refused: %s", address, who, detail)
        self._write(address, who, detail)

    def flush(self, everything: bool = False) -> None:
        """Record what each ended window (or, at shutdown, every window) suppressed;
        forget ended windows."""
        now = self.clock()
        ended: list[tuple[int, Any]] = []
        with self._lock:
            for key, (end, count, last) in list(self._windows.items()):
                if now >= end or everything:
                    del self._windows[key]
                    if count:
                        ended.append((count, last))
        for count, (address, who, detail) in ended:
            LOGGER.warning("DICOM: %d more connections like %s refused in %g s: %s", count,
                           address, THROTTLE_WINDOW_S, detail)
            self._write(address, who, f"{count} more in {THROTTLE_WINDOW_S:g} s, the last: "
                                      f"{detail}")

    def _write(self, address: str, who: str, detail: str) -> None:
        self.log.record(Event(time=time.time(), who=who, role=ROLE, address=address,
                              action="A-ASSOCIATE", outcome="refused", detail=detail),
                        wait=False)
