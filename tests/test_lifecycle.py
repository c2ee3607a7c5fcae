"""The lifecycle book on real LMDB: a grow-only set of holds, releases and deletion
requests whose digest, pages and hold index never disagree with the records."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from pacsmesh.node.errors import LifecycleInvalid
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.lifecycle import (
    ADD_MAX,
    DELETE,
    HOLD,
    PAGE_MAX,
    RELEASE,
    Kind,
    LifecycleBook,
    digest_of,
)
from pacsmesh.proto.node_pb2 import LifecycleRecord

T0 = 1_700_000_000_000


def open_env(path: Path) -> Any:
    return lmdb.open(str(path), map_size=256 << 20, max_dbs=64, subdir=True)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Any]:
    e = open_env(tmp_path / "index")
    yield e
    e.close()


def rec(kind: Kind = HOLD, study: str = "1.2.3", at_ms: int = T0, releases: bytes = b"",
        reason: str = "litigation") -> tuple[bytes, bytes]:
    return LifecycleBook.make(kind, study, reason, "operator:alice", "boston", at_ms, releases)


def many(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rec(rng.choice([HOLD, DELETE]), f"1.2.{rng.randrange(500)}",
                T0 + rng.randrange(10**6))[1] for _ in range(n)]


def test_add_is_idempotent_and_ids_are_hashes_of_the_bytes(env: Any) -> None:
    book = LifecycleBook(env)
    rid, raw = rec()
    assert rid == content_hash(raw)
    first = book.add([raw, raw])  # a duplicate in one call is skipped too
    assert first.ids == [rid] and first.rejected == []
    assert book.add([raw]).ids == []
    assert book.digest() == digest_of([rid])
    assert book.get(rid) == raw
    # two holds with the same words stay two records (the nonce)
    assert rec()[0] != rec()[0]


def test_digest_is_the_set_s_from_scratch_and_order_free(tmp_path: Path) -> None:
    raws = many(600)
    rng = random.Random(5)
    a_env, b_env = open_env(tmp_path / "a"), open_env(tmp_path / "b")
    a, b = LifecycleBook(a_env), LifecycleBook(b_env)
    assert a.digest() == digest_of([])
    fed_a = raws[:]
    rng.shuffle(fed_a)
    for i in range(0, len(fed_a), 37):
        a.add(fed_a[i:i + 37])
        assert a.digest() == digest_of([content_hash(r) for r in fed_a[:i + 37]])
    fed_b = raws + rng.sample(raws, 200)  # other order, with duplicates
    rng.shuffle(fed_b)
    for i in range(0, len(fed_b), 91):
        b.add(fed_b[i:i + 91])
    assert a.digest() == b.digest() == digest_of([content_hash(r) for r in raws])
    assert a.digest()[1] == 600
    assert a.page(b"", PAGE_MAX) == b.page(b"", PAGE_MAX)
    a_env.close()
    b_env.close()


def test_pages_reach_every_record_exactly_once(env: Any) -> None:
    book = LifecycleBook(env)
    raws = many(25_000, seed=2)
    for i in range(0, len(raws), ADD_MAX):
        book.add(raws[i:i + ADD_MAX])
    rng = random.Random(3)
    seen: list[bytes] = []
    after, more = b"", True
    while more:
        page, more = book.page(after, rng.randint(1, 40))
        assert page
        seen += page
        after = content_hash(page[-1])
    ids = [content_hash(r) for r in seen]
    assert len(ids) == 25_000 and ids == sorted(set(ids))
    assert set(seen) == set(raws)
    big, more = book.page(b"", 10**6)  # the limit is capped
    assert len(big) == PAGE_MAX and more
    assert book.page(max(ids), 10) == ([], False)


def test_holds_and_releases_in_any_order(env: Any) -> None:
    book = LifecycleBook(env)
    hold_id, hold = rec(HOLD, "1.2.3")
    _, release = rec(RELEASE, "1.2.3", T0 + 5, releases=hold_id)
    assert book.add([release]).ids  # before its hold: kept, order-free
    assert not book.held("1.2.3") and book.holds("1.2.3") == []
    book.add([hold])
    assert not book.held("1.2.3") and book.holds("1.2.3") == []
    assert book.held_studies("", 10) == []

    # a release of another study's hold does not end it
    other_id, other = rec(HOLD, "1.2.4")
    _, stray = rec(RELEASE, "1.2.9", T0, releases=other_id)
    book.add([other, stray])
    assert book.held("1.2.4") and [i for i, _ in book.holds("1.2.4")] == [other_id]

    # two holds, one release: still held, by the other one
    h1, r1 = rec(HOLD, "1.2.5", T0 + 1)
    h2, r2 = rec(HOLD, "1.2.5", T0 + 2, reason="audit")
    _, rel1 = rec(RELEASE, "1.2.5", T0 + 3, releases=h1)
    _, rel1_again = rec(RELEASE, "1.2.5", T0 + 4, releases=h1)  # a second release of it
    book.add([r1, r2])
    held = book.holds("1.2.5")
    assert [i for i, _ in held] == [h1, h2] and held[1][1].reason == "audit"
    book.add([rel1, rel1_again])
    assert book.held("1.2.5") and [i for i, _ in book.holds("1.2.5")] == [h2]
    assert book.held_studies("", 10) == ["1.2.4", "1.2.5"]
    assert book.held_studies("1.2.4", 10) == ["1.2.5"]
    assert book.held_studies("", 1) == ["1.2.4"]
    _, rel2 = rec(RELEASE, "1.2.5", T0 + 5, releases=h2)
    book.add([rel2])
    assert not book.held("1.2.5") and book.held_studies("", 10) == ["1.2.4"]
    assert not book.held("1.2") and not book.held("1.2.4\x00")  # prefixes, not studies


def test_hold_index_agrees_with_the_records_after_random_adds(tmp_path: Path) -> None:
    """Holds and releases of a few studies, in random order and batches, on two books:
    the index answers what a recomputation from the records says."""
    rng = random.Random(11)
    studies = [f"1.3.{i}" for i in range(8)]
    holds = [rec(HOLD, rng.choice(studies), T0 + i) for i in range(60)]
    raws = [raw for _, raw in holds]
    for hid, raw in rng.sample(holds, 40):
        study = LifecycleRecord.FromString(raw).study_uid
        if rng.random() < 0.2:  # sometimes a release names the hold from another study
            study = rng.choice(studies)
        raws.append(rec(RELEASE, study, T0 + 100, releases=hid)[1])
    parsed = [(content_hash(r), LifecycleRecord.FromString(r)) for r in raws]
    released = {(p.study_uid, p.releases) for _, p in parsed if p.kind == RELEASE}
    expect = {s: sorted(i for i, p in parsed if p.kind == HOLD and p.study_uid == s
                        and (s, i) not in released) for s in studies}
    for name in ("a", "b"):
        e = open_env(tmp_path / name)
        book = LifecycleBook(e)
        rng.shuffle(raws)
        for i in range(0, len(raws), rng.randint(1, 9)):
            book.add(raws[i:i + 9])
        for s in studies:
            assert sorted(i for i, _ in book.holds(s)) == expect[s]
            assert book.held(s) == bool(expect[s])
        assert book.held_studies("", 100) == [s for s in studies if expect[s]]
        e.close()


def test_delete_requested_is_the_earliest(env: Any) -> None:
    book = LifecycleBook(env)
    assert book.delete_requested("1.2.3") is None
    book.add([rec(DELETE, "1.2.3", T0 + 9, reason="late")[1],
              rec(DELETE, "1.2.3", T0 + 2, reason="early")[1],
              rec(DELETE, "1.2.33", T0, reason="another study")[1],
              rec(HOLD, "1.2.3", T0)[1]])
    found = book.delete_requested("1.2.3")
    assert found is not None and found.reason == "early"
    assert book.held("1.2.3")  # a deletion request is no release


def _raw(**fields: Any) -> bytes:
    base: dict[str, Any] = {"kind": HOLD, "study_uid": "1.2.3", "reason": "r", "who": "w",
                            "node": "n", "at_ms": T0, "nonce": bytes(16)}
    base.update(fields)
    return LifecycleRecord(**base).SerializeToString()


@pytest.mark.parametrize(("raw", "why"), [
    (b"\xff\xff\xff", "does not decode"),
    (b"\x12\x02\xff\xfe", "does not decode"),  # a study uid that is not UTF-8
    (_raw(study_uid="1.2\xe9"), "characters other than digits"),
    (_raw(reason="x" * 9000), "bytes (at most 8192)"),
    (_raw(kind=0), "kind 0 is not"),
    (_raw(kind=7), "kind 7 is not"),
    (_raw(study_uid=""), "study uid is empty"),
    (_raw(study_uid="1." * 40), "characters long (at most 64)"),
    (_raw(study_uid="1.2.x"), "characters other than digits"),
    (_raw(study_uid="1..2"), "characters other than digits and single dots"),
    (_raw(reason=""), "a reason is required"),
    (_raw(reason="y" * 1001), "reason is 1001 characters"),
    (_raw(who="w" * 257), "who is 257 characters"),
    (_raw(node="n" * 257), "node is 257 characters"),
    (_raw(at_ms=0), "not after the epoch"),
    (_raw(at_ms=-5), "not after the epoch"),
    (_raw(kind=RELEASE), "must name a 32-byte hold id, not 0 bytes"),
    (_raw(kind=RELEASE, releases=bytes(31)), "not 31 bytes"),
    (_raw(kind=HOLD, releases=bytes(32)), "a HOLD names no hold to release"),
    (_raw(kind=DELETE, releases=bytes(32)), "a DELETE names no hold to release"),
    (_raw(nonce=b""), "nonce of 0 bytes"),
    (_raw(nonce=bytes(17)), "nonce of 17 bytes"),
])
def test_invalid_records_are_refused_each_with_its_reason(env: Any, raw: bytes, why: str
                                                           ) -> None:
    with pytest.raises(LifecycleInvalid, match=why.replace("(", r"\(").replace(")", r"\)")):
        LifecycleBook.validate(raw)
    book = LifecycleBook(env)
    good = rec()[1]
    result = book.add([good, raw])
    assert result.ids == [content_hash(good)]
    [bad] = result.rejected
    assert bad.index == 1 and bad.record_id == content_hash(raw) and why in bad.why
    assert book.digest()[1] == 1


def test_make_refuses_what_a_peer_would_refuse() -> None:
    with pytest.raises(LifecycleInvalid, match="a reason is required"):
        LifecycleBook.make(HOLD, "1.2.3", "", "operator:alice", "boston", T0)
    with pytest.raises(LifecycleInvalid, match="32-byte hold id"):
        LifecycleBook.make(RELEASE, "1.2.3", "done", "operator:alice", "boston", T0)


def test_unknown_fields_and_non_canonical_bytes_are_kept_as_sent(env: Any) -> None:
    """A newer node's field passes through unchanged, and the id stays the hash of the
    bytes as sent (re-encoding them would change it)."""
    newer = _raw() + b"\xa0\x06\x01"  # field 100, varint 1: unknown here
    reordered = (LifecycleRecord(nonce=bytes(16)).SerializeToString()
                 + _raw(nonce=b""))  # nonce first: valid, not how we would encode it
    book = LifecycleBook(env)
    assert book.add([newer, reordered]).ids == [content_hash(newer), content_hash(reordered)]
    assert book.get(content_hash(newer)) == newer
    assert set(book.page(b"", 10)[0]) == {newer, reordered}


def test_at_most_ADD_MAX_records_per_call(env: Any) -> None:
    book = LifecycleBook(env)
    raw = rec()[1]
    with pytest.raises(LifecycleInvalid, match="10001 records in one call"):
        book.add([raw] * (ADD_MAX + 1))
    assert book.digest()[1] == 0
    assert book.add([raw] * ADD_MAX).ids == [content_hash(raw)]


def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    e = open_env(tmp_path / "index")
    book = LifecycleBook(e)
    hid, hold = rec(HOLD, "1.2.3")
    book.add([hold, rec(DELETE, "1.2.4")[1], *many(50)])
    before = (book.digest(), book.page(b"", PAGE_MAX), book.held_studies("", 1000))
    e.close()
    e = open_env(tmp_path / "index")
    book = LifecycleBook(e)
    assert (book.digest(), book.page(b"", PAGE_MAX), book.held_studies("", 1000)) == before
    assert [i for i, _ in book.holds("1.2.3")] == [hid]
    assert book.delete_requested("1.2.4") is not None
    book.add([rec(RELEASE, "1.2.3", T0, releases=hid)[1]])  # the counts go on from there
    assert not book.held("1.2.3")
    e.close()
