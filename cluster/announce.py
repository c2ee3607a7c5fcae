"""Announce, sans-IO: push fresh ingest to every alive peer at once.

Announcements are the fast path (a new study reaches its replica set within a
gossip round, not an anti-entropy round); anti-entropy is the safety net under
them, so a full queue may drop its oldest entries without losing anything.
"""

from __future__ import annotations

import collections
from typing import Generic

from pacsmesh.cluster.messages import M

BATCH_MAX = 256  # manifests per Announce: ~300 KB
QUEUE_MAX = 100_000  # beyond this, anti-entropy delivers the rest


class AnnounceQueue(Generic[M]):
    def __init__(self) -> None:
        self._queue: collections.deque[M] = collections.deque(maxlen=QUEUE_MAX)

    def on_stored(self, manifest: M) -> None:
        self._queue.append(manifest)

    def __len__(self) -> int:
        return len(self._queue)

    def next_batch(self) -> list[M]:
        """What to send to every alive peer now (empty: nothing new)."""
        batch: list[M] = []
        while self._queue and len(batch) < BATCH_MAX:
            batch.append(self._queue.popleft())
        return batch
