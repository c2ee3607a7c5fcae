"""What this node currently believes about the cluster, as immutable snapshots.

The gossip worker owns the Membership state machine on the event loop and
publishes a new `Snapshot` after every change; API threads read the latest one
without locks (one attribute read is atomic). Placement is recomputed only when
the set of placeable members changes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from pacsmesh.cluster.membership import Member, MemberState
from pacsmesh.cluster.placement import Placement, PlacementNode, PlacementTable, partition_of
from pacsmesh.cluster.safety import Position

LOGGER = logging.getLogger(__name__)
# A placement weight is at most this many times the median weight of the placeable
# members: a member claiming a huge disk (a bug, or a lie) cannot become the replica
# set of everything. An honest mix rarely spans more; a node that big gets 4x the
# median share, not its full one, which costs balance, never safety.
WEIGHT_OVER_MEDIAN_MAX = 4


@dataclass(frozen=True)
class Snapshot:
    members: tuple[Member, ...] = ()
    placeable: frozenset[str] = frozenset()  # ids placement may use
    table: PlacementTable | None = None
    taken_at: float = 0.0

    def member(self, node_id: str) -> Member | None:
        for m in self.members:
            if m.node_id == node_id:
                return m
        return None

    def positions(self) -> dict[str, Position]:
        return {m.node_id: Position(m.node_id, m.site, m.lat, m.lon,
                                    m.state == MemberState.ALIVE) for m in self.members}

    def id_at(self, address: str) -> str | None:
        """The member gossip places at an address (for TLS: who must answer there)."""
        for m in self.members:
            if m.address == address:
                return m.node_id
        return None

    def alive_peers(self, me: str) -> list[Member]:
        return [m for m in self.members if m.node_id != me and m.state == MemberState.ALIVE]


@dataclass(frozen=True)
class PlacementChange:
    """The last change of the placement table, for telling repairs from rebalances."""

    at_s: float = 0.0  # wall clock, comparable with a manifest's received time
    joined: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()


class ClusterState:
    def __init__(self, me: str, partitions: int, copies: int, min_distance_miles: float,
                 dead_after_s: float, gossip_interval_s: float = 1.0) -> None:
        self.me = me
        self.partitions = partitions
        self.copies = copies
        self.min_distance_miles = min_distance_miles
        self.dead_after_s = dead_after_s
        self.gossip_interval_s = gossip_interval_s
        self.snapshot = Snapshot()
        # Replaced, never mutated (copy on write): API threads read them unlocked.
        self.refusals: dict[str, tuple[float, str]] = {}  # peer address -> (when, reason)
        self.clock_skew_s: dict[str, float] = {}  # node id -> their clock minus ours
        self.left_silent_s: dict[str, float] = {}  # left members: seconds since last heard
        # members that presented a revoked certificate: dead to us, whatever they gossip
        self.revoked: frozenset[str] = frozenset()
        self.placement_changed = PlacementChange()  # the last change (none yet)

        # With TLS, a member is placed only once it has proven its id to us directly
        # (called us with its certificate, or answered on a channel that demanded it):
        # members invented by hearsay never reach anyone and must not take copies.
        self.require_contact = False
        self.vouched: frozenset[str] = frozenset({me})

    def vouch(self, node_id: str) -> None:
        if node_id not in self.vouched:
            self.vouched = self.vouched | {node_id}

    def unvouched(self) -> list[str]:
        if not self.require_contact:
            return []
        return sorted(m.node_id for m in self.snapshot.members
                      if m.node_id not in self.vouched and m.state == MemberState.ALIVE)

    def revoke(self, node_id: str) -> None:
        if node_id not in self.revoked:
            LOGGER.error("node %s presented a revoked certificate: it is out of the cluster",
                         node_id)
            self.revoked = self.revoked | {node_id}

    def id_at(self, address: str) -> str | None:
        """Who the current snapshot places at an address (TLS: who must answer there)."""
        return self.snapshot.id_at(address)

    def publish(self, members: tuple[Member, ...], silent_s: dict[str, float]) -> bool:
        """A new member view; returns True if placement changed."""
        if self.revoked:
            members = tuple(dataclasses.replace(m, state=MemberState.DEAD)
                            if m.node_id in self.revoked else m for m in members)
        self.left_silent_s = dict(silent_s)
        placeable = frozenset(
            m.node_id for m in members
            if (m.state in (MemberState.ALIVE, MemberState.SUSPECT)
                or (m.state == MemberState.LEFT
                    and silent_s.get(m.node_id, 0.0) < self.dead_after_s))
            and (not self.require_contact or m.node_id in self.vouched))
        nodes = frozenset(_placement_nodes(members, placeable))
        table = self.snapshot.table
        changed = table is None or table.members != nodes
        if changed:
            old = table
            table = PlacementTable(self.partitions, self.copies, self.min_distance_miles)
            table.update(nodes)
            self._log_placement(old, table)
        self.snapshot = Snapshot(members, placeable, table, time.monotonic())
        return changed

    def _log_placement(self, old: PlacementTable | None, new: PlacementTable) -> None:
        """One line per placement change: who is in, who joined or went, how many
        partitions' replica sets moved and what that means for this node."""
        ids = sorted(n.node_id for n in new.members)
        if old is None:
            LOGGER.info("placement over %d nodes: %s", len(ids), ", ".join(ids))
            return
        before = {n.node_id for n in old.members}
        joined, gone = sorted(set(ids) - before), sorted(before - set(ids))
        moved = sum(1 for a, b in zip(old.placements, new.placements, strict=True)
                    if a.replicas != b.replicas)
        mine_old, mine_new = old.partitions_of(self.me), new.partitions_of(self.me)
        who = "".join((f", {', '.join(joined)} joined" if joined else "",
                       f", {', '.join(gone)} gone" if gone else ""))
        LOGGER.info("placement changed: %d nodes (%s)%s; %d of %d partitions moved; this "
                    "node is a replica of %d (+%d, -%d)", len(ids), ", ".join(ids), who,
                    moved, new.partitions, len(mine_new), len(mine_new - mine_old),
                    len(mine_old - mine_new))
        self.placement_changed = PlacementChange(time.time(), tuple(joined), tuple(gone))

    def placement(self, study_uid: str) -> Placement | None:
        table = self.snapshot.table
        if table is None or not self.snapshot.placeable:
            return None
        return table.placement(partition_of(study_uid, self.partitions))


