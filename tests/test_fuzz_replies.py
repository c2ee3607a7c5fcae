"""Fuzz: what peers answer (cluster/antientropy.py SyncRound, cluster/holdings.py
HoldingsRound), driven as cluster/workers.py drives them, over a real store.

A peer's replies come off the network like its requests: pages that never advance,
digest lists of the wrong length, replies of the wrong type, garbage manifests. A
round against such a peer still ends after a bounded number of exchanges, raises
nothing, and harms nothing stored.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import strategies as st

from cluster import messages as msg
from cluster.antientropy import SyncRound
from cluster.peers import Peers
from cluster.state import ClusterState
from cluster.transfer import Replicator
from node.hlc import HybridClock
from node.ingest import Prepared, prepare_local
from node.store import Store
from pacsmesh.sample import StudySpec, make_instance, study_uid
from tests.fuzz import blobs, u64s

PARTITIONS = 16
SPEC = StudySpec(study_index=95, seed=43, instances=2, rows=8, columns=8)
# Few names, so a hostile peer repeats itself: pages that do not advance
UIDS = [study_uid(SPEC), "1.2.3", "1.2.4", "1.2.5", ""]
EXCHANGES_MAX = 1000  # far above what these small replies can honestly need


class Node:
    def __init__(self, store: Store, replicator: Replicator, stored: dict[bytes, bytes]) -> None:
        self.store, self.replicator, self.stored = store, replicator, stored

    def __repr__(self) -> str:
        return "Node(...)"

    def assert_unharmed(self) -> None:
        for mid, raw in self.stored.items():
            got = self.store.catalog.get(mid)
            assert got is not None and got[0] == raw and self.store.catalog.is_held(mid)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    store = Store(tmp_path_factory.mktemp("fuzz-replies") / "node", partitions=PARTITIONS)
    pool = ThreadPoolExecutor(2)
    clock = HybridClock()
    state = ClusterState("n-fuzz", PARTITIONS, 3, 250.0, dead_after_s=600.0)
    replicator = Replicator(store, state, Peers(), "n-fuzz", "127.0.0.1:1", clock, pool)
    stored = {}
    try:
        for n in (1, 2):
            buf = io.BytesIO()
            make_instance(SPEC, 1, n).save_as(buf, enforce_file_format=True)
            p = prepare_local(store, "n-fuzz", clock, buf.getvalue(), "base")
            assert isinstance(p, Prepared)
            store.submit(p.manifest_id, p.raw, p.manifest).result(30)
            stored[p.manifest_id] = p.raw
        yield Node(store, replicator, stored)
    finally:
        store.close()
        pool.shutdown()


def digests(n: int) -> st.SearchStrategy[tuple[tuple[bytes, int], ...]]:
    return st.lists(st.tuples(blobs(), u64s()), min_size=n, max_size=n).map(tuple)


def part_lists() -> st.SearchStrategy[tuple[tuple[bytes, int], ...]]:
    return st.one_of(digests(PARTITIONS), digests(PARTITIONS - 1), digests(0))


def test_partition_digests_of_another_length_end_the_round(node: Node) -> None:
    """Regression: a peer answering with one partition digest fewer than ours made
    differing_partitions raise ValueError out of the round, and the anti-entropy
    worker failed and backed off, for every peer."""
    round_: SyncRound[bytes] = SyncRound(node.replicator, "hostile")
    round_.start()
    assert round_.on_reply(msg.RootGive(bytes(32), 1)) == ((), msg.PartitionDigestsAsk())
    short = msg.PartitionDigestsGive(((bytes(32), 1),) * (PARTITIONS - 1))
    assert round_.on_reply(short) == ((), None)
