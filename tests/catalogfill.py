"""Many studies, fast: one tiny instance per study, written through the Store API.

Each instance's bytes are a short unique blob (not DICOM): the catalog, the
listing and C-FIND only read manifests, and a blob is ~1000x cheaper to make
than a DICOM file. Its chunk is really appended and indexed, and its manifest
goes through the group commit exactly as ingest's does, so the data dir is what
a node that received these studies would have.
"""

from __future__ import annotations

import random
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from pacsmesh.node import manifest as mf
from pacsmesh.node.chunking import CHUNK_SIZE
from pacsmesh.node.hashing import HASH_ALGO, content_hash
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2

UID_ROOT = "1.2.826.0.1.3680043.10.1455.9"
MODALITIES = ("CT", "CT", "CT", "MR", "MR", "US", "CR", "MG")  # MG is the rare one


@dataclass(frozen=True)
class Synth:
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modality: str
    accession: str
    held: bool = True  # this node holds its bytes (False: known from a peer only)


def synth_studies(n: int, seed: int = 1, patients: int = 1000,
                  not_held_every: int = 0) -> list[Synth]:
    """`n` studies of `patients` patients, dated 2015-2025, mostly CT and MR."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randrange(patients)
        year, month, day = 2015 + rng.randrange(11), 1 + rng.randrange(12), 1 + rng.randrange(28)
        out.append(Synth(
            study_uid=f"{UID_ROOT}.{seed}.{i}", patient_id=f"PX{p:06d}",
            patient_name=f"PATIENT^{p:06d}", study_date=f"{year}{month:02d}{day:02d}",
            modality=rng.choice(MODALITIES), accession=f"AX{seed}{i:07d}",
            held=not (not_held_every and i % not_held_every == 0)))
    return out


def manifest_of(s: Synth, data: bytes, hlc: int) -> node_pb2.Manifest:
    m = node_pb2.Manifest(
        format=mf.MANIFEST_FORMAT, hash_algo=HASH_ALGO, chunk_size=CHUNK_SIZE,
        sop_instance_uid=f"{s.study_uid}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        series_instance_uid=f"{s.study_uid}.1", study_instance_uid=s.study_uid,
        patient_id=s.patient_id, patient_name=s.patient_name, study_date=s.study_date,
        study_time="120000", accession_number=s.accession, modality=s.modality,
        series_number="1", instance_number="1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=len(data), file_hash=content_hash(data), header_len=len(data),
        origin_node="n1", received_hlc=hlc)
    m.chunks.add(hash=content_hash(data), size=len(data))
    return m


def fill(store: Store, studies: list[Synth], hlc_start: int = 1 << 40) -> None:
    """Store every study's instance; returns once all are durable."""
    futures: list[Future[bool]] = []
    for i, s in enumerate(studies):
        data = f"pacsmesh test instance of study {s.study_uid}".encode()
        if s.held:
            store.chunks.put(content_hash(data), len(data), data, 0)
        mid, raw = mf.encode(m := manifest_of(s, data, hlc_start + i))
        futures.append(store.submit(mid, raw, m, held=s.held))
    for f in futures:
        f.result(120)


def filled_data_dir(data_dir: Path, studies: list[Synth]) -> None:
    """A data dir holding `studies`, closed again (for a node process to open)."""
    store = Store(data_dir)
    try:
        fill(store, studies)
    finally:
        store.close()
