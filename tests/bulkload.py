"""Archives of test size written straight into data dirs, before the nodes start.

Real manifests, real chunks, the store's own write path (Store.submit: the
group commit, every index and aggregate), but no DICOM parsing and no upload:
tens of thousands of studies in seconds, so tests run at the size where bugs
that lose copies show. Each study is one instance with one small chunk of its
own bytes, held by the replica set placement gives it (its first replica is the
origin) and known, not held, everywhere else, as after a settled federation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pacsmesh.cluster.placement import PlacementNode, partition_of, place_all
from pacsmesh.node import manifest as mf
from pacsmesh.node.hashing import HASH_ALGO, content_hash
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2

STUDY_ROOT = "1.2.826.0.1.3680043.10.543.5"


def study_uid(i: int) -> str:
    return f"{STUDY_ROOT}.{i}"


def manifest_of(i: int, origin: str) -> tuple[bytes, bytes, node_pb2.Manifest, bytes]:
    """(manifest id, raw, manifest, the chunk's bytes) of study i's one instance."""
    data = f"pacsmesh bulk test instance {i}".encode().ljust(96, b".")
    chunk = content_hash(data)
    m = node_pb2.Manifest(
        format=mf.MANIFEST_FORMAT, hash_algo=HASH_ALGO, chunk_size=len(data),
        sop_instance_uid=f"{STUDY_ROOT}.{i}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=f"{STUDY_ROOT}.{i}.1", study_instance_uid=study_uid(i),
        patient_id=f"P{i % 997}", study_date="20260101", modality="CT",
        transfer_syntax_uid="1.2.840.10008.1.2.1", size=len(data), file_hash=content_hash(data),
        header_len=len(data), origin_node=origin, received_hlc=(1_700_000_000_000 + i) << 16)
    m.chunks.add(hash=chunk, size=len(data))
    mid, raw = mf.encode(m)
    return mid, raw, m, data


def replica_sets(nodes: Sequence[PlacementNode], partitions: int, copies: int,
                 min_distance_miles: float) -> list[tuple[str, ...]]:
    return [p.replicas for p in place_all(sorted(nodes, key=lambda n: n.node_id), partitions,
                                          copies, min_distance_miles)]


def load(data_dir: Path, node_id: str, studies: int, replicas: Sequence[tuple[str, ...]],
         partitions: int) -> int:
    """Write the archive as `node_id` sees it; returns how many studies it holds."""
    store = Store(data_dir, partitions=partitions)
    held = 0
    try:
        futures = []
        for i in range(studies):
            reps = replicas[partition_of(study_uid(i), partitions)]
            mid, raw, m, data = manifest_of(i, reps[0])
            mine = node_id in reps
            if mine:
                store.chunks.put(m.chunks[0].hash, len(data), data, 0)
                held += 1
            futures.append(store.submit(mid, raw, m, held=mine))
        for fut in futures:
            fut.result()
    finally:
        store.close()
    return held
