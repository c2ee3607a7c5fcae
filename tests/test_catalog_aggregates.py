"""The catalog's per-partition aggregates always equal what they sum, through new
versions, held and dropped copies: every periodic comparison (holdings, fetch
backlog, trim candidates) starts from them, so a drift would cost a re-read on
every round forever, or hide a copy to fetch."""

from __future__ import annotations

import random
from pathlib import Path

from pacsmesh.cluster.antientropy import ADHASH_MOD
from pacsmesh.node import manifest as mf
from pacsmesh.node.catalog import DIGEST_LEN, EMPTY_DIGEST, partition_of
from pacsmesh.node.store import Store
from tests import bulkload

PARTITIONS = 16
STUDIES = 400
STEPS = 3000


def _sum(digests: list[bytes]) -> bytes:
    return (sum(int.from_bytes(d, "big") for d in digests) % ADHASH_MOD).to_bytes(
        DIGEST_LEN, "big")


def test_aggregates_follow_versions_and_holding(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = Store(tmp_path / "d", partitions=PARTITIONS)
    cat = store.catalog
    try:
        known: dict[bytes, tuple[bytes, object]] = {}
        for step in range(STEPS):
            i = rng.randrange(STUDIES)
            mid, raw, m, data = bulkload.manifest_of(i, "o")
            store.chunks.put(m.chunks[0].hash, len(data), data, 0)  # held: chunks are here
            what = rng.random()
            if what < 0.5:  # a new version of the instance (another origin time)
                m.received_hlc += (step + 1) << 16
                m.origin_node = f"o{step}"
                mid, raw = mf.encode(m)
                store.submit(mid, raw, m, held=rng.random() < 0.5).result()
                known[mid] = (raw, m)
            elif what < 0.8 and known:
                mid = rng.choice(sorted(known))
                raw, m2 = known[mid]
                store.submit(mid, raw, m2, held=True).result()  # type: ignore[arg-type]
            elif known:
                store.unhold([rng.choice(sorted(known))])
        held_parts = cat.held_partition_digests()
        by_part: dict[int, list[bytes]] = {}
        counts: dict[int, int] = {}
        held_studies = set()
        for rec in cat.study_page("", 10 * STUDIES):
            by_part.setdefault(rec.partition, []).append(rec.held_digest)
            counts[rec.partition] = counts.get(rec.partition, 0) + rec.held_instances
            if rec.held_instances:
                held_studies.add(rec.study_uid)
        for p in range(PARTITIONS):
            want = _sum(by_part.get(p, [])) if counts.get(p) else EMPTY_DIGEST
            assert held_parts[p] == (want, counts.get(p, 0)), p
            page = cat.partition_study_page(p, "", 10 * STUDIES, held_only=True)
            assert {r.study_uid for r in page} == {s for s in held_studies
                                                   if partition_of(s, PARTITIONS) == p}
        need = cat.need_totals()
        for p in range(PARTITIONS):
            ids = cat.need_page(p, b"", 10 * STEPS)
            assert all(not cat.is_held(i) for i in ids)
            assert need.get(p, (0, 0))[0] == len(ids)
        assert sum(n for n, _ in need.values()) == sum(
            1 for mid in known if not cat.is_held(mid))
    finally:
        store.close()


def test_safety_marks_are_durable_and_a_new_change_is_never_cleared(tmp_path: Path) -> None:
    """The request to judge a study again is written with the change it follows; a
    verdict clears only the mark it answered, not one a later change made."""
    store = Store(tmp_path / "d", partitions=PARTITIONS)
    mid, raw, m, data = bulkload.manifest_of(1, "o")
    store.submit(mid, raw, m, held=False).result()
    store.chunks.put(m.chunks[0].hash, len(data), data, 0)  # (fetched later, below)
    study = m.study_instance_uid
    store.close()
    store = Store(tmp_path / "d", partitions=PARTITIONS)  # a restart keeps the request
    cat = store.catalog
    try:
        marks = cat.dirty_page(10)
        assert [s for s, _ in marks] == [study]
        store.submit(mid, raw, m, held=True).result()  # changed while being judged
        cat.set_safety([(study, 0, True)], marks)
        assert [s for s, _ in cat.dirty_page(10)] == [study]  # so judged again
        cat.set_safety([(study, 1, True)], cat.dirty_page(10))
        assert cat.dirty_page(10) == [] and cat.dirty_count() == 0
    finally:
        store.close()


def test_pushed_deltas_keep_the_peer_cache_sums_exact(tmp_path: Path) -> None:
    """A peer's pushed holding changes update single studies and their partition sums,
    so the next digest comparison finds nothing to re-read."""
    from pacsmesh.cluster.holdings_cache import PeerHoldings

    store = Store(tmp_path / "d", partitions=PARTITIONS)
    try:
        cache = PeerHoldings(store.env, PARTITIONS)
        rng = random.Random(3)
        truth: dict[tuple[int, str], tuple[int, bytes]] = {}
        for _ in range(2000):
            study = f"1.2.3.{rng.randrange(300)}"
            p = partition_of(study, PARTITIONS)
            n = rng.choice((0, 1, 2, 5))
            d = bytes(rng.randrange(256) for _ in range(32)) if n else EMPTY_DIGEST
            cache.apply("peer", [(study, p, n, d)])
            if n:
                truth[(p, study)] = (n, d)
            else:
                truth.pop((p, study), None)
        got = cache.partition_digests("peer")
        for p in range(PARTITIONS):
            items = [v for (q, _), v in truth.items() if q == p]
            want = (_sum([d for _, d in items]) if items else EMPTY_DIGEST,
                    sum(n for n, _ in items))
            assert got[p] == want, p
        # a full re-read of a partition agrees with what the deltas built
        p0 = next(p for p in range(PARTITIONS) if got[p][1])
        cache.replace("peer", p0, [(s, n, d) for (q, s), (n, d) in truth.items() if q == p0])
        assert cache.partition_digests("peer")[p0] == got[p0]
    finally:
        store.close()
