"""Placement against a naive reference, in the spirit of Garage's layout tests.

The reference tries every combination of nodes in score order and keeps the first
one whose sites are pairwise >= D apart; place() must return exactly that set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsmesh.cluster import placement
from pacsmesh.cluster.placement import (
    Placement,
    PlacementNode,
    PlacementTable,
    great_circle_miles,
    max_pairwise_set_size,
    partition_of,
    place,
    place_all,
    rank_nodes,
    rendezvous_score,
)

TB = 10**12

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
    "Minneapolis": (44.9778, -93.2650),
    "Phoenix": (33.4484, -112.0740),
    "Philadelphia": (39.9526, -75.1652),
}


def city_node(node_id: str, city: str, capacity: int = 4 * TB) -> PlacementNode:
    lat, lon = CITIES[city]
    return PlacementNode(node_id, city, lat, lon, capacity)


# --- the naive reference ----------------------------------------------------------


def far_apart(a: PlacementNode, b: PlacementNode, d: float) -> bool:
    return a.site != b.site and great_circle_miles(a.lat, a.lon, b.lat, b.lon) >= d


def pairwise_far(group: Sequence[PlacementNode], d: float) -> bool:
    return all(far_apart(a, b, d) for a, b in combinations(group, 2))


def brute_max_valid(nodes: Sequence[PlacementNode], d: float) -> int:
    """Largest pairwise-far subset, by trying every subset of distinct positions.

    Nodes at one site share its coordinates in these tests, so one node per site
    stands for all of them (they are mutually close by definition anyway).
    """
    reps = list({n.site: n for n in nodes}.values())
    for k in range(len(reps), 0, -1):
        if any(pairwise_far(c, d) for c in combinations(reps, k)):
            return k
    return 0


def naive_place(
    nodes: Sequence[PlacementNode], partition: int, copies: int, d: float
) -> tuple[tuple[str, ...], bool]:
    ranked = rank_nodes(nodes, partition)
    size = min(copies, brute_max_valid(nodes, d))
    # combinations() yields in lexicographic order of positions, i.e. score order.
    core = next(c for c in combinations(ranked, size) if pairwise_far(c, d))
    extra = [n for n in ranked if n not in core][: copies - size]
    return tuple(n.node_id for n in (*core, *extra)), size == copies


def greedy_place(nodes: Sequence[PlacementNode], partition: int, copies: int, d: float) -> int:
    """How many far-apart members the greedy walk (no backtracking) manages."""
    chosen: list[PlacementNode] = []
    for n in rank_nodes(nodes, partition):
        if len(chosen) < copies and all(far_apart(n, c, d) for c in chosen):
            chosen.append(n)
    return len(chosen)


def largest_far_subset(replicas: Sequence[str], nodes: Sequence[PlacementNode], d: float) -> int:
    by_id = {n.node_id: n for n in nodes}
    return brute_max_valid([by_id[r] for r in replicas], d)


# --- random geographies -----------------------------------------------------------


@st.composite
def geographies(draw: st.DrawFn) -> list[PlacementNode]:
    """Up to 12 sites in the continental US, sometimes with 2-3 nodes at one site."""
    nodes: list[PlacementNode] = []
    for s in range(draw(st.integers(1, 12))):
        lat = draw(st.floats(25.0, 49.0))
        lon = draw(st.floats(-124.0, -67.0))
        for k in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
            capacity = draw(st.integers(1, 16)) * TB
            nodes.append(PlacementNode(f"n{s}-{k}", f"site{s}", lat, lon, capacity))
    return nodes


distances = st.sampled_from([0.0, 100.0, 250.0, 250.0, 500.0, 1000.0, 1500.0])


@settings(max_examples=300, deadline=None)
@given(
    nodes=geographies(),
    partition=st.integers(0, 1023),
    copies=st.integers(1, 4),
    d=distances,
)
def test_place_matches_brute_force(
    nodes: list[PlacementNode], partition: int, copies: int, d: float
) -> None:
    got = place(nodes, partition, copies, d)
    best = brute_max_valid(nodes, d)
    assert len(got.replicas) == min(copies, len(nodes))
    assert len(set(got.replicas)) == len(got.replicas)
    if best >= copies:
        assert got.satisfied
        assert got.shortfall == ""
        by_id = {n.node_id: n for n in nodes}
        assert pairwise_far([by_id[r] for r in got.replicas], d)
    else:
        assert not got.satisfied
        assert got.shortfall.startswith(f"only {best} of {copies} copies")
        assert largest_far_subset(got.replicas, nodes, d) == best
    # Not just some valid set: the first one in score order, as the naive walk finds.
    assert (got.replicas, got.satisfied) == naive_place(nodes, partition, copies, d)


@settings(max_examples=200, deadline=None)
@given(nodes=geographies(), d=distances)
def test_max_pairwise_set_size_matches_brute_force(nodes: list[PlacementNode], d: float) -> None:
    positions = [(n.site, n.lat, n.lon) for n in nodes]
    assert max_pairwise_set_size(positions, d) == brute_max_valid(nodes, d)


@settings(max_examples=100, deadline=None)
@given(nodes=geographies(), copies=st.integers(1, 4), d=distances, seed=st.integers(0, 2**32))
def test_same_result_in_any_input_order(
    nodes: list[PlacementNode], copies: int, d: float, seed: int
) -> None:
    shuffled = list(nodes)
    random.Random(seed).shuffle(shuffled)
    assert place_all(nodes, 64, copies, d) == place_all(shuffled, 64, copies, d)


# --- hand-built cases -------------------------------------------------------------


def test_backtracking_finds_the_set_greedy_misses() -> None:
    # New York is within 250 miles of both Philadelphia (81) and Boston (190), which
    # are 271 apart. When New York scores first, greedy takes it and Chicago and is
    # stuck; the only valid triple is Philadelphia, Boston, Chicago.
    nodes = [
        city_node("nyc", "New York"),
        city_node("phl", "Philadelphia"),
        city_node("bos", "Boston"),
        city_node("chi", "Chicago"),
    ]
    partition = next(p for p in range(1024) if rank_nodes(nodes, p)[0].node_id == "nyc")
    assert greedy_place(nodes, partition, 3, 250.0) == 2

    got = place(nodes, partition, 3, 250.0)

    assert got.satisfied
    assert set(got.replicas) == {"phl", "bos", "chi"}
    assert got.shortfall == ""


def test_nodes_at_one_site_count_once() -> None:
    nodes = [
        city_node("bos-1", "Boston", 8 * TB),
        city_node("bos-2", "Boston", 8 * TB),
        city_node("bos-3", "Boston", 8 * TB),
        city_node("den-1", "Denver", 1 * TB),
    ]
    for p in range(64):
        got = place(nodes, p, 3, 250.0)
        assert not got.satisfied
        assert "only 2 of 3 copies" in got.shortfall
        assert "Boston" in got.shortfall and "Denver" in got.shortfall
        # Denver is always in the far-apart core; one Boston node fills the third slot.
        assert "den-1" in got.replicas[:2]
        assert sum(r.startswith("bos") for r in got.replicas) == 2
        assert largest_far_subset(got.replicas, nodes, 250.0) == 2


def test_same_site_name_is_one_site_whatever_the_coordinates() -> None:
    # A site name wins over coordinates (a mistyped position must not fake distance).
    lat, lon = CITIES["Seattle"]
    nodes = [city_node("a", "Boston"), PlacementNode("b", "Boston", lat, lon, 4 * TB)]
    assert not place(nodes, 0, 2, 250.0).satisfied
    assert max_pairwise_set_size([("Boston", *CITIES["Boston"]), ("Boston", lat, lon)], 0.0) == 1


def test_distinct_site_names_closer_than_d_are_one_site() -> None:
    lat, lon = CITIES["Boston"]
    nodes = [
        PlacementNode("a", "Boston-A", lat, lon, TB),
        PlacementNode("b", "Boston-B", lat + 0.1, lon, TB),
    ]
    assert not place(nodes, 0, 2, 250.0).satisfied
    # With D = 0 only the site name separates them.
    assert place(nodes, 0, 2, 0.0).satisfied


def test_fewer_nodes_than_copies() -> None:
    nodes = [city_node("sea", "Seattle"), city_node("mia", "Miami")]
    got = place(nodes, 7, 3, 250.0)
    assert sorted(got.replicas) == ["mia", "sea"]
    assert not got.satisfied
    assert "only 2 of 3 copies" in got.shortfall
    assert "only 2 node(s)" in got.shortfall


def test_no_nodes() -> None:
    assert place([], 0, 3, 250.0) == Placement((), False, "no nodes to place 3 copies on")


def test_exhausted_budget_still_places_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "SEARCH_VISITS_MAX", 1)
    nodes = [city_node(c.lower()[:3], c) for c in CITIES]
    got = place(nodes, 0, 3, 250.0)
    assert len(got.replicas) == 3
    assert not got.satisfied
    assert "budget exhausted" in got.shortfall


def test_invalid_input_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        city_node("x", "Boston", 0)
    with pytest.raises(ValueError, match="latitude"):
        PlacementNode("x", "s", 91.0, 0.0, TB)
    with pytest.raises(ValueError, match="duplicate"):
        place([city_node("x", "Boston"), city_node("x", "Denver")], 0, 2, 250.0)
    with pytest.raises(ValueError, match="copies"):
        place([city_node("x", "Boston")], 0, 0, 250.0)
    with pytest.raises(ValueError, match="min_distance"):
        place([city_node("x", "Boston")], 0, 1, math.nan)
    with pytest.raises(ValueError, match="partitions"):
        partition_of("1.2.3", 0)


# --- hashing ----------------------------------------------------------------------


def test_partition_of_is_pinned() -> None:
    # blake3("") starts af1349b9f5f9a1a6 (the published test vector); 0x...1a6 % 1024.
    assert partition_of("", 1024) == 0x1A6
    assert partition_of("1.2.840.113619.2.55.3.604688119.969.1268071029.320", 1024) == 571
    assert all(0 <= partition_of(f"1.2.3.{i}", 7) < 7 for i in range(100))


def test_great_circle_miles() -> None:
    assert great_circle_miles(*CITIES["Boston"], *CITIES["New York"]) == pytest.approx(190, 0.01)
    assert great_circle_miles(*CITIES["New York"], *CITIES["Los Angeles"]) == pytest.approx(
        2445, 0.01
    )
    assert great_circle_miles(10.0, 20.0, 10.0, 20.0) == 0.0
    # Antipodes: half the circumference, no math domain error.
    assert great_circle_miles(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * 3958.8)


def test_scores_are_finite_and_weighted_by_capacity() -> None:
    small = city_node("small", "Seattle", 1 * TB)
    big = city_node("big", "Miami", 3 * TB)
    partitions = 4096
    wins = 0
    for p in range(partitions):
        for n in (small, big):
            score = rendezvous_score(p, n)
            assert math.isfinite(score) and score > 0
        wins += place([small, big], p, 1, 250.0).replicas == ("big",)
    assert wins / partitions == pytest.approx(0.75, abs=0.03)


# --- stability and the table ------------------------------------------------------

TEN_CITIES = [
    "Boston",
    "New York",
    "Chicago",
    "Denver",
    "Seattle",
    "Los Angeles",
    "Atlanta",
    "Dallas",
    "Miami",
    "Philadelphia",
]


def changed_share(before: Sequence[Placement], after: Sequence[Placement]) -> float:
    changed = sum(set(a.replicas) != set(b.replicas) for a, b in zip(before, after, strict=True))
    return changed / len(before)


def test_adding_or_removing_a_node_moves_little() -> None:
    # Loose bounds that only catch regressions; bench/placement_stability.py measures.
    nodes = [city_node(f"node-{c}", c) for c in TEN_CITIES]
    before = place_all(nodes, 512, 3, 250.0)
    assert all(p.satisfied for p in before)
    grown = place_all([*nodes, city_node("node-Minneapolis", "Minneapolis")], 512, 3, 250.0)
    assert changed_share(before, grown) < 0.5
    shrunk = place_all(nodes[1:], 512, 3, 250.0)
    assert changed_share(before, shrunk) < 0.5


def test_placement_table_recomputes_only_on_change() -> None:
    nodes = [city_node(f"node-{c}", c) for c in TEN_CITIES]
    table = PlacementTable(partitions=128, copies=3, min_distance_miles=250.0)
    assert table.unsatisfied() == list(range(128))

    assert table.update(nodes)
    assert not table.update(reversed(nodes))
    assert list(table.placements) == place_all(nodes, 128, 3, 250.0)
    assert table.unsatisfied() == []
    uid = "1.2.826.0.1.3680043.10.1455.1"
    assert table.for_study(uid) == table.placement(partition_of(uid, 128))

    assert table.update(nodes[:2])  # Boston and New York: 190 miles apart
    assert table.unsatisfied() == list(range(128))
    assert table.members == frozenset(nodes[:2])
