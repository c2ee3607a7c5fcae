"""How much data moves when one node joins or leaves.

Ten equal nodes at real US cities, P = 1024 partitions, N = 3 copies at sites
>= 250 miles apart. Adding an 11th node should ideally move only the slots the
newcomer takes over, 1/11 of all (partition, replica) slots; removing one of ten
should move only the departed node's 1/10. Prints measured against ideal.

    /work/venv/bin/python bench/placement_stability.py
"""

from __future__ import annotations

from collections.abc import Sequence

from pacsmesh.cluster.placement import Placement, PlacementNode, place_all

PARTITIONS = 1024
COPIES = 3
MIN_DISTANCE_MILES = 250.0
CAPACITY_BYTES = 8 * 10**12

CITIES: dict[str, tuple[float, float]] = {
    "Boston": (42.3601, -71.0589),
    "New York": (40.7128, -74.0060),
    "Chicago": (41.8781, -87.6298),
    "Denver": (39.7392, -104.9903),
    "Seattle": (47.6062, -122.3321),
    "Los Angeles": (34.0522, -118.2437),
    "Atlanta": (33.7490, -84.3880),
    "Dallas": (32.7767, -96.7970),
    "Miami": (25.7617, -80.1918),
    "Philadelphia": (39.9526, -75.1652),
    "Minneapolis": (44.9778, -93.2650),
    "Phoenix": (33.4484, -112.0740),
}
BASE_CITIES = list(CITIES)[:10]


def node(city: str) -> PlacementNode:
    lat, lon = CITIES[city]
    return PlacementNode(f"node-{city}", city, lat, lon, CAPACITY_BYTES)


def compare(before: Sequence[Placement], after: Sequence[Placement]) -> tuple[float, float]:
    """(share of partitions whose replica set changed, share of slots moved).

    A slot moves when a member of the new set was not in the old one, i.e. a node
    has to receive that partition's data. Reordering within a set moves nothing.
    """
    changed = 0
    moved = 0
    for old, new in zip(before, after, strict=True):
        changed += set(new.replicas) != set(old.replicas)
        moved += len(set(new.replicas) - set(old.replicas))
    return changed / len(before), moved / (len(before) * COPIES)


def slot_share(placements: Sequence[Placement], node_id: str) -> float:
    """Share of all slots one node holds: the least a join or leave must move."""
    held = sum(node_id in p.replicas for p in placements)
    return held / (len(placements) * COPIES)


def line(label: str, changed: float, moved: float, least: float, n: int) -> str:
    return (
        f"{label:<24} partitions changed {changed:6.1%} (ideal {COPIES / n:6.1%})"
        f"   slots moved {moved:6.1%} (ideal {1 / n:6.1%}, least possible {least:6.1%})"
    )


def main() -> None:
    base = [node(c) for c in BASE_CITIES]
    before = place_all(base, PARTITIONS, COPIES, MIN_DISTANCE_MILES)
    unsatisfied = sum(not p.satisfied for p in before)
    print(
        f"{len(base)} nodes, P={PARTITIONS}, N={COPIES}, D={MIN_DISTANCE_MILES:g} miles, "
        f"equal capacity; unsatisfied partitions: {unsatisfied}"
    )
    print(
        "ideal = an even share (N/n of partitions, 1/n of slots); least possible = the"
        " slots the joining node takes or the leaving node held (distance rules skew it)"
    )
    # (partitions changed, slots moved, least possible) per single change.
    runs: dict[str, list[tuple[float, float, float]]] = {"add": [], "remove": []}

    for city in [c for c in CITIES if c not in BASE_CITIES]:
        newcomer = node(city)
        after = place_all([*base, newcomer], PARTITIONS, COPIES, MIN_DISTANCE_MILES)
        changed, moved = compare(before, after)
        least = slot_share(after, newcomer.node_id)
        print(line(f"add {city}", changed, moved, least, len(base) + 1))
        runs["add"].append((changed, moved, least))

    for leaver in base:
        rest = [n for n in base if n is not leaver]
        after = place_all(rest, PARTITIONS, COPIES, MIN_DISTANCE_MILES)
        changed, moved = compare(before, after)
        least = slot_share(before, leaver.node_id)
        print(line(f"remove {leaver.site}", changed, moved, least, len(base)))
        runs["remove"].append((changed, moved, least))

    # Means over every possible single change, so one city's luck doesn't decide.
    for kind, n in (("add", len(base) + 1), ("remove", len(base))):
        changed, moved, least = (
            sum(col) / len(runs[kind]) for col in zip(*runs[kind], strict=True)
        )
        print(line(f"{kind} (mean of {len(runs[kind])})", changed, moved, least, n))


if __name__ == "__main__":
    main()
