"""The sans-IO replication machines, driven by hand: what they ask, in what pieces,
and that no answer they ask for can outgrow the message cap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pacsmesh.cluster import antientropy
from pacsmesh.cluster.antientropy import SyncRound, root_of
from pacsmesh.cluster.holdings import HELD_PAGE_MAX, HoldingsRound
from pacsmesh.cluster.messages import (
    HeldPartitionsAsk,
    HeldPartitionsGive,
    HeldRootAsk,
    HeldRootGive,
    HeldStudiesAsk,
    HeldStudiesGive,
    IdsAsk,
    IdsGive,
    ManifestsAsk,
    ManifestsGive,
    PartDigest,
    PartitionDigestsAsk,
    PartitionDigestsGive,
    PartitionManifestsAsk,
    PartitionManifestsGive,
    RootAsk,
    RootGive,
    StudyDigestsAsk,
    StudyDigestsGive,
    approx_size,
)
from pacsmesh.cluster.trim import RETRY_S, TrimPlanner
from pacsmesh.node.catalog import EMPTY_DIGEST, digest_add

P = 8


def _d(*ids: bytes) -> bytes:
    out = EMPTY_DIGEST
    for i in ids:
        out = digest_add(out, i)
    return out


class Local:
    def __init__(self, parts: list[PartDigest], studies: dict[str, tuple[bytes, int]],
                 known: set[bytes]) -> None:
        self.parts, self.studies, self.known = parts, studies, known

    def partition_digests(self) -> Sequence[PartDigest]:
        return self.parts

    def study_digests(self, studies: Sequence[str]) -> Mapping[str, tuple[bytes, int]]:
        return {s: self.studies[s] for s in studies if s in self.studies}

    def unknown(self, ids: Sequence[bytes]) -> list[bytes]:
        return [i for i in ids if i not in self.known]


def test_equal_sets_cost_one_small_exchange() -> None:
    parts = [(_d(bytes([p])), 1) for p in range(P)]
    r: SyncRound[bytes] = SyncRound(Local(parts, {}, set()), "peer")
    assert r.start() == RootAsk()
    assert r.on_reply(RootGive(*root_of(parts))) == ((), None)
    assert approx_size(RootGive(*root_of(parts))) < 64


def test_big_studies_are_asked_for_a_few_at_a_time_and_capped_answers_resumed() -> None:
    theirs = [(EMPTY_DIGEST, 0)] * P
    theirs[3] = (_d(b"x"), 130_003)
    mine = [(EMPTY_DIGEST, 0)] * P
    mine[3] = (_d(b"y"), 1)  # we know something there: descend by study
    local = Local(mine, {}, set())
    r: SyncRound[bytes] = SyncRound(local, "peer")
    r.start()
    _, ask = r.on_reply(RootGive(*root_of(theirs)))
    assert ask == PartitionDigestsAsk()
    _, ask = r.on_reply(PartitionDigestsGive(tuple(theirs)))
    assert ask == StudyDigestsAsk(3, "", antientropy.STUDY_PAGE_MAX)
    studies = (("a", _d(b"a"), 60_000), ("b", _d(b"b"), 60_000), ("c", _d(b"c"), 10_000),
               ("d", _d(b"d"), 3))
    _, ask = r.on_reply(StudyDigestsGive(studies, False))
    asked_ids = []
    while isinstance(ask, IdsAsk):  # never more than IDS_PER_ASK_MAX ids in one answer
        total = sum(n for s, _, n in studies if s in ask.studies)
        assert total <= antientropy.IDS_PER_ASK_MAX or len(ask.studies) == 1
        asked_ids.append(ask.studies)
        ids = tuple(f"{s}{k}".encode() for s in ask.studies for k in range(2))
        _, ask = r.on_reply(IdsGive(ids))
        if isinstance(ask, ManifestsAsk):
            # the peer's answer is capped: it covers the first id only
            first = ask.ids
            got, ask = r.on_reply(ManifestsGive((b"m0",), 1))
            assert got == (b"m0",)
            assert isinstance(ask, ManifestsAsk) and ask.ids == first[1:]
            got, ask = r.on_reply(ManifestsGive(tuple(b"m" for _ in ask.ids), len(ask.ids)))
    assert [s for batch in asked_ids for s in batch] == ["a", "b", "c", "d"]
    assert asked_ids[0] == ("a",)  # 60,000 + 60,000 ids would pass the cap
    assert ask is None


def test_a_partition_we_know_nothing_of_is_pulled_whole_in_pages() -> None:
    theirs = [(EMPTY_DIGEST, 0)] * P
    theirs[5] = (_d(b"z"), 5000)
    r: SyncRound[bytes] = SyncRound(Local([(EMPTY_DIGEST, 0)] * P, {}, set()), "peer")
    r.start()
    r.on_reply(RootGive(*root_of(theirs)))
    _, ask = r.on_reply(PartitionDigestsGive(tuple(theirs)))
    assert ask == PartitionManifestsAsk(5, "", antientropy.BULK_PAGE_MANIFESTS)
    got, ask = r.on_reply(PartitionManifestsGive((b"m1", b"m2"), "s2", True))
    assert got == (b"m1", b"m2") and ask == PartitionManifestsAsk(5, "s2",
                                                                   antientropy.BULK_PAGE_MANIFESTS)
    got, ask = r.on_reply(PartitionManifestsGive((b"m3",), "s3", False))
    assert ask is None and r.pulled == 3


class Cache:
    def __init__(self, parts: list[PartDigest]) -> None:
        self.parts = parts

    def partition_digests(self, peer: str) -> Sequence[PartDigest]:
        return self.parts


def test_holdings_at_rest_are_one_question_and_changes_reread_one_partition() -> None:
    parts = [(_d(bytes([p])), 2) for p in range(P)]
    h = HoldingsRound(Cache(parts), "peer")
    assert h.start() == HeldRootAsk()
    assert h.on_reply(HeldRootGive(*root_of(parts), 0, 0, 0)) == (None, None)
    changed = list(parts)
    changed[6] = (_d(b"new"), 3)
    h = HoldingsRound(Cache(parts), "peer")
    h.start()
    _, ask = h.on_reply(HeldRootGive(*root_of(changed), 0, 0, 0))
    assert ask == HeldPartitionsAsk()
    _, ask = h.on_reply(HeldPartitionsGive(tuple(changed)))
    assert ask == HeldStudiesAsk(6, "", HELD_PAGE_MAX)
    replace, ask = h.on_reply(HeldStudiesGive((("s1", 2, b"d"),), "s1", True))
    assert replace is None and ask == HeldStudiesAsk(6, "s1", HELD_PAGE_MAX)
    replace, ask = h.on_reply(HeldStudiesGive((("s9", 1, b"e"),), "s9", False))
    assert ask is None and replace is not None
    assert replace.partition == 6 and replace.studies == (("s1", 2, b"d"), ("s9", 1, b"e"))


def test_trim_looks_only_where_asked_and_again_after_a_pause() -> None:
    t = TrimPlanner()
    assert t.next(0.0) is None  # at rest: nothing to do
    t.enqueue([3, 1, 3])
    assert [t.next(0.0), t.next(0.0), t.next(0.0)] == [3, 1, None]
    t.retry_later(1, 10.0)
    assert t.next(10.0 + RETRY_S - 1) is None
    assert t.next(10.0 + RETRY_S) == 1
