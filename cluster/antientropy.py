"""Anti-entropy by digests, pure: compare, descend where different, list what is missing.

Every node holds every manifest (they are small; chunks are what placement
spreads), so any two nodes can compare. The tree has three levels:
partition -> study -> manifest ids. Level 0 is one AdHash digest per partition
(P x 40 bytes); only partitions whose digests differ are opened, then only
studies whose digests differ, so the cost follows the difference, and a
difference reads as "study X: 3 manifests missing here" in the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def differing_partitions(mine: Sequence[tuple[bytes, int]],
                         theirs: Sequence[tuple[bytes, int]]) -> list[int]:
    """Partitions where the peer may hold manifests we lack (a set only grows: a
    peer with no manifests in a partition has nothing for us there)."""
    if len(mine) != len(theirs):
        raise ValueError(f"partition counts differ: {len(mine)} != {len(theirs)}")
    return [p for p, (a, b) in enumerate(zip(mine, theirs, strict=True))
            if a[0] != b[0] and b[1] > 0]


def differing_studies(mine: Mapping[str, tuple[bytes, int]],
                      theirs: Iterable[tuple[str, bytes, int]]) -> list[str]:
    return [study for study, digest, count in theirs
            if count > 0 and mine.get(study, (b"", 0))[0] != digest]


def missing(mine: set[bytes], theirs: Iterable[bytes]) -> list[bytes]:
    return [i for i in theirs if i not in mine]
