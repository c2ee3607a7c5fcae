"""A lying peer in the simulation: it relays forged records of one member to every
node, every round, while studies arrive and another node crashes and returns.

The forgeries are the ones issue 9 measured and the strongest the trust bounds of
cluster/membership.py still let through: the victim dead at a fake address at the
highest version; dead at a fake address one hearsay step above the version the
cluster holds; alive at a fake place one step above (taken as news of life, and
outbid by the victim). No node may see the victim anywhere but where it is, or
other than alive; the world's invariants (copies, views) must hold as always.

One exception, a known limit of the bounds: a node that has just booted knows
nobody, and takes its first record of the victim from whoever tells it first, the
rogue included, until the victim itself speaks to it (within a round or two here).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from pacsmesh.cluster.membership import (
    COUNTER_MAX,
    INCARNATION_HEARSAY_STEP,
    GossipMessage,
    Member,
    MemberState,
    NodeId,
)
from tests.sim.world import SITES, SimConfig, Site, World

CAPACITY_TB = 4
ROGUE = NodeId("rogue")
ROGUE_ADDRESS = "rogue.sim:7400"
FAKE_ADDRESS = "forged.sim:9"
ATTACK_S = (20.0, 180.0)
PROBE_S = 0.5
NEWCOMER_GRACE_S = 5.0  # a booted node must hear the victim itself by then


def _sites(*names: str) -> tuple[Site, ...]:
    return tuple(s for s in SITES if s.node_id in names)


class _Rogue(World):
    def __init__(self, config: SimConfig, victim: str) -> None:
        super().__init__(0, config, replay="replay: pytest tests/sim -k rogue")
        self.victim = victim
        self.first_incarnation = self._record_of_victim().incarnation
        self.booted_at: dict[str, float] = {}
        self.forged_sent = 0
        self.probes = 0
        self.newcomer_misled = 0  # probes that found a just-booted node misled
        self.at(ATTACK_S[0], self._attack)
        self.at(ATTACK_S[0], self._probe)

    def restart(self, node_id: str) -> None:
        super().restart(node_id)
        self.booted_at[node_id] = self.now

    def _record_of_victim(self) -> Member:
        """The newest record of the victim any node holds: the rogue is a member
        and reads the table like anyone."""
        records = [r for slot in self.slots.values() if slot.proc is not None and slot.up
                   if (r := slot.proc.membership.get(self.victim)) is not None]
        return max(records, key=lambda r: r.version)

    def _attack(self) -> None:
        if self.now > ATTACK_S[1]:
            return
        known = self._record_of_victim()
        step = known.incarnation + INCARNATION_HEARSAY_STEP
        elsewhere = {"address": FAKE_ADDRESS, "site": "nowhere", "lat": 0.0, "lon": 0.0}
        forgeries = (
            replace(known, incarnation=COUNTER_MAX, heartbeat=COUNTER_MAX,
                    state=MemberState.DEAD, **elsewhere),  # type: ignore[arg-type]
            replace(known, incarnation=step, heartbeat=known.heartbeat + 500,
                    state=MemberState.DEAD, **elsewhere),  # type: ignore[arg-type]
            replace(known, incarnation=step, heartbeat=known.heartbeat + 500,
                    state=MemberState.ALIVE, **elsewhere),  # type: ignore[arg-type]
        )
        for node_id in sorted(self.slots):
            for forgery in forgeries:
                message = GossipMessage(ROGUE, ROGUE_ADDRESS, self.settings, (forgery,))
                self.after(0.01, partial(self._deliver, node_id, message))
        self.after(self.config.timing.gossip_interval_s, self._attack)

    def _deliver(self, node_id: str, message: GossipMessage) -> None:
        proc = self.slots[node_id].proc
        if proc is not None and proc.up:
            self.forged_sent += 1
            self.trace("forged", node_id)
            proc.serve(message)

    def _probe(self) -> None:
        """Nobody sees the victim moved, or down while it is up."""
        self.probes += 1
        where = self.slots[self.victim].site
        for node_id, slot in sorted(self.slots.items()):
            if node_id == self.victim or slot.proc is None or not slot.up:
                continue
            seen = slot.proc.membership.get(self.victim)
            if seen is None:
                continue
            moved = (seen.address, seen.site, seen.lat, seen.lon) != (
                where.address, where.site, where.lat, where.lon)
            if not moved and seen.state == MemberState.ALIVE:
                continue
            if self.now - self.booted_at.get(node_id, -NEWCOMER_GRACE_S) < NEWCOMER_GRACE_S:
                self.newcomer_misled += 1
                continue
            self.fail("rogue", f"{node_id} sees {self.victim} {seen.state} at {seen.address} "
                               f"({seen.site})")
        if self.now < ATTACK_S[1] + 30.0:
            self.after(PROBE_S, self._probe)


def test_a_rogue_relaying_forged_records_neither_kills_nor_moves_a_member() -> None:
    sites = _sites("atlanta", "boston", "chicago", "denver", "seattle")
    config = SimConfig(fault_phase_s=200.0, heal_s=300.0, sites=sites, capacity_tb=CAPACITY_TB,
                       studies=(0, 0), crashes=(0, 0), partitions=(0, 0), loss_bursts=(0, 0),
                       slow_nodes=(0, 0), loss_base_max=0.0, disk_loss_probability=0.0)
    world = _Rogue(config, victim="chicago")
    for i in range(12):  # studies arrive all through the attack, some at the victim
        origin = sites[i % len(sites)].node_id
        world.at(10.0 + 12.0 * i, partial(world.ingest, f"1.2.826.0.1.3680043.10.543.77.{i}",
                                          0, origin))
    world.at(60.0, partial(world.crash, "denver", clean=False))
    world.at(90.0, partial(world.restart, "denver"))
    world.run()  # the world's invariants: every copy kept, views agree at the end
    assert world.forged_sent > 3 * 150 * 4 and world.probes > 300
    print(f"{world.forged_sent} forged records sent; the rebooted node was misled for "
          f"{world.newcomer_misled * PROBE_S:.1f} s")
    # the rogue's alive forgeries were outbid: the victim's own word won each time
    victim = world.slots["chicago"].proc
    assert victim is not None
    assert victim.membership.me.incarnation > world.first_incarnation + 100
