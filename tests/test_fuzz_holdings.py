"""Fuzz: what peers say they hold (cluster/holdings_cache.py), into a real LMDB.

A peer's pushed holdings delta (PushHeld) and its pages of held studies (the
holdings exchange) name studies, counts and digests of its choosing. Whatever they
say, the cache stays what it claims to be: only storable holdings are kept (a valid
study UID, a bounded count, a digest of its length), and every partition's stored
sum is exactly the sum of its studies; never an exception.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pacsmesh.cluster.holdings_cache import ADHASH_MOD, HELD_INSTANCES_MAX, SEP, PeerHoldings
from pacsmesh.node.catalog import DIGEST_LEN, EMPTY_DIGEST, partition_of
from pacsmesh.node.store import Store
from pacsmesh.node.uids import uid_problem
from tests.fuzz import blobs, fuzz, texts, u64s

PARTITIONS = 16
PEERS = ["peer-1", "peer-2"]
UIDS = ["1.2.3", "1.2.4", "1.2.0", "1.2.86", "1.2.840.1"]


class Cache:
    def __init__(self, store: Store, holdings: PeerHoldings) -> None:
        self.store, self.holdings = store, holdings

    def __repr__(self) -> str:
        return "Cache(...)"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cache]:
    store = Store(Path(tmp_path_factory.mktemp("fuzz-holdings")) / "node",
                  partitions=PARTITIONS)
    try:
        yield Cache(store, PeerHoldings(store.env, PARTITIONS))
    finally:
        store.close()


def assert_consistent(cache: Cache, peer: str) -> None:
    """Each partition's stored (digest, count) sums exactly its stored studies."""
    h = cache.holdings
    sums: dict[int, tuple[int, int]] = {}
    prefix = peer.encode() + SEP
    with h.env.begin(db=h.held) as txn:
        for key, raw in txn.cursor():
            if not key.startswith(prefix):
                continue
            (partition,) = struct.unpack(">I", key[len(prefix) : len(prefix) + 4])
            study = bytes(key[len(prefix) + 4 :]).decode()
            n, digest = struct.unpack(">Q", raw[:8])[0], bytes(raw[8:])
            assert uid_problem(study) is None and 0 < n <= HELD_INSTANCES_MAX
            assert len(digest) == DIGEST_LEN and partition < PARTITIONS
            d, c = sums.get(partition, (0, 0))
            sums[partition] = ((d + int.from_bytes(digest, "big")) % ADHASH_MOD, c + n)
    for p, (digest, count) in enumerate(h.partition_digests(peer)):
        d, c = sums.get(p, (0, 0))
        assert (digest, count) == (d.to_bytes(DIGEST_LEN, "big") if c else EMPTY_DIGEST, c)


def holdings() -> st.SearchStrategy[tuple[str, int, bytes]]:
    return st.tuples(texts(UIDS), st.one_of(st.integers(0, 5), u64s()),
                     st.one_of(st.just(bytes(range(32))), blobs()))


@fuzz(2)
@given(st.sampled_from(PEERS), st.lists(holdings(), max_size=12))
# (regression) two studies of one partition at 2**63 instances each: the partition's
# sum outgrew its 8 bytes, and struct.error ended the PushHeld call (UNKNOWN)
@example("peer-1", [("1.2.0", 2**63, bytes(32)), ("1.2.86", 2**63, bytes(32))])
# (regression) an empty study UID, or one longer than LMDB's 511-byte key: its error
# ended the PushHeld call, and a holdings round's page failed whole
@example("peer-1", [("", 1, bytes(32))])
@example("peer-1", [("1" * 600, 1, bytes(32))])
def test_pushed_deltas_keep_the_cache_consistent(
        cache: Cache, peer: str, deltas: list[tuple[str, int, bytes]]) -> None:
    # as PushHeld computes them: the partition from the uid, whatever it is
    cache.holdings.apply(peer, [(s, partition_of(s, PARTITIONS), n, d) for s, n, d in deltas])
    assert_consistent(cache, peer)


@fuzz(1)
@given(st.sampled_from(PEERS), st.integers(0, PARTITIONS - 1),
       st.lists(holdings(), max_size=12))
@example("peer-2", 1, [("1.2.0", 2**63, bytes(32)), ("1.2.86", 2**63, bytes(32))])
@example("peer-2", 1, [("", 1, bytes(32))])
def test_a_page_of_held_studies_keeps_the_cache_consistent(
        cache: Cache, peer: str, partition: int, studies: list[tuple[str, int, bytes]]) -> None:
    cache.holdings.replace(peer, partition, studies)
    assert_consistent(cache, peer)
