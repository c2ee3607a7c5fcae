"""The simulation at the size users live at.

1. At rest, what the protocol costs (messages and bytes per node per simulated
   hour) does not grow with the archive: the same at 1,000 studies as at 20,000
   (and at 1,000,000: `PACSMESH_SIM_SCALE_STUDIES=1000000 pytest tests/sim -k at_rest`).
2. After a node dies, every lost copy is re-created although each node knows
   far more manifests it does not hold than any batch or page of the fetch code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pacsmesh.cluster import fetch
from tests.sim import archive
from tests.sim.world import SITES, SimConfig, Site, World

HOUR_S = 3600.0
# Membership converges and the first holdings rounds fill the caches; the hour is
# measured from when every cache equals what it describes (probed this often).
WARMUP_MAX_S = 1200.0
REST_PROBE_S = 10.0
SCALE_SITES = ("atlanta", "boston", "chicago", "denver", "seattle")
CAPACITY_TB = 4
SMALL = 1_000
LARGE = int(os.environ.get("PACSMESH_SIM_SCALE_STUDIES", "20000"))
GROWTH_MAX = 1.03  # the same rounds; timer phases and random delays vary the count a little
AT_REST_KINDS = {"GossipMessage", "RootAsk", "RootGive", "HeldRootAsk", "HeldRootGive"}


def _sites(names: tuple[str, ...]) -> tuple[Site, ...]:
    return tuple(s for s in SITES if s.node_id in names)


def _quiet(fault_phase_s: float, heal_s: float = 120.0) -> SimConfig:
    return SimConfig(fault_phase_s=fault_phase_s, heal_s=heal_s, sites=_sites(SCALE_SITES),
                     capacity_tb=CAPACITY_TB, studies=(0, 0), crashes=(0, 0),
                     partitions=(0, 0), loss_bursts=(0, 0), slow_nodes=(0, 0),
                     loss_base_max=0.0, disk_loss_probability=0.0)


def _at_rest(world: World) -> bool:
    """Every node's cache of every peer's holdings equals what that peer holds, and
    nothing is left to fetch: from here on, nothing changes."""
    for node_id, slot in world.slots.items():
        if slot.proc is None or not slot.up or slot.proc.trim.pending() or slot.proc.trimming:
            return False
        if any(slot.disk.need_page(p, b"", 1) for p in slot.proc.my_partitions()):
            return False
        for peer, other in world.slots.items():
            if peer != node_id:
                held = list(zip(other.disk.part_held, other.disk.part_held_count, strict=True))
                if list(slot.disk.peer_partition_digests(peer)) != held:
                    return False
    return True


@dataclass
class AtRest:
    messages: dict[str, int]  # per node, in the hour
    sent_bytes: dict[str, int]
    kinds: dict[str, int]  # message types sent in the hour, all nodes
    took_s: float


def at_rest(studies: int) -> AtRest:
    """Messages and bytes each node sent in one simulated hour at rest."""
    world = World(1, _quiet(WARMUP_MAX_S + HOUR_S),
                  replay="replay: pytest tests/sim -k at_rest")
    archive.load(world, studies)
    before: dict[str, dict[str, int]] = {}
    after: dict[str, dict[str, int]] = {}

    def snapshot(into: dict[str, dict[str, int]]) -> None:
        into["messages"], into["bytes"] = dict(world.sent_messages), dict(world.sent_bytes)
        into["kinds"] = dict(world.sent_kinds)

    def probe() -> None:
        if world.now < WARMUP_MAX_S and not _at_rest(world):
            world.after(REST_PROBE_S, probe)
            return
        assert _at_rest(world), f"not at rest after {WARMUP_MAX_S} s"
        snapshot(before)
        world.after(HOUR_S, lambda: snapshot(after))

    world.at(REST_PROBE_S, probe)
    started = time.monotonic()
    world.run()
    assert after, "the hour at rest did not end before the world did"
    def diff(key: str) -> dict[str, int]:
        out = {n: v - before[key].get(n, 0) for n, v in after[key].items()}
        return {n: v for n, v in out.items() if v}

    return AtRest(diff("messages"), diff("bytes"), diff("kinds"), time.monotonic() - started)


def test_at_rest_cost_does_not_grow_with_the_archive() -> None:
    small, large = at_rest(SMALL), at_rest(LARGE)
    print(f"\nper node per simulated hour at rest: {SMALL} studies: "
          f"{max(small.messages.values())} messages, {max(small.sent_bytes.values())} bytes; "
          f"{LARGE} studies: {max(large.messages.values())} messages, "
          f"{max(large.sent_bytes.values())} bytes ({large.took_s:.1f} s of simulation); "
          f"kinds {sorted(large.kinds.items())}")
    # at rest only fixed-size messages flow: gossip, and one root digest question and
    # answer per round for manifests and for holdings; nothing that pages or lists
    assert set(large.kinds) <= AT_REST_KINDS, large.kinds
    assert set(small.kinds) <= AT_REST_KINDS, small.kinds
    for node in small.messages:  # the same rounds (timer phases and delays vary a little)
        assert large.messages[node] <= small.messages[node] * GROWTH_MAX, (small, large)
        assert large.sent_bytes[node] <= small.sent_bytes[node] * GROWTH_MAX, (small, large)


def test_every_lost_copy_is_recreated_past_any_batch() -> None:
    """Each node knows ~8,000 manifests it does not hold (more than the old fetch
    window of 10,000 once it also holds its share, and 100x a fetch batch); Denver
    dies for good and every study it held gets its third distant copy back."""
    studies = 20_000
    assert studies * 2 // 5 > 100 * fetch.BATCH_MAX
    world = World(2, _quiet(fault_phase_s=900.0, heal_s=900.0),
                  replay="replay: pytest tests/sim -k every_lost_copy")
    archive.load(world, studies)
    held_by_denver = len(world.slots["denver"].disk.held)
    assert held_by_denver > 10 * fetch.BATCH_MAX
    world.at(60.0, lambda: world.crash("denver", clean=False))
    # never restarted: the heal at the end restarts only disks that exist, so lose it
    world.at(61.0, lambda: setattr(world.slots["denver"], "lost", True))
    result = world.run()  # invariant 3 at the end: every study in full at N distant sites
    assert result.stats["fetched"] >= held_by_denver, result.stats
