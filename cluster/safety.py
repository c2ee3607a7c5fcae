"""Is a study safe? Pure code over what holders report and what the asker knows.

A holder counts only if it is alive and holds every current instance of the
study, verified: its held digest (AdHash of held current manifest ids) equals
the asker's digest of the study's current ids. A holder that knows a different
set of versions (the sync has not reached it yet) does not count until it does:
in doubt, a copy is not safe. `safe_copies` is the size of the largest set of
counted holders whose sites are pairwise at least D miles apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pacsmesh.cluster.placement import max_pairwise_set_size


@dataclass(frozen=True, slots=True)
class Holding:
    """What one node says it holds of one study."""

    node_id: str
    held_instances: int
    held_digest: bytes


@dataclass(frozen=True, slots=True)
class Position:
    node_id: str
    site: str
    lat: float
    lon: float
    alive: bool


@dataclass(frozen=True, slots=True)
class StudySafety:
    holders: tuple[tuple[str, int], ...]  # (node id, instances held), every holder
    full_holders: tuple[str, ...]  # alive, holding every current instance, verified
    safe_copies: int


def assess(instances: int, current_digest: bytes, holdings: Iterable[Holding],
           positions: Mapping[str, Position], min_distance_miles: float) -> StudySafety:
    holders: list[tuple[str, int]] = []
    full: list[str] = []
    for h in sorted(holdings, key=lambda h: h.node_id):
        if h.held_instances <= 0:
            continue
        holders.append((h.node_id, h.held_instances))
        pos = positions.get(h.node_id)
        if (pos is not None and pos.alive and instances > 0
                and h.held_instances == instances and h.held_digest == current_digest):
            full.append(h.node_id)
    return StudySafety(tuple(holders), tuple(full),
                       safe_copies(full, positions, min_distance_miles))


def safe_copies(node_ids: Sequence[str], positions: Mapping[str, Position],
                min_distance_miles: float) -> int:
    sites = [(positions[n].site, positions[n].lat, positions[n].lon) for n in node_ids
             if n in positions]
    return max_pairwise_set_size(sites, min_distance_miles) if sites else 0
