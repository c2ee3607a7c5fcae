"""The catalog in LMDB: manifests and the indexes and aggregates that find them.

    manifests   manifest id -> manifest bytes (exact, as hashed)
    versions    sop uid \\0 hlc(8, big-endian) manifest id -> ''   (last key = current)
    studies     study uid \\0 series uid \\0 sop uid -> ''
    files       whole-file hash -> manifest id                     (duplicate detection)
    held        manifest id -> verified-at ms (8)                  (every chunk held here)
    need        partition(4) manifest id -> size(8)                (known, chunks not here)
    part_need   partition(4) -> count(8) bytes(8)                  (the fetch backlog)
    study_recs  study uid -> StudyRecord                          (aggregates, digests)
    partitions  partition(4) -> AdHash(32) count(8)               (anti-entropy, level 0)
    part_held   partition(4) -> AdHash(32) count(8)               (held current versions:
                                                                   holdings exchange, level 0)
    part_study  partition(4) study uid -> ''
    held_studies partition(4) study uid -> ''                    (something held here)
    safety_dirty study uid -> mark(8)                           (to be judged again; the mark
                                                                   is new at every change)
    safety      study uid -> safe copies(1) unsafe(1)             (as the cluster last judged)
    unsafe      first received ms(8) study uid -> ''               (short of copies, oldest first)
    meta        b"partitions" -> P (fixed when the catalog is created),
                b"format" -> 2 (need by partition, part_held, safety),
                b"catalog_format" -> 2 (the study indexes below are complete)
    by_patient, by_date, by_accession: value \\0 study uid -> '' (node/study_index.py)
    text_check  manifest id -> ''                  (text to re-decode: node/charset_repair.py)
    text_fix    manifest id -> Manifest holding only its re-decoded text fields
    chunk_users, loose, pack_live: what garbage collection needs (node/chunkrefs.py)

`need` is keyed by partition so a node finds what placement asks it to fetch
by reading its own partitions only, from a cursor, however many manifests of
other partitions it knows without holding. The per-partition aggregates let
every periodic comparison start from P small values, never from the archive.

Every write happens inside the caller's transaction (the group commit), so the
catalog never names a manifest as held whose chunks are not durably indexed,
and aggregates never disagree with what they count.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import blake3

from pacsmesh.node import manifest as mf
from pacsmesh.node.charset import maybe_misdecoded
from pacsmesh.node.chunkrefs import ChunkRefs
from pacsmesh.node.dicom_layout import TEXT_FIELDS
from pacsmesh.node.errors import ConfigError, InvalidInstance, StudyDeleted
from pacsmesh.node.expiry_index import ExpiryIndex, expiry_of
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.retention import RetentionSection, retain_inputs
from pacsmesh.node.study_index import StudyIndexes, indexed_values, split_key
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)
SEP = b"\x00"
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U64U64 = struct.Struct(">QQ")
ADHASH_MOD = 1 << 256
DIGEST_LEN = 32
EMPTY_DIGEST = bytes(DIGEST_LEN)
FORMAT = 2  # 2: need keyed by partition, part_held, safety (1: not_held keyed by id)
MIGRATE_BATCH = 10_000  # records per transaction when an old data dir is upgraded
# keys read from one random start in a partition when sampling studies: a partition
# this small (~4M studies in all at P=1024) is sampled exactly uniformly
SAMPLE_WINDOW = 4096

TEXT_CHECKS_QUEUED_KEY = b"text_checks_queued"  # resume point, then b"done"
# study record fields a manifest's text sets (Catalog.add)
RECORD_TEXT_FIELDS = frozenset({"patient_id", "patient_name", "accession_number",
                                "study_description"})

# (key, study uid, record) as read in key order by `Catalog.scan`
Scanned = tuple[bytes, str, node_pb2.StudyRecord | None]


def element_hash(manifest_id: bytes) -> int:
    return int.from_bytes(blake3.blake3(b"pacsmesh-set\x00" + manifest_id).digest(), "big")


def digest_add(digest: bytes, manifest_id: bytes, sign: int = 1) -> bytes:
    """AdHash: the set's digest is the sum of its elements' hashes mod 2^256."""
    value = (int.from_bytes(digest or EMPTY_DIGEST, "big") + sign * element_hash(manifest_id))
    return (value % ADHASH_MOD).to_bytes(DIGEST_LEN, "big")


def needs_text_check(m: node_pb2.Manifest) -> bool:
    """Might this manifest's text be another character set's bytes read as Latin-1?"""
    return any(maybe_misdecoded(getattr(m, name)) for name in TEXT_FIELDS)


def mark_dirty(txn: Any, db: Any, studies: Iterable[str]) -> None:
    """Ask for these studies' safety to be judged again, in the transaction that changed
    what it depends on: a crash can never lose the request. A fresh mark each time lets
    the judge tell a study changed again while it was being judged."""
    for study in studies:
        txn.put(study.encode(), os.urandom(8), db=db)


def partition_of(study_uid: str, partitions: int) -> int:
    """The partition of a study: the same rule cluster/placement uses."""
    digest = blake3.blake3(study_uid.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


@dataclass
class StudyInfo:
    study_uid: str
    patient_id: str = ""
    study_date: str = ""
    modalities: set[str] = field(default_factory=set)
    instances: int = 0
    bytes: int = 0
    held_instances: int = 0


class Catalog:
    def __init__(self, env: Any, partitions: int = 1024,
                 chunk_refs: ChunkRefs | None = None,
                 retention: RetentionSection | None = None) -> None:
        self.env = env
        self.chunk_refs = chunk_refs or ChunkRefs(env)
        self.expiry = ExpiryIndex(env, retention or RetentionSection())
        self.partitions = partitions
        self.manifests = env.open_db(b"manifests")
        self.versions = env.open_db(b"versions")
        self.studies = env.open_db(b"studies")
        self.files = env.open_db(b"files")
        self.held = env.open_db(b"held")
        self.need = env.open_db(b"need")
        self.part_need = env.open_db(b"part_need")
        self.study_recs = env.open_db(b"study_recs")
        self.partition_db = env.open_db(b"partitions")
        self.part_held = env.open_db(b"part_held")
        self.part_study = env.open_db(b"part_study")
        self.held_studies = env.open_db(b"held_studies")
        self.safety_dirty = env.open_db(b"safety_dirty")
        self.safety = env.open_db(b"safety")
        self.unsafe = env.open_db(b"unsafe")
        self.meta = env.open_db(b"meta")
        self.refs = env.open_db(b"chunk_refs")  # chunk hash + manifest id -> '' (held ones)
        # manifests unheld because a chunk was found damaged: their chunks stay counted
        # as needed (GC keeps the good ones) until repaired, trimmed or deleted
        self.damaged = env.open_db(b"unheld_damaged")
        with env.begin(write=True, db=self.meta) as txn:
            stored = txn.get(b"partitions")
            if stored is None:
                txn.put(b"partitions", _U32.pack(partitions))
            elif _U32.unpack(stored)[0] != partitions:
                raise ConfigError(
                    f"this data dir was created for {_U32.unpack(stored)[0]} partitions, the "
                    f"config says {partitions}; the partition count is fixed for a cluster")
        self.text_check = env.open_db(b"text_check")
        self.text_fix = env.open_db(b"text_fix")
        self.indexes = StudyIndexes(env)
        self.indexes.backfill(self.study_recs, self.meta)
        self._upgrade()
        self._queue_text_checks()
        self.expiry.rebuild_if_needed(self.study_recs, self._fill_retention)

    # ---- writes (inside the group commit) ----------------------------------------

    def add(self, txn: Any, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest,
            held_at_ms: int | None) -> bool:
        """Record a manifest; False if it was known already (a set: adding is idempotent).
        `held_at_ms`: every chunk is durably here, verified at that time. Raises
        InvalidInstance, leaving nothing written, for a version of a known instance in
        another study or series."""
        if (why := self.refusal(txn, m)) is not None:
            raise StudyDeleted(why)
        if txn.delete(m.study_instance_uid.encode(), db=self.expiry.deleted):
            LOGGER.warning("study %s, deleted here when its retention expired, is stored "
                           "again: a version this node had not seen keeps it longer",
                           m.study_instance_uid, extra={"study": m.study_instance_uid})
        if not txn.put(manifest_id, raw, db=self.manifests, overwrite=False):
            if held_at_ms is not None:
                self.set_held(txn, manifest_id, m, held_at_ms)
            return False
        sop = m.sop_instance_uid.encode()
        previous = self.current_id(txn, m.sop_instance_uid)
        if previous is not None:
            # the aggregates count an instance in the study of its versions: one in two
            # would be restored with both, and drive a study's counts below zero
            old = self._manifest(txn, previous)
            place = (m.study_instance_uid, m.series_instance_uid)
            if (old.study_instance_uid, old.series_instance_uid) != place:
                txn.delete(manifest_id, db=self.manifests)
                raise InvalidInstance(
                    f"instance {m.sop_instance_uid} is stored in study "
                    f"{old.study_instance_uid} series {old.series_instance_uid}; a version in "
                    f"study {place[0]} series {place[1]} is refused")
        txn.put(sop + SEP + _U64.pack(m.received_hlc) + manifest_id, b"", db=self.versions)
        txn.put(SEP.join((m.study_instance_uid.encode(), m.series_instance_uid.encode(), sop)),
                b"", db=self.studies)
        txn.put(m.file_hash, manifest_id, db=self.files, overwrite=False)
        if needs_text_check(m):  # e.g. made by a peer still on the old decoding
            txn.put(manifest_id, b"", db=self.text_check)
        partition = partition_of(m.study_instance_uid, self.partitions)
        txn.put(_U32.pack(partition) + m.study_instance_uid.encode(), b"", db=self.part_study)
        self._partition_add(txn, partition, manifest_id)

        rec = self._record(txn, m.study_instance_uid)
        before = indexed_values(rec)
        expiry_before = self.expiry.key(rec) if rec is not None else b""
        if rec is None:  # a new study is unsafe until the cluster says otherwise
            rec = node_pb2.StudyRecord(study_uid=m.study_instance_uid, partition=partition,
                                       first_received_ms=m.received_hlc >> 16)
            self._put_safety(txn, rec, 0, True)
        elif (m.received_hlc >> 16) < rec.first_received_ms:
            safe_copies, unsafe = self._safety(txn, rec.study_uid)
            self._put_safety(txn, rec, safe_copies, False)  # off the index at the old age
            rec.first_received_ms = m.received_hlc >> 16
            self._put_safety(txn, rec, safe_copies, unsafe)
        rec.manifests += 1
        rec.all_digest = digest_add(rec.all_digest, manifest_id)
        if self.current_id(txn, m.sop_instance_uid) == manifest_id:  # the new current version
            if previous is not None:
                old = self._manifest(txn, previous)
                rec.current_digest = digest_add(rec.current_digest, previous, -1)
                rec.bytes -= old.size
                rec.instances -= 1
                if txn.get(previous, db=self.held) is not None:
                    rec.held_digest = digest_add(rec.held_digest, previous, -1)
                    rec.held_instances -= 1
                    # the partition's digest sums its studies' held digests: keep it so
                    self._partition_held(txn, partition, previous, -1)
            rec.current_digest = digest_add(rec.current_digest, manifest_id)
            rec.bytes += m.size
            rec.instances += 1
            if previous is None:
                self._count(txn, b"instances", 1)
            for name in ("patient_id", "patient_name", "study_date", "accession_number",
                         "study_description", "patient_birth_date"):
                if value := getattr(m, name):
                    setattr(rec, name, value)
            if m.modality and m.modality not in rec.modalities:
                rec.modalities.append(m.modality)
            self.indexes.update(txn, m.study_instance_uid, before, rec)
        _merge_retention(rec, m)
        self.expiry.update(txn, expiry_before, rec)
        txn.put(m.study_instance_uid.encode(), rec.SerializeToString(), db=self.study_recs)
        self._held_index(txn, rec)
        mark_dirty(txn, self.safety_dirty, [rec.study_uid])
        if held_at_ms is not None:
            self.set_held(txn, manifest_id, m, held_at_ms)
        else:
            self._need(txn, partition, manifest_id, m.size, +1)
        return True

    def _need(self, txn: Any, partition: int, manifest_id: bytes, size: int, sign: int) -> None:
        """Add to or take from the fetch backlog (idempotent per manifest)."""
        key = _U32.pack(partition) + manifest_id
        if sign > 0:
            if not txn.put(key, _U64.pack(size), db=self.need, overwrite=False):
                return
        elif not txn.delete(key, db=self.need):
            return
        pkey = _U32.pack(partition)
        raw = txn.get(pkey, db=self.part_need)
        count, total = _U64U64.unpack(raw) if raw is not None else (0, 0)
        count, total = count + sign, total + sign * size
        if count:
            txn.put(pkey, _U64U64.pack(count, total), db=self.part_need)
        else:
            txn.delete(pkey, db=self.part_need)

    def _count(self, txn: Any, name: bytes, delta: int) -> None:
        raw = txn.get(name, db=self.meta)
        txn.put(name, _U64.pack((_U64.unpack(raw)[0] if raw else 0) + delta), db=self.meta)

    def instance_count(self) -> int:
        """Instances (distinct SOP instance uids) in the catalog: a counter, not a scan."""
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(b"instances")
        return _U64.unpack(raw)[0] if raw else 0

    def study_page(self, after: str, limit: int) -> list[node_pb2.StudyRecord]:
        """Study records in uid order after `after`: one short read transaction."""
        out: list[node_pb2.StudyRecord] = []
        with self.env.begin(db=self.study_recs) as txn:
            cur = txn.cursor()
            if not cur.set_range(after.encode() + (b"\x00" if after else b"")):
                return out
            for raw in cur.iternext(keys=False):
                rec = node_pb2.StudyRecord()
                rec.ParseFromString(bytes(raw))
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def set_held(self, txn: Any, manifest_id: bytes, m: node_pb2.Manifest, at_ms: int) -> None:
        was_held = txn.get(manifest_id, db=self.held) is not None
        txn.put(manifest_id, _U64.pack(at_ms), db=self.held)
        self._need(txn, partition_of(m.study_instance_uid, self.partitions), manifest_id,
                   m.size, -1)
        if not was_held:  # so a damaged chunk leads to the instances that need it
            for c in m.chunks:
                txn.put(c.hash + manifest_id, b"", db=self.refs)
            if not txn.delete(manifest_id, db=self.damaged):  # (else still counted)
                self.chunk_refs.hold(txn, (c.hash for c in m.chunks))
        if not was_held and self.current_id(txn, m.sop_instance_uid) == manifest_id:
            self._adjust_held(txn, m.study_instance_uid, manifest_id, +1)

    def unset_held(self, txn: Any, manifest_id: bytes, m: node_pb2.Manifest,
                   damaged: bool = False) -> None:
        """A copy was dropped (trimmed) or found bad (`damaged`): it must not count any
        more. A damaged one keeps its chunks counted as needed: the good ones stay for
        the repair, which fetches only what is bad."""
        if not txn.delete(manifest_id, db=self.held):
            if not damaged and txn.delete(manifest_id, db=self.damaged):
                self.chunk_refs.release(txn, (c.hash for c in m.chunks))  # trimmed after all
            return
        if damaged:
            txn.put(manifest_id, b"", db=self.damaged)
        else:
            self.chunk_refs.release(txn, (c.hash for c in m.chunks))  # GC may reclaim them
        self._need(txn, partition_of(m.study_instance_uid, self.partitions), manifest_id,
                   m.size, +1)
        if self.current_id(txn, m.sop_instance_uid) == manifest_id:
            self._adjust_held(txn, m.study_instance_uid, manifest_id, -1)

    def forget_chunk_refs(self, txn: Any, chunk: bytes) -> None:
        """A reclaimed chunk: drop its `refs` entries (of manifests once held here)."""
        cur = txn.cursor(db=self.refs)
        ok = cur.set_range(chunk)
        while ok and bytes(cur.key()).startswith(chunk):
            ok = cur.delete()

    def _adjust_held(self, txn: Any, study_uid: str, manifest_id: bytes, sign: int) -> None:
        rec = self._record(txn, study_uid)
        assert rec is not None, study_uid
        rec.held_digest = digest_add(rec.held_digest, manifest_id, sign)
        rec.held_instances += sign
        txn.put(study_uid.encode(), rec.SerializeToString(), db=self.study_recs)
        self._held_index(txn, rec)
        mark_dirty(txn, self.safety_dirty, [study_uid])
        self._partition_held(txn, rec.partition, manifest_id, sign)

    def _held_index(self, txn: Any, rec: node_pb2.StudyRecord) -> None:
        """Studies with something held here, by partition: trim and the holdings
        exchange read only those, not every study the node knows."""
        key = _U32.pack(rec.partition) + rec.study_uid.encode()
        if rec.held_instances > 0:
            txn.put(key, b"", db=self.held_studies)
        else:
            txn.delete(key, db=self.held_studies)

    def _partition_held(self, txn: Any, partition: int, manifest_id: bytes, sign: int) -> None:
        key = _U32.pack(partition)
        raw = txn.get(key, db=self.part_held)
        digest, count = (bytes(raw[:DIGEST_LEN]), _U64.unpack(raw[DIGEST_LEN:])[0]) if raw else (
            EMPTY_DIGEST, 0)
        count += sign
        if count:
            txn.put(key, digest_add(digest, manifest_id, sign) + _U64.pack(count),
                    db=self.part_held)
        else:
            txn.delete(key, db=self.part_held)

    # ---- safety, as judged by the cluster ------------------------------------------

    def study_unsafe(self, study_uid: str) -> bool:
        """As the cluster last judged it (a study not judged yet is unsafe)."""
        with self.env.begin() as txn:
            return self._safety(txn, study_uid)[1]

    def _safety(self, txn: Any, study_uid: str) -> tuple[int, bool]:
        raw = txn.get(study_uid.encode(), db=self.safety)
        return (raw[0], bool(raw[1])) if raw is not None else (0, True)

    def _put_safety(self, txn: Any, rec: node_pb2.StudyRecord, safe_copies: int,
                    unsafe: bool) -> None:
        key = _U64.pack(rec.first_received_ms) + rec.study_uid.encode()
        txn.put(rec.study_uid.encode(), bytes((min(safe_copies, 255), unsafe)), db=self.safety)
        if unsafe:
            txn.put(key, b"", db=self.unsafe)
        else:
            txn.delete(key, db=self.unsafe)

    def dirty_page(self, limit: int) -> list[tuple[str, bytes]]:
        """Studies to judge again, with their marks (oldest keys first)."""
        with self.env.begin(db=self.safety_dirty) as txn:
            return [(bytes(k).decode(), bytes(v)) for k, v in
                    itertools.islice(txn.cursor().iternext(), limit)]

    def dirty_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.safety_dirty)["entries"])

    def set_safety(self, judged: Iterable[tuple[str, int, bool]],
                   marks: Iterable[tuple[str, bytes]] = (),
                   flips: list[tuple[str, bool]] | None = None) -> int:
        """Record (study, safe copies, unsafe) verdicts in one transaction, and clear the
        dirty marks they answer (unless a study was marked again meanwhile: then it is
        judged again). Returns how many verdicts changed; `flips` gets (study, unsafe now)
        for each study that became unsafe or safe (one never judged counts as unsafe).
        Counts come from the index sizes, so status never recounts."""
        changed = 0
        with self.env.begin(write=True) as txn:
            for study_uid, mark in marks:
                if txn.get(study_uid.encode(), db=self.safety_dirty) == mark:
                    txn.delete(study_uid.encode(), db=self.safety_dirty)
            for study_uid, safe_copies, unsafe in judged:
                rec = self._record(txn, study_uid)
                if rec is None:
                    continue
                before = self._safety(txn, study_uid)
                if before == (min(safe_copies, 255), unsafe):
                    continue
                self._put_safety(txn, rec, safe_copies, unsafe)
                changed += 1
                if flips is not None and before[1] != unsafe:
                    flips.append((study_uid, unsafe))
        return changed

    def safe_copies_of(self, study_uid: str) -> int:
        with self.env.begin() as txn:
            return self._safety(txn, study_uid)[0]

    def safety_counts(self) -> tuple[int, int, int | None]:
        """(studies, unsafe studies, first received ms of the oldest unsafe one)."""
        with self.env.begin() as txn:
            studies = int(txn.stat(self.study_recs)["entries"])
            unsafe = int(txn.stat(self.unsafe)["entries"])
            cur = txn.cursor(db=self.unsafe)
            oldest = _U64.unpack(bytes(cur.key()[:8]))[0] if cur.first() else None
            return studies, unsafe, oldest

    def unsafe_key(self, study_uid: str) -> bytes:
        """A study's key in the unsafe index (b"" if it has no record)."""
        rec = self.study_record(study_uid)
        return _U64.pack(rec.first_received_ms) + study_uid.encode() if rec else b""

    def _partition_add(self, txn: Any, partition: int, manifest_id: bytes) -> None:
        key = _U32.pack(partition)
        raw = txn.get(key, db=self.partition_db)
        digest, count = (bytes(raw[:DIGEST_LEN]), _U64.unpack(raw[DIGEST_LEN:])[0]) if raw else (
            EMPTY_DIGEST, 0)
        txn.put(key, digest_add(digest, manifest_id) + _U64.pack(count + 1),
                db=self.partition_db)

    def _record(self, txn: Any, study_uid: str) -> node_pb2.StudyRecord | None:
        # lookups take keys from requests and peers: an empty one names nothing (LMDB
        # would raise for it)
        raw = txn.get(study_uid.encode(), db=self.study_recs) if study_uid else None
        if raw is None:
            return None
        rec = node_pb2.StudyRecord()
        rec.ParseFromString(bytes(raw))
        return rec

    def _manifest(self, txn: Any, manifest_id: bytes) -> node_pb2.Manifest:
        raw = txn.get(manifest_id, db=self.manifests)
        assert raw is not None, manifest_id.hex()
        return mf.decode(bytes(raw))

    # ---- reads ------------------------------------------------------------------

    def file_known(self, file_hash: bytes) -> bytes | None:
        """The manifest of these exact bytes, if this node holds it."""
        with self.env.begin() as txn:
            value = txn.get(file_hash, db=self.files)
            if value is None or txn.get(bytes(value), db=self.held) is None:
                return None
            return bytes(value)

    def manifest_of_file(self, file_hash: bytes) -> tuple[bytes, bytes] | None:
        """(id, raw) of a manifest of these exact bytes, held here or not."""
        with self.env.begin() as txn:
            mid = txn.get(file_hash, db=self.files)
            if mid is None:
                return None
            raw = txn.get(bytes(mid), db=self.manifests)
            return (bytes(mid), bytes(raw)) if raw is not None else None

    def known_files(self, hashes: list[bytes]) -> list[bytes]:
        with self.env.begin() as txn:
            out = []
            for h in hashes:
                mid = txn.get(h, db=self.files) if h else None
                if mid is not None and txn.get(bytes(mid), db=self.held) is not None:
                    out.append(h)
            return out

    def get(self, manifest_id: bytes) -> tuple[bytes, node_pb2.Manifest] | None:
        """A manifest exactly as it was stored, else None. Peers derive a manifest's id
        from its bytes: a damaged one served would reach them as a new version."""
        with self.env.begin(db=self.manifests) as txn:
            raw = txn.get(manifest_id) if manifest_id else None
        if raw is None:
            return None
        raw = bytes(raw)
        if content_hash(raw) != manifest_id:  # LMDB keeps no checksums of its own
            LOGGER.error("manifest %s is damaged in the catalog; not used",
                         manifest_id.hex()[:16])
            return None
        return raw, mf.decode(raw)

    def has(self, manifest_id: bytes) -> bool:
        with self.env.begin(db=self.manifests) as txn:
            return bool(manifest_id) and txn.get(manifest_id) is not None

    def unknown(self, ids: list[bytes]) -> list[bytes]:
        with self.env.begin(db=self.manifests) as txn:
            return [i for i in ids if not i or txn.get(i) is None]

    def is_held(self, manifest_id: bytes) -> bool:
        with self.env.begin(db=self.held) as txn:
            return txn.get(manifest_id) is not None

    def held_at_ms(self, manifest_id: bytes) -> int | None:
        with self.env.begin(db=self.held) as txn:
            raw = txn.get(manifest_id)
        return _U64.unpack(raw)[0] if raw is not None else None

    def current_id(self, txn: Any, sop_uid: str) -> bytes | None:
        prefix = sop_uid.encode() + SEP
        cur = txn.cursor(db=self.versions)
        last: bytes | None = None
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if not key.startswith(prefix):
                    break
                last = bytes(key[len(prefix) + 8 :])
        return last

    def versions_of(self, sop_uid: str) -> list[bytes]:
        prefix = sop_uid.encode() + SEP
        with self.env.begin(db=self.versions) as txn:
            cur = txn.cursor()
            out = []
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    out.append(bytes(key[len(prefix) + 8 :]))
            return out

    def study_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """(series uid, sop uid) of every instance of a study, in key order."""
        prefix = study_uid.encode() + SEP
        out = []
        with self.env.begin(db=self.studies) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    _, series, sop = bytes(key).split(SEP)
                    out.append((series.decode(), sop.decode()))
        return out

    def current_manifests(self, study_uid: str) -> list[tuple[bytes, bytes, node_pb2.Manifest]]:
        """(id, raw, manifest) of the current version of each instance of a study."""
        out = []
        instances = self.study_instances(study_uid)
        with self.env.begin() as txn:
            for _, sop in instances:
                mid = self.current_id(txn, sop)
                if mid is None:
                    continue
                raw = txn.get(mid, db=self.manifests)
                if raw is not None:
                    out.append((mid, bytes(raw), mf.decode(bytes(raw))))
        return out

    def study_manifest_ids(self, study_uid: str) -> list[bytes]:
        """Every version of every instance of a study (anti-entropy's leaf level)."""
        out: list[bytes] = []
        for _, sop in self.study_instances(study_uid):
            out.extend(self.versions_of(sop))
        return out

    def study_uids(self) -> Iterator[str]:
        with self.env.begin(db=self.study_recs) as txn:
            for key in txn.cursor().iternext(values=False):
                yield bytes(key).decode()

    def study_record(self, study_uid: str) -> node_pb2.StudyRecord | None:
        with self.env.begin() as txn:
            return self._record(txn, study_uid)

    def study_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.study_recs)["entries"])

    def scan(self, index: str, start: bytes, count: int,
             within: Callable[[bytes], bool] | None = None) -> list[Scanned]:
        """Up to `count` studies in key order from `start` (inclusive; b"" = the first)
        of `index` ("" = study_recs, by study uid; else a field of study_index), with
        their records, stopping at the first key `within` rejects. One short read
        transaction: LMDB cannot reuse freed pages while a reader stays open."""
        db = (self.unsafe if index == "unsafe" else self.expiry.db if index == "expires"
              else self.indexes.dbs[index] if index else self.study_recs)
        out: list[Scanned] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=db)
            ok = cur.set_range(start) if start else cur.first()
            while ok and len(out) < count:
                key = bytes(cur.key())
                if within is not None and not within(key):
                    break
                if index == "unsafe":
                    uid = key[8:].decode()
                    rec = self._record(txn, uid)
                elif index:
                    uid = split_key(key)[1]
                    rec = self._record(txn, uid)
                else:
                    uid = key.decode()
                    rec = node_pb2.StudyRecord()
                    rec.ParseFromString(bytes(cur.value()))
                out.append((key, uid, rec))
                ok = cur.next()
        return out

    def sample_study_uids(self, count: int, rng: random.Random) -> list[str]:
        """About `count` random study uids (distinct), without walking the catalog: each
        from a random partition, drawn from up to SAMPLE_WINDOW of its studies read
        from a random point (wrapping round)."""
        out: dict[str, None] = {}
        for _ in range(count):
            with self.env.begin(db=self.part_study) as txn:
                uid = self._sample_partition(txn.cursor(), rng.randrange(self.partitions), rng)
            if uid is not None:
                out[uid] = None
        return list(out)

    def _sample_partition(self, cur: Any, partition: int, rng: random.Random) -> str | None:
        prefix = _U32.pack(partition)
        if not cur.set_range(prefix) or not bytes(cur.key()).startswith(prefix):
            return None  # an empty partition
        first = bytes(cur.key())
        # its last key: just before the next partition's first, else the last of all
        if partition + 1 < self.partitions and cur.set_range(_U32.pack(partition + 1)):
            cur.prev()
        else:
            cur.last()
        keys = _window(cur, prefix, _between(first, bytes(cur.key()), rng), SAMPLE_WINDOW)
        if len(keys) < SAMPLE_WINDOW:  # wrap round to the partition's start
            keys += _window(cur, prefix, first, SAMPLE_WINDOW - len(keys),
                            keys[0] if keys else None)
        return rng.choice(keys)[len(prefix):].decode()

    def study_records_of(self, study_uids: Iterable[str]) -> dict[str, node_pb2.StudyRecord]:
        """The records of these studies (those that exist), in one read transaction."""
        out = {}
        with self.env.begin() as txn:
            for uid in study_uids:
                rec = self._record(txn, uid)
                if rec is not None:
                    out[uid] = rec
        return out

    def study_info(self, study_uid: str) -> StudyInfo:
        rec = self.study_record(study_uid)
        if rec is None:
            return StudyInfo(study_uid=study_uid)
        return StudyInfo(study_uid=study_uid, patient_id=rec.patient_id,
                         study_date=rec.study_date, modalities=set(rec.modalities),
                         instances=rec.instances, bytes=rec.bytes,
                         held_instances=rec.held_instances)

    def manifests_using(self, chunk: bytes) -> list[bytes]:
        """Manifests held here (or once held) that name this chunk."""
        out = []
        with self.env.begin(db=self.refs) as txn:
            cur = txn.cursor()
            if cur.set_range(chunk):
                for key in cur.iternext(values=False):
                    if not key.startswith(chunk):
                        break
                    out.append(bytes(key[len(chunk) :]))
        return out

    def partition_digests(self) -> list[tuple[bytes, int]]:
        """(digest, manifest count) of every partition, index = partition."""
        out = [(EMPTY_DIGEST, 0)] * self.partitions
        with self.env.begin(db=self.partition_db) as txn:
            for key, raw in txn.cursor():
                out[_U32.unpack(key)[0]] = (bytes(raw[:DIGEST_LEN]),
                                            _U64.unpack(raw[DIGEST_LEN:])[0])
        return out

    def need_page(self, partition: int, after: bytes, limit: int) -> list[bytes]:
        """Known manifests of one partition whose chunks are not here, in id order,
        after `after` (b"" from the start). A cursor over these pages reaches every
        one however many there are in other partitions."""
        prefix = _U32.pack(partition)
        out: list[bytes] = []
        with self.env.begin(db=self.need) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix + after + (b"\x00" if after else b"")):
                return out
            for key in cur.iternext(values=False):
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                out.append(bytes(key[4:]))
        return out

    def need_totals(self) -> dict[int, tuple[int, int]]:
        """partition -> (manifests, bytes) known here but not held (non-empty ones)."""
        with self.env.begin(db=self.part_need) as txn:
            return {_U32.unpack(k)[0]: _U64U64.unpack(v) for k, v in txn.cursor()}

    def held_in_partition(self, partition: int) -> int:
        """Current versions held here in one partition (one read)."""
        with self.env.begin(db=self.part_held) as txn:
            raw = txn.get(_U32.pack(partition))
        return _U64.unpack(raw[DIGEST_LEN:])[0] if raw is not None else 0

    def held_partition_digests(self) -> list[tuple[bytes, int]]:
        """(AdHash of held current versions, their count) per partition."""
        out = [(EMPTY_DIGEST, 0)] * self.partitions
        with self.env.begin(db=self.part_held) as txn:
            for key, raw in txn.cursor():
                out[_U32.unpack(key)[0]] = (bytes(raw[:DIGEST_LEN]),
                                            _U64.unpack(raw[DIGEST_LEN:])[0])
        return out

    def partition_study_page(self, partition: int, after: str, limit: int,
                             held_only: bool = False) -> list[node_pb2.StudyRecord]:
        """Study records of one partition in uid order after `after` (`held_only`: those
        with something held here): one short read."""
        prefix = _U32.pack(partition)
        out: list[node_pb2.StudyRecord] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.held_studies if held_only else self.part_study)
            if not cur.set_range(prefix + after.encode() + (b"\x00" if after else b"")):
                return out
            for key in cur.iternext(values=False):
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                rec = self._record(txn, bytes(key[4:]).decode())
                if rec is not None:
                    out.append(rec)
        return out

    # ---- upgrade of an older data dir ----------------------------------------------

    def _upgrade(self) -> None:
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(b"format")
        if raw is not None and _U32.unpack(raw)[0] >= FORMAT:
            return
        with self.env.begin() as txn:
            fresh = txn.stat(self.manifests)["entries"] == 0
        if fresh:
            with self.env.begin(write=True, db=self.meta) as txn:
                txn.put(b"format", _U32.pack(FORMAT))
            return
        old = self.env.open_db(b"not_held")
        while True:  # bounded transactions: an old archive may be large
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=old)
                moved = 0
                keys = [bytes(k) for k in itertools.islice(cur.iternext(values=False),
                                                          MIGRATE_BATCH)]
                for mid in keys:
                    txn.delete(mid, db=old)
                    raw_m = txn.get(mid, db=self.manifests)
                    if raw_m is not None:
                        m = mf.decode(bytes(raw_m))
                        self._need(txn, partition_of(m.study_instance_uid, self.partitions),
                                   mid, m.size, +1)
                    moved += 1
            if moved < MIGRATE_BATCH:
                break
        after = b""
        while True:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self.study_recs)
                if not cur.set_range(after):
                    break
                n = 0
                for key, raw_rec in cur:
                    if bytes(key) == after:
                        continue
                    rec = node_pb2.StudyRecord()
                    rec.ParseFromString(bytes(raw_rec))
                    self._upgrade_study(txn, rec)
                    after = bytes(key)
                    n += 1
                    if n >= MIGRATE_BATCH:
                        break
            if n < MIGRATE_BATCH:
                break
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(b"format", _U32.pack(FORMAT))
            txn.put(b"safety_sweep", b"1")  # the cluster judges every study once

    def _upgrade_study(self, txn: Any, rec: node_pb2.StudyRecord) -> None:
        self._held_index(txn, rec)
        self._count(txn, b"instances", rec.instances)
        if txn.get(rec.study_uid.encode(), db=self.safety) is None:
            self._put_safety(txn, rec, 0, True)
        if rec.held_instances:
            key = _U32.pack(rec.partition)
            raw = txn.get(key, db=self.part_held)
            digest, count = ((bytes(raw[:DIGEST_LEN]), _U64.unpack(raw[DIGEST_LEN:])[0])
                             if raw else (EMPTY_DIGEST, 0))
            total = (int.from_bytes(digest, "big") + int.from_bytes(rec.held_digest, "big"))
            txn.put(key, (total % ADHASH_MOD).to_bytes(DIGEST_LEN, "big")
                    + _U64.pack(count + rec.held_instances), db=self.part_held)

    def _queue_text_checks(self) -> None:
        """Once per data dir: queue every manifest whose text an older version may have
        decoded with the wrong character set (node/charset_repair.py re-reads them).
        Bounded transactions, resumable, like the index backfill."""
        with self.env.begin(db=self.meta) as txn:
            if txn.get(TEXT_CHECKS_QUEUED_KEY) == b"done":
                return
            after = bytes(txn.get(TEXT_CHECKS_QUEUED_KEY) or b"")
        queued = 0
        while True:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self.manifests)
                ok = cur.set_range(after + b"\x00") if after else cur.first()
                n = 0
                while ok and n < MIGRATE_BATCH:
                    after, n = bytes(cur.key()), n + 1
                    if needs_text_check(mf.decode(bytes(cur.value()))):
                        txn.put(after, b"", db=self.text_check)
                        queued += 1
                    ok = cur.next()
                txn.put(TEXT_CHECKS_QUEUED_KEY, after if ok else b"done", db=self.meta)
            if not ok:
                break
        if queued:
            LOGGER.info("%d instances queued to re-decode their text with their own "
                        "character set", queued)

    def text_checks(self, after: bytes, limit: int
                    ) -> list[tuple[bytes, node_pb2.Manifest]]:
        """Manifests queued for a text check, in id order after `after`."""
        out: list[tuple[bytes, node_pb2.Manifest]] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.text_check)
            ok = cur.set_range(after + b"\x00") if after else cur.first()
            while ok and len(out) < limit:
                mid = bytes(cur.key())
                raw = txn.get(mid, db=self.manifests)
                if raw is not None:
                    out.append((mid, mf.decode(bytes(raw))))
                ok = cur.next()
        return out

    def text_checks_left(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.text_check)["entries"])

    def text_checked(self, manifest_id: bytes, fixes: dict[str, str]) -> None:
        """Record a manifest's re-decoded text (`fixes`: field -> text, only those that
        differ) and take it off the queue. The study record takes the new text where
        it holds this manifest's old text and the manifest is the current version."""
        with self.env.begin(write=True) as txn:
            txn.delete(manifest_id, db=self.text_check)
            if not fixes:
                return
            raw = txn.get(manifest_id, db=self.manifests)
            if raw is None:
                return
            m = mf.decode(bytes(raw))
            fix = node_pb2.Manifest()
            for name, text in fixes.items():
                setattr(fix, name, text)
            txn.put(manifest_id, fix.SerializeToString(), db=self.text_fix)
            rec = self._record(txn, m.study_instance_uid)
            if rec is None or self.current_id(txn, m.sop_instance_uid) != manifest_id:
                return
            before = indexed_values(rec)
            for name, text in fixes.items():
                if name in RECORD_TEXT_FIELDS and getattr(rec, name) == getattr(m, name):
                    setattr(rec, name, text)
            self.indexes.update(txn, rec.study_uid, before, rec)
            txn.put(rec.study_uid.encode(), rec.SerializeToString(), db=self.study_recs)

    def with_text_fixes(self, found: list[tuple[bytes, bytes, node_pb2.Manifest]]
                        ) -> list[node_pb2.Manifest]:
        """The manifests of `current_manifests`, their text re-decoded where it was
        (copies: the stored bytes never change, they are the manifest's id)."""
        out = []
        with self.env.begin(db=self.text_fix) as txn:
            for mid, _, m in found:
                fix = txn.get(mid)
                if fix is None:
                    out.append(m)
                    continue
                fixed = node_pb2.Manifest()
                fixed.CopyFrom(m)
                fixed.MergeFromString(bytes(fix))
                out.append(fixed)
        return out

    # ---- retention ----------------------------------------------------------------

    def _fill_retention(self, txn: Any, rec: node_pb2.StudyRecord) -> bool:
        """A record from before retention inputs were kept: fold in every version."""
        if rec.retain_date or rec.retain_birth or rec.retain_birth_bad or not rec.manifests:
            return False
        for mid in self._study_manifest_ids(txn, rec.study_uid):
            raw = txn.get(mid, db=self.manifests)
            if raw is not None:
                _merge_retention(rec, mf.decode(bytes(raw)))
        return True

    def _study_manifest_ids(self, txn: Any, study_uid: str) -> list[bytes]:
        prefix = study_uid.encode() + SEP
        sops: list[bytes] = []
        cur = txn.cursor(db=self.studies)
        ok = cur.set_range(prefix)
        while ok and bytes(cur.key()).startswith(prefix):
            sops.append(bytes(cur.key()).rsplit(SEP, 1)[1])
            ok = cur.next()
        out: list[bytes] = []
        vcur = txn.cursor(db=self.versions)
        for sop in sops:
            vprefix = sop + SEP
            ok = vcur.set_range(vprefix)
            while ok and bytes(vcur.key()).startswith(vprefix):
                out.append(bytes(vcur.key()[len(vprefix) + 8:]))
                ok = vcur.next()
        return out

    def refusal(self, txn: Any, m: node_pb2.Manifest) -> str | None:
        """Why `m` is not stored: its study was deleted here and, with this version
        folded in, is still deletable. (A version that keeps it longer, one this node
        never saw, means it was not expired after all: `add` stores it again.)"""
        gone = self.expiry.deleted_record(txn, m.study_instance_uid)
        if gone is None:
            return None
        _merge_retention(gone, m)
        if self.expiry.deletable(gone, time.time()):
            return (f"study {m.study_instance_uid} was deleted here when its retention "
                    "expired; it is not stored again")
        return None

    def refuses(self, m: node_pb2.Manifest) -> bool:
        """A read-only `refusal` (peers' manifests are checked before they are queued)."""
        with self.env.begin() as txn:
            return self.refusal(txn, m) is not None

    def is_deleted(self, study_uid: str) -> tuple[int, str] | None:
        """(deleted at ms, expiry) if this node deleted the study."""
        with self.env.begin() as txn:
            return self.expiry.deleted_at(txn, study_uid)

    def expiry_of(self, rec: node_pb2.StudyRecord) -> Any:
        return expiry_of(self.expiry.policy, rec)

    def delete_study(self, study_uid: str, at_ms: int,
                     check: Callable[[node_pb2.StudyRecord], bool]) -> tuple[int, int] | None:
        """Delete every version of a study from this node, in one transaction that first
        re-checks `check(record)` (expired, not held: the caller's rules). Its chunks
        become loose (GC reclaims them); the study is remembered as deleted, so no copy
        offered later is stored again. Returns (manifests, instances) or None."""
        with self.env.begin(write=True) as txn:
            rec = self._record(txn, study_uid)
            if rec is None or not check(rec):
                return None
            partition = rec.partition
            mids = self._study_manifest_ids(txn, study_uid)
            loaded = [(mid, mf.decode(bytes(raw))) for mid in mids
                      if (raw := txn.get(mid, db=self.manifests)) is not None]
            currents = {self.current_id(txn, sop) for sop in {m.sop_instance_uid
                                                              for _, m in loaded}}
            instances = 0
            for mid, m in loaded:
                sop = m.sop_instance_uid
                current = mid in currents
                if txn.delete(mid, db=self.held):
                    self.chunk_refs.release(txn, (c.hash for c in m.chunks), at_ms)
                    if current:
                        self._partition_held(txn, partition, mid, -1)
                elif txn.delete(mid, db=self.damaged):
                    self.chunk_refs.release(txn, (c.hash for c in m.chunks), at_ms)
                self._need(txn, partition, mid, m.size, -1)
                for c in m.chunks:
                    txn.delete(c.hash + mid, db=self.refs)
                txn.delete(sop.encode() + SEP + _U64.pack(m.received_hlc) + mid,
                           db=self.versions)
                if txn.get(m.file_hash, db=self.files) == mid:
                    txn.delete(m.file_hash, db=self.files)
                txn.delete(mid, db=self.manifests)
                txn.delete(mid, db=self.text_check)
                txn.delete(mid, db=self.text_fix)
                self._partition_remove(txn, partition, mid)
                if current:
                    instances += 1
                    txn.delete(SEP.join((study_uid.encode(), m.series_instance_uid.encode(),
                                         sop.encode())), db=self.studies)
            self._count(txn, b"instances", -instances)
            self.indexes.update(txn, study_uid, indexed_values(rec), node_pb2.StudyRecord())
            key = study_uid.encode()
            self.expiry.remove(txn, rec)
            self._put_safety(txn, rec, 0, False)  # off the unsafe index
            txn.delete(key, db=self.safety)
            txn.delete(key, db=self.safety_dirty)
            txn.delete(_U32.pack(partition) + key, db=self.part_study)
            txn.delete(_U32.pack(partition) + key, db=self.held_studies)
            txn.delete(key, db=self.study_recs)
            self.expiry.mark_deleted(txn, rec, at_ms)
        return len(mids), instances

    def _partition_remove(self, txn: Any, partition: int, manifest_id: bytes) -> None:
        key = _U32.pack(partition)
        raw = txn.get(key, db=self.partition_db)
        if raw is None:
            return
        count = _U64.unpack(raw[DIGEST_LEN:])[0] - 1
        if count > 0:
            txn.put(key, digest_add(bytes(raw[:DIGEST_LEN]), manifest_id, -1) + _U64.pack(count),
                    db=self.partition_db)
        else:
            txn.delete(key, db=self.partition_db)

    def take_sweep_request(self) -> bool:
        """True once after an upgrade: every study's safety must be judged afresh."""
        with self.env.begin(write=True, db=self.meta) as txn:
            return bool(txn.pop(b"safety_sweep"))

    def counts(self) -> tuple[int, int]:
        """(manifests, instance versions index entries)."""
        with self.env.begin() as txn:
            return (
                int(txn.stat(self.manifests)["entries"]),
                int(txn.stat(self.versions)["entries"]),
            )


