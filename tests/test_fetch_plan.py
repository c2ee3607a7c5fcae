"""The fetch planner over a real catalog: every manifest placed here and not held is
reached, however many manifests of other partitions the node knows without holding
(the old scan re-read the first 10,000 of those forever). Also the upgrade of a
data dir written before the fetch backlog was indexed by partition."""

from __future__ import annotations

import struct
from pathlib import Path

from pacsmesh.cluster.fetch import BATCH_MAX, Candidate, FetchPlanner
from pacsmesh.cluster.placement import partition_of
from pacsmesh.node import manifest as mf
from pacsmesh.node.catalog import EMPTY_DIGEST
from pacsmesh.node.store import Store
from tests import bulkload

PARTITIONS = 64
STUDIES = 30_000
MINE = frozenset(range(0, PARTITIONS, 5))  # 13 of 64 partitions placed here


class Index:
    """The planner's view of a real catalog (what cluster/transfer.py gives it)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def need_totals(self) -> dict[int, tuple[int, int]]:
        return self.store.catalog.need_totals()

    def need_page(self, partition: int, after: bytes, limit: int) -> list[bytes]:
        return self.store.catalog.need_page(partition, after, limit)

    def candidate(self, mid: bytes) -> Candidate | None:
        got = self.store.catalog.get(mid)
        if got is None or self.store.catalog.is_held(mid):
            return None
        m = got[1]
        return Candidate(mid, m.study_instance_uid,
                         partition_of(m.study_instance_uid, PARTITIONS), m.origin_node)


def _archive(path: Path) -> Store:
    """Every study known, none held (a node every replica set moved to at once)."""
    nowhere = [("elsewhere",)] * PARTITIONS
    bulkload.load(path, "here", STUDIES, nowhere, PARTITIONS)
    return Store(path, partitions=PARTITIONS)


def test_every_placed_manifest_is_reached_past_any_window(tmp_path: Path) -> None:
    store = _archive(tmp_path / "d")
    try:
        index = Index(store)
        totals = index.need_totals()
        assert sum(n for n, _ in totals.values()) == STUDIES
        want = sum(totals[p][0] for p in MINE if p in totals)
        assert STUDIES - want > 10_000 and want > 50 * BATCH_MAX
        planner = FetchPlanner(settle_s=2.0)
        planner.on_placement(MINE, 0.0)
        assert planner.plan(index, 1.0) == []  # a new placement must settle first
        assert planner.backlog(index) == (want, want * 96)
        planned: list[bytes] = []
        now = 2.0
        for _ in range(STUDIES):  # bounded: each round must make progress
            batch = planner.plan(index, now)
            if not batch:
                break
            assert len(batch) <= BATCH_MAX
            for c in batch:  # fetched: chunks put, committed as held
                assert c.partition in MINE, c
                raw, m = store.catalog.get(c.mid) or (b"", None)
                assert m is not None
                data = bulkload.manifest_of(int(c.study_uid.rsplit(".", 1)[1]), "x")[3]
                store.chunks.put(m.chunks[0].hash, len(data), data, 0)
                store.submit(c.mid, raw, m, held=True).result()
            planned += [c.mid for c in batch]
        assert len(planned) == len(set(planned)) == want
        assert planner.backlog(index) == (0, 0)
        now += 60.0  # a later pass finds nothing, reading only the per-partition counts
        assert planner.plan(index, now) == []
    finally:
        store.close()


def test_a_manifest_whose_chunks_are_nowhere_does_not_block_the_rest(tmp_path: Path) -> None:
    store = _archive(tmp_path / "d")
    try:
        index = Index(store)
        planner = FetchPlanner()
        planner.on_placement(MINE, 0.0)
        want = sum(n for p, (n, _) in index.need_totals().items() if p in MINE)
        first = planner.plan(index, 0.0)
        seen = {c.mid for c in first}  # never fetched: the sources had nothing
        for _ in range(STUDIES):
            batch = planner.plan(index, 0.0)
            if not batch:
                break
            assert not seen & {c.mid for c in batch}  # the cursor moved past them
            seen |= {c.mid for c in batch}
        assert len(seen) == want  # one pass reached every one, none fetched
        again = planner.plan(index, 1_000.0)  # the next pass retries from the start
        assert {c.mid for c in again} == {c.mid for c in first}
    finally:
        store.close()


def test_an_old_data_dir_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "d"
    replicas = [("here",) if p % 2 else ("elsewhere",) for p in range(PARTITIONS)]
    bulkload.load(path, "here", 2_000, replicas, PARTITIONS)
    store = Store(path, partitions=PARTITIONS)
    cat = store.catalog
    want_need = cat.need_totals()
    want_held = cat.held_partition_digests()
    assert any(n for _, n in want_held) and want_need
    # what format 1 looked like: not_held keyed by manifest id, no per-partition tables
    old = store.env.open_db(b"not_held")
    with store.env.begin(write=True) as txn:
        for key, _ in list(txn.cursor(db=cat.need)):
            txn.put(bytes(key[4:]), b"", db=old)
        for db in (cat.need, cat.part_need, cat.part_held, cat.safety, cat.unsafe):
            txn.drop(db, delete=False)
        for key in (b"format", b"instances"):
            txn.delete(key, db=cat.meta)
    store.close()
    store = Store(path, partitions=PARTITIONS)
    try:
        cat = store.catalog
        assert cat.need_totals() == want_need
        assert cat.held_partition_digests() == want_held
        assert cat.instance_count() == 2_000
        studies, unsafe, oldest = cat.safety_counts()
        assert studies == unsafe == 2_000 and oldest is not None  # judged again by the cluster
        assert cat.take_sweep_request() and not cat.take_sweep_request()
        with store.env.begin() as txn:
            assert txn.stat(store.env.open_db(b"not_held"))["entries"] == 0
        assert all(d != EMPTY_DIGEST or n == 0 for d, n in cat.held_partition_digests())
        m = mf.decode(cat.get(cat.need_page(0, b"", 1)[0])[1].SerializeToString())  # type: ignore[index]
        assert partition_of(m.study_instance_uid, PARTITIONS) == 0
    finally:
        store.close()


def test_need_page_reads_in_order_after_a_key(tmp_path: Path) -> None:
    store = _archive(tmp_path / "d")
    try:
        p = next(iter(sorted(MINE)))
        pages, after = [], b""
        while page := store.catalog.need_page(p, after, 37):
            pages += page
            after = page[-1]
        assert pages == sorted(pages) and len(pages) == store.catalog.need_totals()[p][0]
        assert struct.calcsize(">Q") == 8
    finally:
        store.close()
