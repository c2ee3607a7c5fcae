"""Sending Storage Commitment reports (N-EVENT-REPORT) over the network.

On a new association to a destination we act as the SCP of the Storage
Commitment SOP class on an association we request (SCP/SCU role selection,
PS3.4 J.3.3); on an association the requester opened, in its default roles.
A report counts as delivered only once the requester answered it with success.

Nagle's algorithm is switched off on the sockets reports go out on: it holds a
request's second PDU (its dataset) until the first is acknowledged, which the
peer delays by up to 40 ms, so without this every report costs 40 ms.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt

from pacsmesh.node.dicom.commit_request import STATUS_SUCCESS
from pacsmesh.node.dicom.commit_verdict import Transaction, event_report

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # SOP class
WELL_KNOWN_INSTANCE_UID = "1.2.840.10008.1.20.1.1"  # its one well-known SOP instance
REPORT_TIMEOUT_S = 15.0  # association and DIMSE timeouts: a requester that hangs is let go


def send_reports(assoc: Any, txns: list[Transaction], sent: list[Transaction],
                 stopping: Callable[[], bool]) -> None:
    """Send each transaction's report on `assoc`, in order, appending each one the
    requester acknowledged to `sent`; raises ConnectionError at the first failure,
    or when the node is `stopping` (the rest go out after the restart)."""
    no_delay(assoc)
    for txn in txns:
        if stopping():
            raise ConnectionError("the node is stopping")
        if not assoc.is_established:
            raise ConnectionError("the association has closed")
        event_type, info = event_report(txn)
        status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH,
                                              WELL_KNOWN_INSTANCE_UID)
        _check(status)
        sent.append(txn)


def send_to_destination(local_ae_title: str, ae_title: str, address: str,
                        txns: list[Transaction], sent: list[Transaction],
                        stopping: Callable[[], bool]) -> None:
    """Send the reports on one new association to `ae_title` at host:port `address`."""
    host, _, port = address.rpartition(":")
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = REPORT_TIMEOUT_S
    role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
    assoc = ae.associate(host, int(port), contexts=[build_context(STORAGE_COMMITMENT_PUSH)],
                         ae_title=ae_title, ext_neg=[role],
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: no_delay(e.assoc))])
    if not assoc.is_established:
        raise ConnectionError(f"association to {ae_title} at {address} was not established")
    try:
        send_reports(assoc, txns, sent, stopping)
    finally:
        if assoc.is_established:
            assoc.release()


def no_delay(assoc: Any) -> None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # a closed socket: the send reports it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _check(status: Dataset | None) -> None:
    code = status.get("Status") if status is not None else None
    if code is None:
        raise ConnectionError("no answer to the N-EVENT-REPORT")
    if code != STATUS_SUCCESS:
        raise ConnectionError(f"the requester answered the N-EVENT-REPORT with 0x{code:04X}")
