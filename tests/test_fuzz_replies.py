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
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacsmesh.cluster import messages as msg
from pacsmesh.cluster.antientropy import SyncRound
from pacsmesh.cluster.holdings import HoldingsRound
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import Prepared, prepare_local
from pacsmesh.node.store import Store
from pacsmesh.sample import StudySpec, make_instance, study_uid
from tests.fuzz import blobs, fuzz, garbage, u32s, u64s

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


class Hostile:
    """A peer that answers each kind of request from a short script of replies of that
    kind, round and round (cluster/wire.py reads each request's own reply message, so
    the kind always fits; nothing else does): pages that never end or never advance,
    digest lists of the wrong length, counts at 2**64 - 1, garbage manifests."""

    def __init__(self, data: st.DataObject, endless: bool) -> None:
        uid, last = st.sampled_from(UIDS), st.sampled_from(UIDS)
        more = st.just(True) if endless else st.booleans()
        small = 4
        kinds: dict[type, st.SearchStrategy[Any]] = {
            msg.RootAsk: st.builds(msg.RootGive, blobs(), u64s()),
            msg.PartitionDigestsAsk: st.builds(msg.PartitionDigestsGive, part_lists()),
            msg.StudyDigestsAsk: st.builds(msg.StudyDigestsGive, st.lists(
                st.tuples(uid, blobs(), u64s()), max_size=small).map(tuple), more),
            msg.IdsAsk: st.builds(msg.IdsGive, st.lists(blobs(), max_size=small).map(tuple)),
            msg.ManifestsAsk: st.builds(msg.ManifestsGive, st.lists(
                garbage([b"\x08\x01"], 64), max_size=small).map(tuple), u32s()),
            msg.PartitionManifestsAsk: st.builds(msg.PartitionManifestsGive, st.lists(
                garbage([b"\x08\x01"], 64), max_size=small).map(tuple), last, more),
            msg.HeldRootAsk: st.builds(msg.HeldRootGive, blobs(), u64s(), u64s(), u64s(),
                                       u64s()),
            msg.HeldPartitionsAsk: st.builds(msg.HeldPartitionsGive, part_lists()),
            msg.HeldStudiesAsk: st.builds(msg.HeldStudiesGive, st.lists(
                st.tuples(uid, u64s(), blobs()), max_size=small).map(tuple), last, more),
        }
        self.script = {kind: data.draw(st.lists(replies, min_size=1, max_size=3))
                       for kind, replies in kinds.items()}
        self.asked = 0

    def answer(self, request: object) -> object:
        replies = self.script[type(request)]
        self.asked += 1
        return replies[self.asked % len(replies)]


@fuzz(0.5)
@given(st.booleans(), st.data())
def test_an_anti_entropy_round_against_any_replies_ends(node: Node, endless: bool,
                                                        data: st.DataObject) -> None:
    peer = Hostile(data, endless)
    round_: SyncRound[bytes] = SyncRound(node.replicator, "hostile")
    request: object = round_.start()
    for _ in range(EXCHANGES_MAX):
        if request is None:
            break
        manifests, request = round_.on_reply(peer.answer(request))
        if manifests:
            node.replicator.accept_manifests(list(manifests), "hostile")
    else:
        raise AssertionError(f"the round did not end in {EXCHANGES_MAX} exchanges")
    node.assert_unharmed()


# (regression, endless=True) a peer whose every page of held studies said "more, after
# the same study" kept the holdings round asking for ever, collecting without bound;
# its anti-entropy pages (study digests, a partition pulled whole) likewise
@fuzz(0.5)
@given(st.sampled_from(["peer-1", "peer-2"]), st.booleans(), st.data())
def test_a_holdings_round_against_any_replies_ends(node: Node, peer: str, endless: bool,
                                                   data: st.DataObject) -> None:
    holdings, hostile = node.replicator.holdings, Hostile(data, endless)
    round_ = HoldingsRound(holdings, peer)
    request: object = round_.start()
    for _ in range(EXCHANGES_MAX):
        if request is None:
            break
        replace, request = round_.on_reply(hostile.answer(request))
        if replace is not None:
            holdings.replace(replace.peer, replace.partition, list(replace.studies))
    else:
        raise AssertionError(f"the round did not end in {EXCHANGES_MAX} exchanges")
    node.assert_unharmed()


def test_partition_digests_of_another_length_end_the_round(node: Node) -> None:
    """Regression: a peer answering with one partition digest fewer than ours made
    differing_partitions raise ValueError out of the round, and the anti-entropy
    worker failed and backed off, for every peer."""
    round_: SyncRound[bytes] = SyncRound(node.replicator, "hostile")
    round_.start()
    assert round_.on_reply(msg.RootGive(bytes(32), 1)) == ((), msg.PartitionDigestsAsk())
    short = msg.PartitionDigestsGive(((bytes(32), 1),) * (PARTITIONS - 1))
    assert round_.on_reply(short) == ((), None)
