"""Fuzz: manifests as the catalog stores them (node/catalog.py), damaged on disk.

LMDB keeps no checksums: a flipped bit in a stored manifest reads back as other
bytes. A manifest is named by the hash of its bytes, so a damaged one can be told
apart; whatever the damage, what the catalog hands out and what this node serves to
its peers (GetManifests, a partition pulled whole) is the stored manifest exactly,
or nothing. A peer re-derives a manifest's id from its bytes: one damaged bit
served would reach every node as a new version of the instance.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.node.catalog import partition_of
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import Prepared, prepare_local
from pacsmesh.node.store import Store
from pacsmesh.sample import StudySpec, make_instance, study_uid
from tests.fuzz import fuzz, mutated

PARTITIONS = 16
SPEC = StudySpec(study_index=97, seed=47, instances=3, rows=8, columns=8)


class Node:
    def __init__(self, store: Store, replicator: Replicator, stored: dict[bytes, bytes]) -> None:
        self.store, self.replicator, self.stored = store, replicator, stored

    def __repr__(self) -> str:
        return "Node(...)"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    store = Store(tmp_path_factory.mktemp("fuzz-catalog") / "node", partitions=PARTITIONS)
    pool = ThreadPoolExecutor(2)
    clock = HybridClock()
    state = ClusterState("n-fuzz", PARTITIONS, 3, 250.0, dead_after_s=600.0)
    replicator = Replicator(store, state, Peers(), "n-fuzz", "127.0.0.1:1", clock, pool)
    stored: dict[bytes, bytes] = {}
    try:
        for n in range(1, SPEC.instances + 1):
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


@fuzz(0.4)
@given(st.data())
def test_a_damaged_stored_manifest_is_never_handed_out(node: Node, data: st.DataObject) -> None:
    mid = data.draw(st.sampled_from(sorted(node.stored)))
    original = node.stored[mid]
    damaged = data.draw(mutated([original]))
    catalog = node.store.catalog
    with node.store.env.begin(write=True, db=catalog.manifests) as txn:
        txn.put(mid, damaged)
    try:
        got = catalog.get(mid)
        assert got is None or got[0] == original, "a damaged manifest was handed out"
        # what this node would serve its peers
        partition = partition_of(study_uid(SPEC), PARTITIONS)
        served, _, _ = node.replicator.partition_manifests(partition, "", 100)
        assert set(served) <= set(node.stored.values()), "a damaged manifest was served"
    finally:
        with node.store.env.begin(write=True, db=catalog.manifests) as txn:
            txn.put(mid, original)
