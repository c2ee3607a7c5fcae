"""Studies by expiry date, so what expires is found without walking the archive.

    by_expiry   expires YYYYMMDD (or NEVER) \\0 study uid -> ''
    deleted     study uid -> deleted ms(8) expires YYYYMMDD(8) StudyRecord (its
                retention inputs: studies deleted here)

One key per study, moved in the transaction that changes the study's retention
inputs (catalog.add). The key depends on the policy: the policy's fingerprint is
kept beside the index, and a node opened with another policy rebuilds it once.
`deleted` remembers what this node deleted, so a copy of it offered later (by a
node that was offline across the expiry) is refused instead of stored again;
unless that copy is a version this node never saw that keeps the study longer
(a later date, a modality kept longer): then it is not expired after all, and
is stored again.
"""

from __future__ import annotations

import datetime as dt
import logging
import struct
from collections.abc import Callable
from typing import Any

from pacsmesh.node import retention
from pacsmesh.node.retention import RetentionSection
from pacsmesh.node.study_index import SEP
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)
_U64 = struct.Struct(">Q")
POLICY_KEY = b"expiry_policy"
REBUILD_BATCH = 10_000


def expiry_of(policy: RetentionSection, rec: node_pb2.StudyRecord) -> retention.Expiry:
    return retention.record_expiry(policy, rec.retain_date, rec.retain_birth,
                                   rec.retain_birth_bad, rec.modalities,
                                   dated=retention.readable_date(rec.study_date))


class ExpiryIndex:
    def __init__(self, env: Any, policy: RetentionSection) -> None:
        self.env = env
        self.policy = policy
        self.db = env.open_db(b"by_expiry")
        self.deleted = env.open_db(b"deleted")
        self.meta = env.open_db(b"meta")

    def key(self, rec: node_pb2.StudyRecord) -> bytes:
        return retention.expiry_key(expiry_of(self.policy, rec)).encode()

    def update(self, txn: Any, old: bytes, rec: node_pb2.StudyRecord) -> None:
        """Inside the transaction writing `rec`; `old`: its key before (b"" = none)."""
        new = self.key(rec)
        if new == old:
            return
        if old:
            txn.delete(old + SEP + rec.study_uid.encode(), db=self.db)
        txn.put(new + SEP + rec.study_uid.encode(), b"", db=self.db)

    def remove(self, txn: Any, rec: node_pb2.StudyRecord) -> None:
        txn.delete(self.key(rec) + SEP + rec.study_uid.encode(), db=self.db)

    # ---- deleted studies ----------------------------------------------------------

    def mark_deleted(self, txn: Any, rec: node_pb2.StudyRecord, at_ms: int) -> None:
        keep = node_pb2.StudyRecord(
            study_uid=rec.study_uid, study_date=rec.study_date, modalities=rec.modalities,
            retain_date=rec.retain_date, retain_birth=rec.retain_birth,
            retain_birth_bad=rec.retain_birth_bad, first_received_ms=rec.first_received_ms)
        txn.put(rec.study_uid.encode(), _U64.pack(at_ms) + self.key(rec)
                + keep.SerializeToString(), db=self.deleted)

    def deleted_at(self, txn: Any, study_uid: str) -> tuple[int, str] | None:
        raw = txn.get(study_uid.encode(), db=self.deleted) if study_uid else None
        if raw is None:
            return None
        return _U64.unpack(bytes(raw[:8]))[0], bytes(raw[8:16]).decode()

    def deleted_record(self, txn: Any, study_uid: str) -> node_pb2.StudyRecord | None:
        raw = txn.get(study_uid.encode(), db=self.deleted) if study_uid else None
        if raw is None:
            return None
        rec = node_pb2.StudyRecord()
        rec.ParseFromString(bytes(raw[16:]))
        return rec

    def first_deletable(self, rec: node_pb2.StudyRecord) -> dt.date | None:
        """Expiry plus grace, and never sooner than grace_days after it was received:
        a study that arrives with an old date (an unset modality clock, a typo, a
        migration) is kept at least that long, whatever its date says."""
        first = retention.deletable_on(expiry_of(self.policy, rec), self.policy)
        if first is None:
            return None
        received = retention.today_utc(rec.first_received_ms / 1000) + dt.timedelta(
            days=self.policy.grace_days)
        return max(first, received)

    def deletable(self, rec: node_pb2.StudyRecord, now_s: float) -> bool:
        first = self.first_deletable(rec)
        return first is not None and retention.today_utc(now_s) >= first

    def deleted_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.deleted)["entries"])

    # ---- the policy changed (or an older data dir) --------------------------------

    def rebuild_if_needed(self, study_recs: Any,
                          fill: Callable[[Any, node_pb2.StudyRecord], bool]) -> None:
        """Rebuild every key when the policy is not the one the index was built with.
        `fill(txn, rec)` completes a record made before retention inputs were kept
        (True: it changed, write it back). Restarts from scratch after a crash."""
        mark = retention.fingerprint(self.policy).encode()
        with self.env.begin(db=self.meta) as txn:
            if txn.get(POLICY_KEY) == mark:
                return
        with self.env.begin(write=True) as txn:
            txn.drop(self.db, delete=False)
            txn.delete(POLICY_KEY, db=self.meta)
        after, done = b"", 0
        while True:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=study_recs)
                ok = cur.set_range(after + SEP) if after else cur.first()
                n = 0
                filled = []
                while ok and n < REBUILD_BATCH:
                    after, n = bytes(cur.key()), n + 1
                    rec = node_pb2.StudyRecord()
                    rec.ParseFromString(bytes(cur.value()))
                    if fill(txn, rec):
                        filled.append(rec)
                    self.update(txn, b"", rec)
                    ok = cur.next()
                for rec in filled:  # (not while the cursor walks this db)
                    txn.put(rec.study_uid.encode(), rec.SerializeToString(), db=study_recs)
                done += n
            if not ok:
                break
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(POLICY_KEY, mark)
        if done:
            LOGGER.info("retention: expiry dates of %d studies computed under the policy "
                        "in force", done)
