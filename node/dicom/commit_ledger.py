"""Accepted Storage Commitment transactions, durable until their report is delivered.

One LMDB sub-database in the node's index environment (node/store.py opens it
with sync on, so a committed write transaction is on disk):

    commit_pending   calling AE \\0 transaction UID -> serial \\n JSON record

A record holds what the report needs after a restart: the transaction UID, the
requester (AE title, the audit trail's name for it, its address), the referenced
SOP class/instance pairs, when it was received and its deadline (unix seconds),
and a serial that tells this acceptance from a later retry of the same request.
It is written, and committed, before the N-ACTION is answered with success, and
deleted once its report is delivered or given up. A crash between delivery and
deletion sends the report once more after the restart: delivery is at least once.

Every record is checked when read back; one that does not hold together is
returned as unreadable for the service to log, audit and delete.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any

from pacsmesh.node.dicom.commit_request import (
    REFERENCES_PER_REQUEST_MAX,
    UID_LENGTH_MAX,
    Reference,
)
from pacsmesh.node.dicom.commit_verdict import Transaction, TxnKey

DB_NAME = b"commit_pending"
FORMAT = 1
SEP = b"\x00"


class LedgerClosed(Exception):
    """The node is stopping: the store is closing, nothing more is written."""


@dataclass(frozen=True)
class Unreadable:
    key: bytes
    why: str


def encode_key(key: TxnKey) -> bytes:
    ae, uid = key
    return ae.encode() + SEP + uid.encode()


def encode(txn: Transaction) -> bytes:
    assert txn.serial and "\n" not in txn.serial
    # the serial leads, so a delete compares it without parsing a 50,000-reference record
    return txn.serial.encode() + b"\n" + json.dumps({
        "format": FORMAT, "uid": txn.uid, "calling_ae": txn.calling_ae, "who": txn.who,
        "address": txn.address, "received_at": txn.received_at, "deadline": txn.deadline,
        "refs": [[r.sop_class_uid, r.sop_instance_uid] for r in txn.refs],
    }, separators=(",", ":")).encode()


def decode(key: bytes, raw: bytes) -> Transaction:
    """The transaction under `key`; ValueError if the record does not hold together."""
    serial, _, body = raw.partition(b"\n")
    try:
        doc = json.loads(body)
        serial_text = serial.decode()
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, this node reads {FORMAT}")
        refs = [Reference(str(c), str(i)) for c, i in doc["refs"]]
        txn = Transaction(uid=str(doc["uid"]), calling_ae=str(doc["calling_ae"]), refs=refs,
                          received_at=float(doc["received_at"]),
                          deadline=float(doc["deadline"]), who=str(doc["who"]),
                          address=str(doc["address"]), serial=serial_text)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # JSON, UTF-8: ValueError
        raise ValueError(f"record does not decode: {exc}") from exc
    if encode_key(txn.key) != key:
        raise ValueError("record names another transaction than its key")
    if not 0 < len(refs) <= REFERENCES_PER_REQUEST_MAX:
        raise ValueError(f"{len(refs)} references")
    if any(not r.sop_instance_uid or len(r.sop_instance_uid) > UID_LENGTH_MAX for r in refs):
        raise ValueError("a reference has no or too long an instance UID")
    if not (math.isfinite(txn.received_at) and math.isfinite(txn.deadline)
            and txn.received_at <= txn.deadline):
        raise ValueError("received and deadline times do not hold together")
    return txn


class Ledger:
    def __init__(self, env: Any) -> None:
        self.env = env
        self.db = env.open_db(DB_NAME)
        self._lock = threading.Lock()  # `close` waits for a write under way
        self._closed = False

    def put(self, txn: Transaction) -> None:
        """Durable once this returns (replacing an earlier record under the same key)."""
        raw = encode(txn)
        assert decode(encode_key(txn.key), raw).refs == txn.refs  # what is read back
        with self._lock:
            if self._closed:
                raise LedgerClosed("the node is stopping")
            with self.env.begin(write=True, db=self.db) as t:
                t.put(encode_key(txn.key), raw)

    def delete(self, txns: list[Transaction]) -> int:
        """Delete the records of `txns` in one commit, each only if it is still the
        acceptance the transaction came from (a retry may have replaced it); how many
        were deleted."""
        deleted = 0
        with self._lock:
            if self._closed:
                raise LedgerClosed("the node is stopping")
            with self.env.begin(write=True, db=self.db) as t:
                for txn in txns:
                    key = encode_key(txn.key)
                    raw = t.get(key)
                    serial = bytes(raw).partition(b"\n")[0] if raw is not None else None
                    if serial == txn.serial.encode():
                        t.delete(key)
                        deleted += 1
        return deleted

    def drop(self, keys: list[bytes]) -> None:
        """Delete records by key (unreadable ones)."""
        with self._lock:
            if self._closed:
                raise LedgerClosed("the node is stopping")
            with self.env.begin(write=True, db=self.db) as t:
                for key in keys:
                    t.delete(key)

    def load(self) -> tuple[list[Transaction], list[Unreadable]]:
        """Every record, oldest request first, and those that cannot be read."""
        txns: list[Transaction] = []
        bad: list[Unreadable] = []
        with self.env.begin(db=self.db) as t:
            for key, raw in t.cursor():
                try:
                    txns.append(decode(bytes(key), bytes(raw)))
                except ValueError as exc:
                    bad.append(Unreadable(bytes(key), str(exc)))
        txns.sort(key=lambda txn: txn.received_at)
        return txns, bad

    def close(self) -> None:
        """No write after this returns: the store may close its environment."""
        with self._lock:
            self._closed = True

