"""Secondary indexes of studies by the keys operators and DICOM queries filter on.

    by_patient    patient id \\0 study uid -> ''
    by_date       study date \\0 study uid -> ''
    by_accession  accession number \\0 study uid -> ''

Each holds exactly one key per study whose record has that field set: the value
is the record's, so when a newer version corrects it, the old key goes in the
same transaction as the record changes. Readers still re-check every candidate
against its record (a key's value may be cut short, see INDEX_VALUE_MAX).

The study uid is always after the last \\0 (UIDs hold only digits and dots), so a
key splits unambiguously even if a value holds a \\0.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)

SEP = b"\x00"
_U32 = struct.Struct(">I")
# record field -> index db name
INDEXED_FIELDS = {"patient_id": b"by_patient", "study_date": b"by_date",
                  "accession_number": b"by_accession"}
# LMDB keys are at most 511 bytes; a longer value (never a valid LO/DA) is cut here
INDEX_VALUE_MAX = 256
# 2: the indexes above exist and are complete (format 1 data dirs had none)
CATALOG_FORMAT = 2
FORMAT_KEY = b"catalog_format"
BACKFILL_AFTER_KEY = b"index_backfill_after"  # progress, so an interrupted upgrade resumes
# study records indexed per write transaction while upgrading: bounds how long one
# transaction holds the write lock and how much it keeps dirty
BACKFILL_BATCH = 10_000


def value_key(value: str) -> bytes:
    """The indexed form of a value: its UTF-8 bytes, cut to INDEX_VALUE_MAX."""
    return value.encode()[:INDEX_VALUE_MAX]


def index_key(value: str, study_uid: str) -> bytes:
    return value_key(value) + SEP + study_uid.encode()


def split_key(key: bytes) -> tuple[bytes, str]:
    """(indexed value, study uid) of an index key."""
    value, _, uid = key.rpartition(SEP)
    return value, uid.decode()


def indexed_values(rec: node_pb2.StudyRecord | None) -> dict[str, str]:
    if rec is None:
        return dict.fromkeys(INDEXED_FIELDS, "")
    return {name: getattr(rec, name) for name in INDEXED_FIELDS}


class StudyIndexes:
    def __init__(self, env: Any) -> None:
        self.env = env
        self.dbs: dict[str, Any] = {name: env.open_db(db) for name, db in INDEXED_FIELDS.items()}

    def update(self, txn: Any, study_uid: str, before: dict[str, str],
               rec: node_pb2.StudyRecord) -> None:
        """Inside the transaction that writes `rec`: move the keys whose value changed."""
        for name, db in self.dbs.items():
            old, new = before[name], getattr(rec, name)
            if old == new:
                continue
            if old:
                txn.delete(index_key(old, study_uid), db=db)
            if new:
                txn.put(index_key(new, study_uid), b"", db=db)

    def backfill(self, study_recs: Any, meta: Any) -> None:
        """Build the indexes of a data dir made before they existed, in bounded
        transactions; runs at open, before anything else writes."""
        with self.env.begin(db=meta) as txn:
            fmt = txn.get(FORMAT_KEY)
            after = txn.get(BACKFILL_AFTER_KEY)
        if fmt is not None and _U32.unpack(fmt)[0] >= CATALOG_FORMAT:
            return
        resume = bytes(after) if after is not None else b""
        done = 0
        while True:
            resume, count, finished = self._backfill_batch(study_recs, meta, resume)
            done += count
            if finished:
                break
            LOGGER.info("indexing studies of an older data dir: %d so far", done)
        if done:
            LOGGER.info("indexed %d studies by patient id, study date and accession", done)

    def _backfill_batch(self, study_recs: Any, meta: Any, after: bytes
                        ) -> tuple[bytes, int, bool]:
        count = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=study_recs)
            ok = cur.set_range(after + SEP) if after else cur.first()
            while ok and count < BACKFILL_BATCH:
                after, count = bytes(cur.key()), count + 1
                rec = node_pb2.StudyRecord()
                rec.ParseFromString(bytes(cur.value()))
                self.update(txn, after.decode(), indexed_values(None), rec)
                ok = cur.next()
            if ok:
                txn.put(BACKFILL_AFTER_KEY, after, db=meta)
                return after, count, False
            txn.put(FORMAT_KEY, _U32.pack(CATALOG_FORMAT), db=meta)
            txn.delete(BACKFILL_AFTER_KEY, db=meta)
            return after, count, True
