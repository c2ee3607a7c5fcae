"""Lifecycle records: legal holds, their releases, and operators' requests to delete an
expired study. A grow-only set every node keeps whole, merged by union, like manifests:
no record is ever changed or removed, so replicas converge without a coordinator.

    lifecycle           id -> the record's bytes (exact, as hashed)
    lifecycle_by_study  study uid \\0 id -> kind(1)
    lifecycle_released  study uid \\0 hold id -> ''   (a RELEASE of that study names it)
    lifecycle_held      study uid -> holds in force(4) (only studies with one or more)
    lifecycle_meta      b"digest" -> AdHash(32) count(8) of every id

A record's id is the hash of its bytes as first encoded; nodes store and pass on
those bytes unchanged, so ids agree everywhere whatever protobuf library re-encodes.
A hold is in force until a RELEASE of the same study names its id. Releases and
holds may arrive in either order (a release first is kept and applies when its
hold comes), and `lifecycle_held` is kept in the transaction that adds them, as
is the digest, so neither ever disagrees with the records it counts.

Unknown fields are kept, not refused: a newer node's records must still pass
through older nodes unchanged, or their digests would never agree again. An unknown
kind is refused (this node could not act on it), so a new kind must wait until every
node knows it; until then digests disagree and deletion waits, the safe side.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import blake3
from google.protobuf.message import DecodeError

from pacsmesh.node.catalog import ADHASH_MOD, DIGEST_LEN, EMPTY_DIGEST
from pacsmesh.node.errors import LifecycleInvalid
from pacsmesh.node.hashing import HASH_LEN, content_hash
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto.node_pb2 import LifecycleRecord

SEP = b"\x00"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
DIGEST_KEY = b"digest"

RECORD_BYTES_MAX = 8 << 10
REASON_MAX = 1000  # characters
NAME_MAX = 256  # characters of `who` and `node`
NONCE_LEN = 16
ADD_MAX = 10_000  # records per add: bounds one write transaction
PAGE_MAX = 1000  # records per page: <= 8 MiB, under the 16 MiB peer message cap
HELD_PAGE_MAX = 10_000

Kind: TypeAlias = LifecycleRecord.Kind.ValueType
HOLD = LifecycleRecord.HOLD
RELEASE = LifecycleRecord.RELEASE
DELETE = LifecycleRecord.DELETE
_KIND_NAMES = {HOLD: "HOLD", RELEASE: "RELEASE", DELETE: "DELETE"}


def element_hash(record_id: bytes) -> int:
    # its own domain: a lifecycle id can never cancel or mimic a manifest set's element
    return int.from_bytes(blake3.blake3(b"pacsmesh-lifecycle\x00" + record_id).digest(), "big")


def digest_of(ids: Sequence[bytes]) -> tuple[bytes, int]:
    """The digest of a set of record ids from scratch (what the book keeps incrementally)."""
    unique = set(ids)
    total = sum(element_hash(i) for i in unique) % ADHASH_MOD
    return total.to_bytes(DIGEST_LEN, "big"), len(unique)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record `add` refused: its position in the call, its id (the hash of the bytes
    as sent) and why, for the caller to log and audit against the peer that sent it."""

    index: int
    record_id: bytes
    why: str


@dataclass(frozen=True, slots=True)
class Added:
    ids: list[bytes] = field(default_factory=list)  # new here, in the order given
    rejected: list[Rejected] = field(default_factory=list)


