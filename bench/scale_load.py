"""Bulk loader for bench.scale: a synthetic archive written straight into node data dirs.

Real ingest (DICOM parsing, upload, per-chunk verification) would take days for
10,000,000 instances, so before the nodes start this writes what ingest would
have left behind, through the same Store and Catalog that ingest uses:

- each instance's manifest is built by ``node.manifest.build`` from the values a
  DICOM parse would give (valid UIDs, patient id, study date, modality, origin
  node, HLC receive time, whole-file hash and size, the ordered chunk list);
- its chunks go through ``store.chunks.put`` on the nodes that hold it, and are
  made durable and indexed by ``Store.flush`` (packs fsync'd, then the index);
- then the Catalog's own ``add`` records ``LOAD_BATCH`` manifests per transaction
  (every aggregate and digest maintained), instead of ``Store.submit``'s group
  commits of at most 4096 behind a thread hop: ~1.6x faster at 1M instances.

What differs from real ingest: no DICOM parsing, no upload, no compression, bigger
transactions, and tiny chunks: one unique "header" chunk per instance
(``HEADER_CHUNK_LEN`` bytes) and one "pixel" chunk shared by every instance of a
study (so chunks dedup within a study); their bytes are opaque, not a parseable
DICOM file. Every node learns every manifest (manifests replicate everywhere);
chunks go only to the nodes that hold the study (``held=False`` elsewhere, as for
a manifest received from a peer).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from blake3 import blake3

from pacsmesh.cluster.placement import PlacementNode, PlacementTable, partition_of
from pacsmesh.node import manifest as mf
from pacsmesh.node.dicom_layout import Layout
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2
from pacsmesh.sample import UID_ROOT

SCALE_UID_ROOT = f"{UID_ROOT}.8"  # apart from pacsmesh.sample's and bench.antientropy's UIDs
HEADER_CHUNK_LEN = 256  # unique per instance: what a real header chunk is to dedup
PIXEL_CHUNK_LEN = 1024  # shared by a study's instances: repairs move real bytes, little disk
STUDIES_PER_PATIENT = 3  # so a C-FIND by PatientID matches a handful of studies
LOAD_BATCH = 32_768  # manifests per transaction: past ~8 x COMMIT_BATCH_MAX it gains little
FIRST_RECEIVED = dt.datetime(2022, 1, 1, tzinfo=dt.UTC)  # inside any sane retention period
RECEIVED_SPAN_S = 4 * 365 * 86400  # studies arrive evenly over four years
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MODALITIES = ("CT", "MR", "CR", "US", "MG")


def study_uid(study_no: int) -> str:
    return f"{SCALE_UID_ROOT}.{study_no}"


def patient_id(study_no: int) -> str:
    return f"SC{study_no // STUDIES_PER_PATIENT:08d}"


@dataclass(frozen=True)
class Corpus:
    """The synthetic archive: ``studies`` studies of ``instances`` instances each."""

    studies: int
    instances: int

    @property
    def total_instances(self) -> int:
        return self.studies * self.instances


@dataclass(frozen=True)
class Instance:
    manifest_id: bytes
    raw: bytes
    manifest: node_pb2.Manifest
    chunks: tuple[tuple[bytes, bytes], ...]  # (key, plain bytes)


def study_instances(corpus: Corpus, study_no: int, origin: str) -> list[Instance]:
    """The manifests of one study as ingest at ``origin`` would have built them."""
    uid = study_uid(study_no)
    received_ms = int(FIRST_RECEIVED.timestamp() * 1000) + (
        RECEIVED_SPAN_S * 1000 * study_no // max(1, corpus.studies))
    date = dt.datetime.fromtimestamp(received_ms / 1000, dt.UTC).strftime("%Y%m%d")
    pixel = blake3(f"pixel {uid}".encode()).digest(length=PIXEL_CHUNK_LEN)
    pixel_key = content_hash(pixel)
    modality = MODALITIES[study_no % len(MODALITIES)]
    out = []
    for k in range(1, corpus.instances + 1):
        sop = f"{uid}.1.{k}"
        header = blake3(f"header {sop}".encode()).digest(length=HEADER_CHUNK_LEN)
        attrs = {
            "sop_class_uid": CT_IMAGE_STORAGE, "sop_instance_uid": sop,
            "series_instance_uid": f"{uid}.1", "study_instance_uid": uid,
            "patient_id": patient_id(study_no), "patient_name": "SCALE^BENCH",
            "patient_birth_date": "19600101", "patient_sex": "O", "study_date": date,
            "study_time": "120000", "study_id": str(study_no),
            "accession_number": f"A{study_no:09d}", "study_description": "SCALE BENCH",
            "modality": modality, "series_description": "SERIES 1", "series_number": "1",
            "instance_number": str(k),
        }
        size = HEADER_CHUNK_LEN + PIXEL_CHUNK_LEN
        layout = Layout(size=size, header_len=HEADER_CHUNK_LEN,
                        transfer_syntax_uid=EXPLICIT_VR_LE, attrs=attrs)
        chunks = ((content_hash(header), header), (pixel_key, pixel))
        m = mf.build(layout, content_hash(header + pixel),
                     [(key, len(data)) for key, data in chunks], origin,
                     (received_ms << 16) | k)
        mid, raw = mf.encode(m)
        out.append(Instance(mid, raw, m, chunks))
    return out


@dataclass(frozen=True)
class LoadJob:
    """One node's share: it learns every manifest and holds the studies whose partition
    is in ``held_partitions`` (None: every study)."""

    data_dir: Path
    corpus: Corpus
    partitions: int
    origins: tuple[tuple[str, ...], ...]  # per partition: nodes a study's origin cycles over
    held_partitions: frozenset[int] | None = None


@dataclass(frozen=True)
class LoadReport:
    data_dir: Path
    manifests: int
    held: int
    seconds: float
    disk_bytes: int

    @property
    def rate(self) -> float:
        return self.manifests / self.seconds if self.seconds > 0 else 0.0


def dir_bytes(path: Path) -> int:
    """Bytes allocated on disk (LMDB's map is sparse: st_size would overstate it)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def load_node(job: LoadJob, progress: Callable[[int], None] | None = None) -> LoadReport:
    """Write one node's data dir (no node may be running on it). Returns when everything
    is durable. Keeps the Store's order: the chunks a batch needs are durable and
    indexed (``Store.flush``) before the transaction that adds its manifests."""
    started = time.perf_counter()
    store = Store(job.data_dir, partitions=job.partitions)
    batch: list[tuple[Instance, bool]] = []
    manifests = held = 0

    def commit() -> None:
        store.flush()
        now_ms = int(time.time() * 1000)
        with store.env.begin(write=True) as txn:
            for inst, holds in batch:
                store.catalog.add(txn, inst.manifest_id, inst.raw, inst.manifest,
                                  now_ms if holds else None)
        batch.clear()

    try:
        for study_no in range(job.corpus.studies):
            uid = study_uid(study_no)
            partition = partition_of(uid, job.partitions)
            choices = job.origins[partition]
            holds = job.held_partitions is None or partition in job.held_partitions
            insts = study_instances(job.corpus, study_no, choices[study_no % len(choices)])
            for n, inst in enumerate(insts):
                if holds:  # the shared pixel chunk once per study: put() would skip it anyway
                    for key, data in inst.chunks[: None if n == 0 else 1]:
                        store.chunks.put(key, len(data), data, 0)
                batch.append((inst, holds))
            manifests += len(insts)
            held += len(insts) if holds else 0
            if len(batch) >= LOAD_BATCH:
                commit()
                if progress is not None:
                    progress(manifests)
        commit()
    finally:
        store.close()
    (job.data_dir / "LOCK").unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return LoadReport(job.data_dir, manifests, held, seconds, dir_bytes(job.data_dir))


def _load_quietly(job: LoadJob) -> LoadReport:
    return load_node(job)


def load_all(jobs: list[LoadJob], workers: int | None = None) -> list[LoadReport]:
    """Each node's data dir in its own process (spawned: the parent may hold gRPC
    state a fork must not copy), as many at once as there are cores."""
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_load_quietly, jobs))


@dataclass(frozen=True)
class Site:
    node_id: str
    site: str
    lat: float
    lon: float


def placement_table(sites: list[Site], partitions: int, copies: int, min_distance_miles: float,
                    capacity: int) -> PlacementTable:
    """The placement the running nodes will compute: the same member table, with the
    capacity every node reports (a power of two, so quantizing leaves it alone)."""
    table = PlacementTable(partitions, copies, min_distance_miles)
    table.update(PlacementNode(s.node_id, s.site, s.lat, s.lon, capacity) for s in sites)
    return table


def jobs_for(sites: list[Site], dirs: dict[str, Path], corpus: Corpus, partitions: int,
             table: PlacementTable) -> Iterator[LoadJob]:
    """One job per node: it holds the partitions placement gives it, and each study's
    origin is one of its replicas (a site keeps what it received itself)."""
    origins = tuple(pl.replicas for pl in table.placements)
    everything = all(len(pl.replicas) == len(sites) for pl in table.placements)
    for s in sites:
        held = None if everything else frozenset(
            p for p, pl in enumerate(table.placements) if s.node_id in pl.replicas)
        yield LoadJob(dirs[s.node_id], corpus, partitions, origins, held)
