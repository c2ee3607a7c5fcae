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

from cluster import fetch
from tests.sim import archive
from tests.sim.world import SITES, SimConfig, Site, World

HOUR_S = 3600.0
WARMUP_S = 120.0  # membership converges and the first holdings rounds fill the caches
SCALE_SITES = ("atlanta", "boston", "chicago", "denver", "seattle")
CAPACITY_TB = 4
SMALL = 1_000
LARGE = int(os.environ.get("PACSMESH_SIM_SCALE_STUDIES", "20000"))
GROWTH_MAX = 1.02  # at-rest traffic may not grow with the archive (2 %: timer phases)


def _sites(names: tuple[str, ...]) -> tuple[Site, ...]:
    return tuple(s for s in SITES if s.node_id in names)


def _quiet(fault_phase_s: float, heal_s: float = 120.0) -> SimConfig:
    return SimConfig(fault_phase_s=fault_phase_s, heal_s=heal_s, sites=_sites(SCALE_SITES),
                     capacity_tb=CAPACITY_TB, studies=(0, 0), crashes=(0, 0),
                     partitions=(0, 0), loss_bursts=(0, 0), slow_nodes=(0, 0),
                     loss_base_max=0.0, disk_loss_probability=0.0)


def at_rest(studies: int) -> tuple[dict[str, int], dict[str, int], float]:
    """Messages and bytes each node sent in one simulated hour at rest."""
    world = World(1, _quiet(WARMUP_S + HOUR_S), replay="replay: pytest tests/sim -k at_rest")
    archive.load(world, studies)
    before: dict[str, dict[str, int]] = {}

    def mark() -> None:
        before["messages"], before["bytes"] = dict(world.sent_messages), dict(world.sent_bytes)

    world.at(WARMUP_S, mark)
    after: dict[str, dict[str, int]] = {}

    def done() -> None:
        after["messages"], after["bytes"] = dict(world.sent_messages), dict(world.sent_bytes)

    world.at(WARMUP_S + HOUR_S, done)
    started = time.monotonic()
    world.run()
    msgs = {n: after["messages"][n] - before["messages"].get(n, 0) for n in after["messages"]}
    sent = {n: after["bytes"][n] - before["bytes"].get(n, 0) for n in after["bytes"]}
    return msgs, sent, time.monotonic() - started


def test_at_rest_cost_does_not_grow_with_the_archive() -> None:
    small_msgs, small_bytes, _ = at_rest(SMALL)
    large_msgs, large_bytes, took_s = at_rest(LARGE)
    print(f"\nper node per simulated hour at rest: {SMALL} studies: "
          f"{max(small_msgs.values())} messages, {max(small_bytes.values())} bytes; "
          f"{LARGE} studies: {max(large_msgs.values())} messages, "
          f"{max(large_bytes.values())} bytes ({took_s:.1f} s of simulation)")
    for node in small_msgs:
        assert large_msgs[node] <= small_msgs[node] * GROWTH_MAX, (node, small_msgs, large_msgs)
        assert large_bytes[node] <= small_bytes[node] * GROWTH_MAX, (
            node, small_bytes, large_bytes)


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
