"""A simulated archive of any size, loaded straight onto the disks: every node
knows every manifest, and each study is held by the replica set placement gives
it with every member alive (its origin is the first replica). Used to show that
the protocol's cost at rest does not grow with the archive, and that lost copies
are re-created however many manifests a node knows without holding.

Manifests are small synthetic records (no chunk bytes). Per-study tuples and the
manifest records are shared between disks (they are never mutated in place).
"""

from __future__ import annotations

import hashlib

from pacsmesh.cluster.placement import PlacementNode, partition_of, place_all
from pacsmesh.cluster.state import placement_weights
from pacsmesh.node.catalog import EMPTY_DIGEST, element_hash
from tests.sim.simnode import Disk, SimManifest
from tests.sim.world import COPIES, MIN_DISTANCE_MILES, PARTITIONS, World

ADHASH_MOD = 1 << 256


def _digest(values: list[int]) -> bytes:
    return (sum(values) % ADHASH_MOD).to_bytes(32, "big")


def load(world: World, studies: int, instances: int = 1) -> None:
    """Put `studies` studies of `instances` instances onto every disk of `world`,
    before its first event. Placement is computed exactly as the nodes will."""
    slots = world.slots
    weights = placement_weights({n: s.capacity_bytes for n, s in slots.items()})
    nodes = [PlacementNode(n, s.site.site, s.site.lat, s.site.lon, weights[n])
             for n, s in sorted(slots.items())]
    placements = place_all(nodes, PARTITIONS, COPIES, MIN_DISTANCE_MILES)
    manifests: dict[bytes, SimManifest] = {}
    by_study: dict[str, tuple[bytes, ...]] = {}
    all_digest: dict[str, bytes] = {}
    by_partition: dict[int, list[str]] = {}
    elem: dict[bytes, int] = {}
    for i in range(studies):
        study = f"1.2.826.0.1.3680043.10.543.9.{i}"
        p = partition_of(study, PARTITIONS)
        origin = placements[p].replicas[0]
        mids = []
        for k in range(instances):
            mid = hashlib.blake2b(f"{study}/{k}".encode(), digest_size=16).digest()
            manifests[mid] = SimManifest(mid, study, origin, p)
            elem[mid] = element_hash(mid)
            mids.append(mid)
        by_study[study] = tuple(mids)
        all_digest[study] = _digest([elem[m] for m in mids])
        by_partition.setdefault(p, []).append(study)
    for studies_of_p in by_partition.values():
        studies_of_p.sort()
    part_values: list[list[int]] = [[] for _ in range(PARTITIONS)]
    for mid, m in manifests.items():
        part_values[m.partition].append(elem[mid])
    part_digest = [_digest(v) for v in part_values]
    part_count = [len(v) for v in part_values]
    for node_id, slot in sorted(slots.items()):
        disk = Disk(PARTITIONS)
        disk.manifests = dict(manifests)
        disk.by_study = dict(by_study)
        disk.all_digest = dict(all_digest)
        disk.by_partition = {p: list(s) for p, s in by_partition.items()}
        disk.part_digest = list(part_digest)
        disk.part_count = list(part_count)
        mine = {p for p, pl in enumerate(placements) if node_id in pl.replicas}
        held_values: list[list[int]] = [[] for _ in range(PARTITIONS)]
        for study, study_mids in by_study.items():
            p = manifests[study_mids[0]].partition
            if p in mine:
                disk.held.update(study_mids)
                disk.held_digest[study] = all_digest[study]
                disk.held_count[study] = len(study_mids)
                held_values[p] += [elem[m] for m in study_mids]
            else:
                disk.need.setdefault(p, set()).update(study_mids)
        disk.held_by_partition = {p: list(s) for p, s in by_partition.items() if p in mine}
        disk.part_held = [_digest(v) if v else EMPTY_DIGEST for v in held_values]
        disk.part_held_count = [len(v) for v in held_values]
        disk.incarnation = slot.disk.incarnation
        slot.disk = disk
        if slot.proc is not None:
            slot.proc.disk = disk
    world.acked.update(manifests)