class LifecycleBook:
    def __init__(self, env: Any) -> None:
        self.env = env
        self.records = env.open_db(b"lifecycle")
        self.by_study = env.open_db(b"lifecycle_by_study")
        self.released = env.open_db(b"lifecycle_released")
        self.held_db = env.open_db(b"lifecycle_held")
        self.meta = env.open_db(b"lifecycle_meta")
        self.deletes = env.open_db(b"lifecycle_deletes")  # study uid -> '' (a DELETE exists)

    # ---- records ----------------------------------------------------------------------

    @staticmethod
    def make(kind: Kind, study_uid: str, reason: str, who: str, node: str, at_ms: int,
             releases: bytes = b"") -> tuple[bytes, bytes]:
        """A new record as (id, bytes), checked as a peer would check it (LifecycleInvalid:
        why not). A fresh nonce keeps two holds with the same words two records."""
        rec = LifecycleRecord(kind=kind, study_uid=study_uid, reason=reason, who=who,
                              node=node, at_ms=at_ms, releases=releases,
                              nonce=os.urandom(NONCE_LEN))
        raw = rec.SerializeToString(deterministic=True)
        LifecycleBook.validate(raw)
        return content_hash(raw), raw

    @staticmethod
    def validate(raw: bytes) -> LifecycleRecord:
        """The record these bytes encode, or LifecycleInvalid saying what is wrong. The
        bytes need not be canonical (the id is over them as they are)."""
        if len(raw) > RECORD_BYTES_MAX:
            raise LifecycleInvalid(f"record of {len(raw)} bytes (at most {RECORD_BYTES_MAX})")
        rec = LifecycleRecord()
        try:
            rec.ParseFromString(raw)
        except DecodeError as exc:
            raise LifecycleInvalid(f"record does not decode: {exc}") from None
        if rec.kind not in _KIND_NAMES:
            raise LifecycleInvalid(f"record kind {rec.kind} is not HOLD, RELEASE or DELETE")
        if (problem := uid_problem(rec.study_uid)) is not None:
            raise LifecycleInvalid(f"study uid {problem}")
        if not rec.reason:
            raise LifecycleInvalid("a reason is required")
        if len(rec.reason) > REASON_MAX:
            raise LifecycleInvalid(f"reason is {len(rec.reason)} characters (at most "
                                   f"{REASON_MAX})")
        for name, value in (("who", rec.who), ("node", rec.node)):
            if len(value) > NAME_MAX:
                raise LifecycleInvalid(f"{name} is {len(value)} characters (at most {NAME_MAX})")
        if rec.at_ms <= 0:
            raise LifecycleInvalid(f"time {rec.at_ms} ms is not after the epoch")
        if rec.kind == RELEASE and len(rec.releases) != HASH_LEN:
            raise LifecycleInvalid(f"a RELEASE must name a {HASH_LEN}-byte hold id, not "
                                   f"{len(rec.releases)} bytes")
        if rec.kind != RELEASE and rec.releases:
            raise LifecycleInvalid(f"a {_KIND_NAMES[rec.kind]} names no hold to release")
        if len(rec.nonce) != NONCE_LEN:
            raise LifecycleInvalid(f"nonce of {len(rec.nonce)} bytes (must be {NONCE_LEN})")
        return rec

    def add(self, raws: Sequence[bytes]) -> Added:
        """Add the valid, new records in one write transaction (a set: known ids are
        skipped). Invalid ones are skipped and returned in `rejected`; LifecycleInvalid
        only for more than ADD_MAX records in one call (nothing is added)."""
        if len(raws) > ADD_MAX:
            raise LifecycleInvalid(f"{len(raws)} records in one call (at most {ADD_MAX})")
        rejected: list[Rejected] = []
        checked: list[tuple[bytes, bytes, LifecycleRecord]] = []
        for index, given in enumerate(raws):
            raw = bytes(given)
            try:
                rec = self.validate(raw)
            except LifecycleInvalid as exc:
                rejected.append(Rejected(index, content_hash(raw), str(exc)))
                continue
            checked.append((content_hash(raw), raw, rec))
        added: list[bytes] = []
        if not checked:
            return Added(added, rejected)
        with self.env.begin(write=True) as txn:
            digest, count = self._digest(txn)
            total = int.from_bytes(digest, "big")
            for rid, raw, rec in checked:
                if not txn.put(rid, raw, db=self.records, overwrite=False):
                    continue
                self._index(txn, rid, rec)
                total += element_hash(rid)
                count += 1
                added.append(rid)
            if added:
                txn.put(DIGEST_KEY, (total % ADHASH_MOD).to_bytes(DIGEST_LEN, "big")
                        + _U64.pack(count), db=self.meta)
        return Added(added, rejected)

    def _index(self, txn: Any, rid: bytes, rec: LifecycleRecord) -> None:
        study = rec.study_uid.encode()
        txn.put(study + SEP + rid, bytes([rec.kind]), db=self.by_study)
        if rec.kind == DELETE:
            txn.put(study, b"", db=self.deletes)
        if rec.kind == HOLD:
            if txn.get(study + SEP + rid, db=self.released) is None:
                self._held_add(txn, study, +1)
        elif rec.kind == RELEASE:
            target = study + SEP + rec.releases
            # only the first release of a hold ends it; one naming another study's hold
            # (or no hold) marks an id that never becomes a hold of this study
            if (txn.put(target, b"", db=self.released, overwrite=False)
                    and txn.get(target, db=self.by_study) == bytes([HOLD])):
                self._held_add(txn, study, -1)

    def _held_add(self, txn: Any, study: bytes, delta: int) -> None:
        raw = txn.get(study, db=self.held_db)
        n = (_U32.unpack(raw)[0] if raw is not None else 0) + delta
        if n > 0:
            txn.put(study, _U32.pack(n), db=self.held_db)
        else:
            txn.delete(study, db=self.held_db)

    def _digest(self, txn: Any) -> tuple[bytes, int]:
        raw = txn.get(DIGEST_KEY, db=self.meta)
        if raw is None:
            return EMPTY_DIGEST, 0
        return bytes(raw[:DIGEST_LEN]), _U64.unpack(raw[DIGEST_LEN:])[0]

    # ---- reads ------------------------------------------------------------------------

    def digest(self) -> tuple[bytes, int]:
        """(AdHash of every record id, record count): one read, whatever the set holds."""
        with self.env.begin() as txn:
            return self._digest(txn)

    def get(self, record_id: bytes) -> bytes | None:
        with self.env.begin(db=self.records) as txn:
            raw = txn.get(record_id)
        return bytes(raw) if raw is not None else None

    def page(self, after: bytes, limit: int) -> tuple[list[bytes], bool]:
        """Records in id order after `after` (b"": from the first), at most
        min(limit, PAGE_MAX), and whether more follow."""
        limit = max(1, min(limit, PAGE_MAX))
        out: list[bytes] = []
        with self.env.begin(db=self.records) as txn:
            cur = txn.cursor()
            ok = cur.set_range(after + SEP) if after else cur.first()
            while ok and len(out) < limit:
                out.append(bytes(cur.value()))
                ok = cur.next()
            return out, bool(ok)

    def holds(self, study_uid: str) -> list[tuple[bytes, LifecycleRecord]]:
        """The holds in force on a study, oldest first: its HOLD records that no RELEASE
        of the same study names."""
        out: list[tuple[bytes, LifecycleRecord]] = []
        with self.env.begin() as txn:
            for rid, kind in self._of_study(txn, study_uid):
                key = study_uid.encode() + SEP + rid
                if kind == HOLD and txn.get(key, db=self.released) is None:
                    out.append((rid, self._record(txn, rid)))
        out.sort(key=lambda item: (item[1].at_ms, item[0]))
        return out

    def held(self, study_uid: str) -> bool:
        if uid_problem(study_uid) is not None:
            return False
        with self.env.begin(db=self.held_db) as txn:
            return txn.get(study_uid.encode()) is not None

    def delete_requested(self, study_uid: str) -> LifecycleRecord | None:
        """The earliest request to delete this study (by its time, then id), if any."""
        found: list[tuple[int, bytes, LifecycleRecord]] = []
        with self.env.begin() as txn:
            for rid, kind in self._of_study(txn, study_uid):
                if kind == DELETE:
                    rec = self._record(txn, rid)
                    found.append((rec.at_ms, rid, rec))
        return min(found, key=lambda f: (f[0], f[1]))[2] if found else None

    def delete_requests(self, after: str, limit: int) -> list[str]:
        """Studies an operator asked to delete, in uid order after `after`."""
        return self._uid_page(self.deletes, after, limit)

    def held_studies(self, after: str, limit: int) -> list[str]:
        """Studies with a hold in force, in uid order after `after`."""
        return self._uid_page(self.held_db, after, limit)

    def _uid_page(self, db: Any, after: str, limit: int) -> list[str]:
        limit = max(1, min(limit, HELD_PAGE_MAX))
        out: list[str] = []
        with self.env.begin(db=db) as txn:
            cur = txn.cursor()
            ok = cur.set_range(after.encode() + SEP) if after else cur.first()
            while ok and len(out) < limit:
                out.append(bytes(cur.key()).decode())
                ok = cur.next()
        return out

    def _of_study(self, txn: Any, study_uid: str) -> list[tuple[bytes, int]]:
        """(id, kind) of every record of one study."""
        out: list[tuple[bytes, int]] = []
        if uid_problem(study_uid) is not None:  # never stored; and a \0 would misread keys
            return out
        prefix = study_uid.encode() + SEP
        cur = txn.cursor(db=self.by_study)
        ok = cur.set_range(prefix)
        while ok:
            key = bytes(cur.key())
            if not key.startswith(prefix):
                break
            out.append((key[len(prefix):], cur.value()[0]))
            ok = cur.next()
        return out

    def _record(self, txn: Any, rid: bytes) -> LifecycleRecord:
        rec = LifecycleRecord()
        rec.ParseFromString(bytes(txn.get(rid, db=self.records)))
        return rec