def quantized_capacity(m: Member) -> int:
    """Placement weight: capacity rounded down to a power of two. Every node must
    compute the same placement from its own view of the members; free space
    changes all the time, its power of two rarely, so placement stays put."""
    cap = max(1, m.capacity_bytes or (m.used_bytes + m.free_bytes))
    return 1 << (cap.bit_length() - 1)


def placement_weights(weights: Mapping[str, int]) -> dict[str, int]:
    """Each weight capped at WEIGHT_OVER_MEDIAN_MAX times the lower median of all.
    A function of the member set alone, so every node computes the same; the lower
    median, so one member cannot raise it by claiming much (of two, the smaller
    counts). Powers of two stay powers of two."""
    if not weights:
        return {}
    ordered = sorted(weights.values())
    cap = WEIGHT_OVER_MEDIAN_MAX * ordered[(len(ordered) - 1) // 2]
    return {node_id: min(weight, cap) for node_id, weight in weights.items()}


def _placement_nodes(members: tuple[Member, ...], placeable: frozenset[str]
                     ) -> list[PlacementNode]:
    chosen = [m for m in members if m.node_id in placeable]
    weights = placement_weights({m.node_id: quantized_capacity(m) for m in chosen})
    return [PlacementNode(m.node_id, m.site, m.lat, m.lon, weights[m.node_id]) for m in chosen]
