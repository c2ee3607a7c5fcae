"""Counts DIMSE requests, their latency and associations, for the node's telemetry.

Both paths report here: pynetdicom's, through its EVT_DIMSE_RECV and
EVT_DIMSE_SENT notifications (every request received and response sent, whatever
handler answered it, pynetdicom's own C-ECHO included); and fast_store.py's,
which calls `request` itself. A request's time runs from the whole request
received (for a C-STORE, its data set too) to its final response sent: the time
this node takes, not the sender's network. Pending responses (C-FIND matches,
C-GET/C-MOVE progress) are not final; a C-GET's or C-MOVE's final status is the
one pynetdicom computes from the sub-operations.

A request still open when its association ends counts with status "aborted".
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom.status import code_to_category

from pacsmesh.node.telemetry import Telemetry

# pynetdicom message class -> the service it asks for (requests that get a response)
REQUESTS = {f"{kind}_RQ": kind.replace("_", "-") for kind in (
    "C_STORE", "C_FIND", "C_GET", "C_MOVE", "C_ECHO", "N_EVENT_REPORT", "N_GET", "N_SET",
    "N_ACTION", "N_CREATE", "N_DELETE")}
RESPONSES = frozenset(f"{name[:-3]}_RSP" for name in REQUESTS)
# pynetdicom's status categories -> our status label ("Pending" is not final)
CATEGORIES = {"Success": "success", "Warning": "warning", "Failure": "failure",
              "Cancel": "cancel", "Unknown": "failure"}
OPEN_REQUESTS_MAX = 10_000  # requests awaiting their response; past it, new ones go untimed


def status_label(code: int) -> str:
    """A DIMSE status code as our `status` label ("" while pending)."""
    return CATEGORIES.get(code_to_category(code), "")


class DicomMeter:
    """Thread-safe: pynetdicom receives in its DUL thread and answers in the
    association's; fast_store.py runs one thread per association."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], tuple[str, float]] = {}  # (assoc, message id)
        self._established: set[int] = set()

    # ---- requests ---------------------------------------------------------------------

    def request(self, service: str, code: int, seconds: float) -> None:
        """One request answered with its final status `code` (negative: its response
        could not be sent, as fast_store.STATUS_ABORTED)."""
        label = "aborted" if code < 0 else status_label(code) or "failure"
        self.telemetry.dicom_seconds.observe((service,), seconds)
        self.telemetry.dicom_requests.add((service, label))

    def on_dimse_recv(self, event: Any) -> None:
        """EVT_DIMSE_RECV: a whole message arrived; a request starts its clock."""
        msg = event.message
        service = REQUESTS.get(type(msg).__name__)
        if service is None:
            return
        message_id = msg.command_set.get("MessageID")
        if message_id is None:  # pynetdicom refuses it; there will be no response
            return
        with self._lock:
            if len(self._open) < OPEN_REQUESTS_MAX:
                self._open[(id(event.assoc), int(message_id))] = (service, time.perf_counter())

    def on_dimse_sent(self, event: Any) -> None:
        """EVT_DIMSE_SENT: a final response stops its request's clock."""
        msg = event.message
        if type(msg).__name__ not in RESPONSES:
            return
        cs = msg.command_set
        code = cs.get("Status")
        if code is None or not (label := status_label(int(code))):
            return  # pending
        key = (id(event.assoc), int(cs.get("MessageIDBeingRespondedTo", -1)))
        with self._lock:
            opened = self._open.pop(key, None)
        if opened is None:
            return
        service, started = opened
        self.telemetry.dicom_seconds.observe((service,), time.perf_counter() - started)
        self.telemetry.dicom_requests.add((service, label))

    # ---- associations -----------------------------------------------------------------

    def established(self, assoc: Any) -> None:
        with self._lock:
            self._established.add(id(assoc))
        self.telemetry.associations.add(("accepted",))
        self.telemetry.associations_active.add(1)

    def rejected(self) -> None:
        self.telemetry.associations.add(("rejected",))

    def ended(self, assoc: Any, released: bool) -> None:
        """The association ended; requests it left unanswered count as aborted."""
        key = id(assoc)
        now = time.perf_counter()
        with self._lock:
            was = key in self._established
            self._established.discard(key)
            left = [k for k in self._open if k[0] == key]
            unanswered = [self._open.pop(k) for k in left]
        for service, started in unanswered:
            self.telemetry.dicom_seconds.observe((service,), now - started)
            self.telemetry.dicom_requests.add((service, "aborted"))
        if was:
            self.telemetry.associations_active.add(-1)
            self.telemetry.associations_ended.add(("released" if released else "aborted",))
