"""The catalog in LMDB: manifests and the indexes that find them.

    manifests  manifest id -> manifest bytes (exact, as hashed)
    versions   sop uid \\0 hlc(8, big-endian) manifest id -> ''   (last key = current)
    studies    study uid \\0 series uid \\0 sop uid -> ''
    files      whole-file hash -> manifest id                     (duplicate detection)
    held       manifest id -> verified-at ms (8)                  (every chunk held here)

Each write happens inside the caller's transaction (the group commit), so the
catalog never names a manifest whose chunks are not durably indexed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from node import manifest as mf
from proto import node_pb2

SEP = b"\x00"
_U64 = struct.Struct(">Q")


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
    def __init__(self, env: Any) -> None:
        self.env = env
        self.manifests = env.open_db(b"manifests")
        self.versions = env.open_db(b"versions")
        self.studies = env.open_db(b"studies")
        self.files = env.open_db(b"files")
        self.held = env.open_db(b"held")

    # ---- writes (inside the group commit) ----------------------------------------

    def add(self, txn: Any, manifest_id: bytes, raw: bytes, m: node_pb2.Manifest,
            held_at_ms: int | None) -> bool:
        """Record a manifest; False if it was known already (a set: adding is idempotent)."""
        if not txn.put(manifest_id, raw, db=self.manifests, overwrite=False):
            if held_at_ms is not None:
                txn.put(manifest_id, _U64.pack(held_at_ms), db=self.held)
            return False
        sop = m.sop_instance_uid.encode()
        txn.put(sop + SEP + _U64.pack(m.received_hlc) + manifest_id, b"", db=self.versions)
        key = SEP.join(
            (m.study_instance_uid.encode(), m.series_instance_uid.encode(), sop)
        )
        txn.put(key, b"", db=self.studies)
        txn.put(m.file_hash, manifest_id, db=self.files)
        if held_at_ms is not None:
            txn.put(manifest_id, _U64.pack(held_at_ms), db=self.held)
        return True

    # ---- reads ------------------------------------------------------------------

    def file_known(self, file_hash: bytes) -> bytes | None:
        with self.env.begin(db=self.files) as txn:
            value = txn.get(file_hash)
        return bytes(value) if value is not None else None

    def known_files(self, hashes: list[bytes]) -> list[bytes]:
        with self.env.begin(db=self.files) as txn:
            return [h for h in hashes if txn.get(h) is not None]

    def get(self, manifest_id: bytes) -> tuple[bytes, node_pb2.Manifest] | None:
        with self.env.begin(db=self.manifests) as txn:
            raw = txn.get(manifest_id)
        if raw is None:
            return None
        return bytes(raw), mf.decode(bytes(raw))

    def is_held(self, manifest_id: bytes) -> bool:
        with self.env.begin(db=self.held) as txn:
            return txn.get(manifest_id) is not None

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

    def study_uids(self) -> Iterator[str]:
        last = b""
        with self.env.begin(db=self.studies) as txn:
            for key in txn.cursor().iternext(values=False):
                study = bytes(key).split(SEP, 1)[0]
                if study != last:
                    last = study
                    yield study.decode()

    def study_info(self, study_uid: str) -> StudyInfo:
        info = StudyInfo(study_uid=study_uid)
        for mid, _, m in self.current_manifests(study_uid):
            info.patient_id = info.patient_id or m.patient_id
            info.study_date = info.study_date or m.study_date
            if m.modality:
                info.modalities.add(m.modality)
            info.instances += 1
            info.bytes += m.size
            if self.is_held(mid):
                info.held_instances += 1
        return info

    def counts(self) -> tuple[int, int]:
        """(manifests, instance versions index entries)."""
        with self.env.begin() as txn:
            return (
                int(txn.stat(self.manifests)["entries"]),
                int(txn.stat(self.versions)["entries"]),
            )
