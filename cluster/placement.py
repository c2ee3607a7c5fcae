"""Where each partition's copies live: pure code, no IO, no clock, no randomness.

A study belongs to partition ``partition_of(study_uid, P)``. For each partition the
replica set is ``copies`` nodes whose sites are pairwise at least D miles apart,
chosen by weighted rendezvous hashing (weight = capacity) so that adding or removing
one node moves little, and every node computes the same answer from the same member
table.

Two nodes are *close* when they share a ``site`` string or are less than D miles
apart; close nodes never both count towards the distance rule. Walking the score
order greedily can miss a valid set (the top node may exclude the two others that
would have fitted), so the walk backtracks: the result is the first valid set in
score order, the same set the naive "try every combination in score order" finds
(``tests/test_placement.py`` checks exactly that). When no valid set exists the best
one is still placed and ``Placement.shortfall`` says why, so status can say it loudly.

The searches work on int bitmasks over nodes and prune with a clique cover: nodes
that are pairwise close can give at most one member, so the number of such groups
among the candidates bounds how many more members can still be found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from blake3 import blake3

EARTH_RADIUS_MILES = 3958.8

# Candidates a single search may consider before it gives up. On random US
# geographies of 64 nodes with D tuned so that exactly `copies` sites fit (the
# hardest case), copies 2..6 needed at most ~1,000; only absurd settings (copies
# ~20) come near the limit, which guards the caller against stalling (~1-3 s per
# search at worst). When it is hit, placement falls back to the greedy walk and
# says so in the shortfall; the outcome is still deterministic.
SEARCH_VISITS_MAX = 100_000

# How many site names a shortfall message lists before eliding the rest.
SHORTFALL_SITES_SHOWN_MAX = 12

# u is built from 52 hash bits as (h + 0.5) / 2**52: exactly representable and
# strictly inside (0, 1), so ln(u) is finite and negative.
_U_BITS = 52


@dataclass(frozen=True)
class PlacementNode:
    """One member as placement sees it: where it is and how much it can hold."""

    node_id: str
    site: str
    lat: float
    lon: float
    capacity: int  # bytes

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if not -90.0 <= self.lat <= 90.0:
            raise ValueError(f"{self.node_id}: latitude {self.lat} outside [-90, 90]")
        if not -180.0 <= self.lon <= 180.0:
            raise ValueError(f"{self.node_id}: longitude {self.lon} outside [-180, 180]")
        if self.capacity <= 0:
            raise ValueError(f"{self.node_id}: capacity must be > 0, got {self.capacity}")


@dataclass(frozen=True)
class Placement:
    """The replica set of one partition.

    ``replicas`` is in preference order: first the members that satisfy the distance
    rule (in score order), then, only when the rule cannot be met, extra nodes in
    score order that still add disk redundancy. ``shortfall`` is "" when satisfied.
    """

    replicas: tuple[str, ...]
    satisfied: bool
    shortfall: str


def great_circle_miles(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in statute miles."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlam = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    # Rounding can push a a hair outside [0, 1] for antipodal or identical points.
    a = min(1.0, max(0.0, a))
    return 2 * EARTH_RADIUS_MILES * math.asin(math.sqrt(a))


def partition_of(study_uid: str, partitions: int) -> int:
    """The partition a study belongs to. Changing this moves every study: don't."""
    if partitions <= 0:
        raise ValueError(f"partitions must be > 0, got {partitions}")
    digest = blake3(study_uid.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def rendezvous_score(partition: int, node: PlacementNode) -> float:
    """Weighted rendezvous (HRW) score: -capacity / ln(u), u uniform in (0, 1).

    The largest score wins; a node with twice the capacity wins twice as often.
    """
    digest = blake3(f"{partition}:{node.node_id}".encode()).digest()
    h = int.from_bytes(digest[:8], "big") >> (64 - _U_BITS)
    u = (h + 0.5) / (1 << _U_BITS)
    return -node.capacity / math.log(u)


def rank_nodes(nodes: Iterable[PlacementNode], partition: int) -> list[PlacementNode]:
    """Nodes by descending score for ``partition``; ties go to the smaller node_id."""
    return sorted(nodes, key=lambda n: (-rendezvous_score(partition, n), n.node_id))


def place(
    nodes: Sequence[PlacementNode],
    partition: int,
    copies: int,
    min_distance_miles: float,
) -> Placement:
    """The replica set of one partition (see the module docstring)."""
    return _Geometry.build(nodes, copies, min_distance_miles).place(partition)


def place_all(
    nodes: Sequence[PlacementNode],
    partitions: int,
    copies: int,
    min_distance_miles: float,
) -> list[Placement]:
    """Placements for partitions 0..partitions-1, sharing the distance work."""
    if partitions <= 0:
        raise ValueError(f"partitions must be > 0, got {partitions}")
    geometry = _Geometry.build(nodes, copies, min_distance_miles)
    return [geometry.place(p) for p in range(partitions)]


def max_pairwise_set_size(
    positions: Sequence[tuple[str, float, float]], min_distance_miles: float
) -> int:
    """Size of the largest subset of holders whose sites are pairwise >= D apart.

    ``positions`` are (site, lat, lon) of the nodes holding a copy; holders at one
    site (or closer than D) count once. This is the number of copies that survive
    the loss of any one site region, i.e. the "safe copies" of a study. Exact for
    any realistic holder count; should the search budget ever run out, the answer
    is an under-estimate, the safe side for an alert.
    """
    if not positions:
        return 0
    far = _far_masks(list(positions), min_distance_miles)
    size, _exact = _max_independent_size(far, cap=len(positions))
    return size


class PlacementTable:
    """Placements of every partition, recomputed only when the member table changes.

    Pure state: the caller feeds it member tables and reads placements back.
    """

    def __init__(self, partitions: int, copies: int, min_distance_miles: float) -> None:
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        _check_settings(copies, min_distance_miles)
        self.partitions = partitions
        self.copies = copies
        self.min_distance_miles = min_distance_miles
        self._members: frozenset[PlacementNode] = frozenset()
        self._placements: tuple[Placement, ...] = tuple(
            place_all([], partitions, copies, min_distance_miles)
        )
        self._by_node: dict[str, frozenset[int]] = {}

    def update(self, nodes: Iterable[PlacementNode]) -> bool:
        """Adopt a new member table; True if it differs from the previous one."""
        members = frozenset(nodes)
        if members == self._members:
            return False
        self._placements = tuple(
            place_all(
                sorted(members, key=lambda n: n.node_id),
                self.partitions,
                self.copies,
                self.min_distance_miles,
            )
        )
        self._members = members
        self._by_node = {}
        return True

    def partitions_of(self, node_id: str) -> frozenset[int]:
        """The partitions whose replica set includes `node_id` (computed once per table)."""
        got = self._by_node.get(node_id)
        if got is None:
            got = frozenset(p for p, pl in enumerate(self._placements) if node_id in pl.replicas)
            self._by_node = {**self._by_node, node_id: got}  # copy on write: threads read it
        return got

    @property
    def members(self) -> frozenset[PlacementNode]:
        return self._members

    @property
    def placements(self) -> tuple[Placement, ...]:
        return self._placements

    def placement(self, partition: int) -> Placement:
        return self._placements[partition]

    def for_study(self, study_uid: str) -> Placement:
        return self._placements[partition_of(study_uid, self.partitions)]

    def unsatisfied(self) -> list[int]:
        """Partitions whose replica set breaks the distance rule (for status)."""
        return [p for p, pl in enumerate(self._placements) if not pl.satisfied]


# --- internals -------------------------------------------------------------------


class _BudgetExhaustedError(Exception):
    pass


class _Budget:
    def __init__(self, visits_max: int) -> None:
        self.left = visits_max

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _BudgetExhaustedError


def _check_settings(copies: int, min_distance_miles: float) -> None:
    if copies <= 0:
        raise ValueError(f"copies must be > 0, got {copies}")
    if not min_distance_miles >= 0.0:  # also rejects NaN
        raise ValueError(f"min_distance_miles must be >= 0, got {min_distance_miles}")


def _far_masks(
    positions: Sequence[tuple[str, float, float]], min_distance_miles: float
) -> list[int]:
    """far[i] has bit j set when i and j may both count: other site and >= D apart."""
    far = [0] * len(positions)
    for i, (site_i, lat_i, lon_i) in enumerate(positions):
        for j in range(i + 1, len(positions)):
            site_j, lat_j, lon_j = positions[j]
            if site_i == site_j:
                continue
            if great_circle_miles(lat_i, lon_i, lat_j, lon_j) >= min_distance_miles:
                far[i] |= 1 << j
                far[j] |= 1 << i
    return far


def _low_index(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def _clique_cover_bound(avail: int, close: Sequence[int], enough: int) -> int:
    """Upper bound on how many pairwise-far nodes ``avail`` holds, capped at ``enough``.

    Greedily splits ``avail`` into groups of pairwise-close nodes; a valid set takes
    at most one node per group. Stops counting once ``enough`` is reached, since the
    caller only asks "can ``enough`` more still be found?".
    """
    groups = 0
    while avail:
        groups += 1
        if groups >= enough:
            return groups
        rest = avail & close[_low_index(avail)]
        group = 0
        while rest:
            u = _low_index(rest)
            group |= 1 << u
            rest &= close[u] & ~(1 << u)
        avail &= ~group
    return groups


def _max_independent_size(far: Sequence[int], cap: int) -> tuple[int, bool]:
    """(largest pairwise-far set size, capped at ``cap``; whether it is exact).

    Branch and bound over node indices. If the budget runs out the best size found
    so far is returned with exact=False: an under-estimate, the conservative side
    for both placement ("cannot satisfy") and safe-copy counts.
    """
    n = len(far)
    everyone = (1 << n) - 1
    close = [everyone & ~f for f in far]
    budget = _Budget(SEARCH_VISITS_MAX)
    best = 0

    def grow(size: int, cand: int) -> None:
        nonlocal best
        best = max(best, size)
        while cand and best < cap:
            budget.spend()
            if size + _clique_cover_bound(cand, close, cap - size) <= best:
                return
            v = _low_index(cand)
            cand &= ~(1 << v)
            grow(size + 1, cand & far[v])

    try:
        grow(0, everyone)
    except _BudgetExhaustedError:
        return min(best, cap), False
    return min(best, cap), True


def _first_valid_set(
    order: Sequence[int], far: Sequence[int], close: Sequence[int], size: int
) -> list[int] | None:
    """The first pairwise-far set of ``size`` nodes in ``order`` (lexicographic by
    position), by depth-first search; None if there is none. Raises
    _BudgetExhaustedError if the search takes too long."""
    n = len(order)
    # suffix[j]: the nodes at order positions j.. (the candidates still ahead).
    suffix = [0] * (n + 1)
    for j in range(n - 1, -1, -1):
        suffix[j] = suffix[j + 1] | (1 << order[j])
    budget = _Budget(SEARCH_VISITS_MAX)
    chosen: list[int] = []
    # Candidate sets already shown unable to give `need` more; different prefixes
    # often leave the same candidates, since nearby nodes exclude alike.
    dead: set[tuple[int, int]] = set()

    def extend(pos: int, cand: int) -> bool:
        need = size - len(chosen)
        if need == 0:
            return True
        for j in range(pos, n):
            v = order[j]
            if not (cand >> v) & 1:
                continue
            budget.spend()
            avail = cand & suffix[j]
            # The bound only shrinks as j advances, so a failure here ends the level.
            if (
                avail.bit_count() < need
                or (avail, need) in dead
                or _clique_cover_bound(avail, close, need) < need
            ):
                dead.add((avail, need))
                return False
            chosen.append(v)
            if extend(j + 1, cand & far[v]):
                return True
            chosen.pop()
        dead.add((cand & suffix[pos], need))
        return False

    return chosen if extend(0, suffix[0]) else None


def _greedy_valid_set(order: Sequence[int], far: Sequence[int], size: int) -> list[int]:
    """Fallback when the search runs out of budget: take whatever fits in score order."""
    chosen: list[int] = []
    cand = -1  # all bits set
    for v in order:
        if len(chosen) == size:
            break
        if (cand >> v) & 1:
            chosen.append(v)
            cand &= far[v]
    return chosen


@dataclass(frozen=True)
class _Geometry:
    """Everything about a member table that does not depend on the partition."""

    # Sorted west to east (ties by node_id): canonical indices, and the clique cover,
    # which grows groups from the lowest index, then groups true neighbours.
    nodes: tuple[PlacementNode, ...]
    far: tuple[int, ...]
    close: tuple[int, ...]
    copies: int
    min_distance_miles: float
    valid_size: int  # largest pairwise-far set, capped at copies
    valid_size_exact: bool
    shortfall: str

    @staticmethod
    def build(nodes: Sequence[PlacementNode], copies: int, min_distance_miles: float) -> _Geometry:
        _check_settings(copies, min_distance_miles)
        by_id = sorted(nodes, key=lambda n: n.node_id)
        ordered = tuple(sorted(by_id, key=lambda n: (n.lon, n.lat, n.node_id)))
        for a, b in pairwise(by_id):
            if a.node_id == b.node_id:
                raise ValueError(f"duplicate node_id {a.node_id!r} in member table")
        far = _far_masks([(n.site, n.lat, n.lon) for n in ordered], min_distance_miles)
        everyone = (1 << len(ordered)) - 1
        close = tuple(everyone & ~f for f in far)
        valid_size, exact = _max_independent_size(far, cap=copies)
        return _Geometry(
            nodes=ordered,
            far=tuple(far),
            close=close,
            copies=copies,
            min_distance_miles=min_distance_miles,
            valid_size=valid_size,
            valid_size_exact=exact,
            shortfall=_shortfall_message(ordered, copies, min_distance_miles, valid_size, exact),
        )

    def place(self, partition: int) -> Placement:
        order = sorted(
            range(len(self.nodes)),
            key=lambda i: (-rendezvous_score(partition, self.nodes[i]), self.nodes[i].node_id),
        )
        shortfall = self.shortfall
        try:
            core = _first_valid_set(order, self.far, self.close, self.valid_size)
        except _BudgetExhaustedError:
            core = None
        if core is None:
            # Only reachable when the budget ran out: valid_size is known to fit.
            core = _greedy_valid_set(order, self.far, self.valid_size)
            if len(core) < self.copies:
                shortfall = _shortfall_message(
                    self.nodes, self.copies, self.min_distance_miles, len(core), exact=False
                )
        in_core = set(core)
        extra = [i for i in order if i not in in_core][: self.copies - len(core)]
        satisfied = len(core) == self.copies
        return Placement(
            replicas=tuple(self.nodes[i].node_id for i in core + extra),
            satisfied=satisfied,
            shortfall="" if satisfied else shortfall,
        )


def _shortfall_message(
    nodes: Sequence[PlacementNode],
    copies: int,
    min_distance_miles: float,
    placed: int,
    exact: bool,
) -> str:
    if placed >= copies:
        return ""
    if not nodes:
        return f"no nodes to place {copies} copies on"
    sites = sorted({n.site for n in nodes})
    shown = ", ".join(sites[:SHORTFALL_SITES_SHOWN_MAX])
    if len(sites) > SHORTFALL_SITES_SHOWN_MAX:
        shown += ", ..."
    message = (
        f"only {placed} of {copies} copies can be placed at sites "
        f">= {min_distance_miles:g} miles apart (sites: {shown})"
    )
    if len(nodes) < copies:
        message += f"; the cluster has only {len(nodes)} node(s)"
    if not exact:
        message += "; search budget exhausted, a valid set may exist"
    return message
