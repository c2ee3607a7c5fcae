"""What a node should hold: pure decisions from placement, holdings and policy.

    may_trim      I hold a copy I am no longer meant to hold (a healed outage
                  moved the partition and it came back), I am not the origin
                  (a site keeps what it received), and the replica set, without
                  me, already holds verified full copies at N distant sites:
                  make before break, never below N by our own doing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pacsmesh.cluster.safety import Holding, Position, assess


def may_trim(me: str, origin: str, replicas: Sequence[str], instances: int,
             current_digest: bytes, holdings: Sequence[Holding],
             positions: Mapping[str, Position], copies: int,
             min_distance_miles: float) -> bool:
    if me in replicas or me == origin:
        return False
    others = [h for h in holdings if h.node_id != me and h.node_id in replicas]
    verdict = assess(instances, current_digest, others, positions, min_distance_miles)
    return verdict.safe_copies >= copies and len(verdict.full_holders) >= copies