def _merge_retention(rec: node_pb2.StudyRecord, m: node_pb2.Manifest) -> None:
    """Fold one version into its study's retention inputs: only ever later."""
    used, birth, bad = retain_inputs(m.study_date, m.patient_birth_date, m.received_hlc >> 16)
    rec.retain_date = max(rec.retain_date, used)
    rec.retain_birth = max(rec.retain_birth, birth)
    rec.retain_birth_bad = rec.retain_birth_bad or bad
    if m.modality and m.modality not in rec.modalities:
        rec.modalities.append(m.modality)  # every version's modality sets the period


def _between(low: bytes, high: bytes, rng: random.Random) -> bytes:
    """A random key between two keys (as numbers, padded to one length)."""
    n = max(len(low), len(high))
    a, b = int.from_bytes(low.ljust(n, SEP), "big"), int.from_bytes(high.ljust(n, SEP), "big")
    return rng.randint(a, b).to_bytes(n, "big")


def _window(cur: Any, prefix: bytes, start: bytes, count: int,
            stop: bytes | None = None) -> list[bytes]:
    """Up to `count` keys of one partition from `start` on, ending before `stop`."""
    out: list[bytes] = []
    ok = cur.set_range(start)
    while ok and len(out) < count:
        key = bytes(cur.key())
        if not key.startswith(prefix) or (stop is not None and key >= stop):
            break
        out.append(key)
        ok = cur.next()
    return out
