"""Lifecycle sync: the sans-IO machine by hand, and five real books with five machines
in a deterministic simulation (seeded loss, crashes, a partition) that must converge,
and must never call a node confirmed while it lacks a record an alive peer had
`confirm_within_s` before."""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest

from pacsmesh.cluster.lifecycle_sync import Ask, DigestAsk, LifecycleSync, RecordsAsk
from pacsmesh.node.hashing import content_hash
from pacsmesh.node.lifecycle import DELETE, HOLD, RELEASE, LifecycleBook, digest_of
from pacsmesh.proto.node_pb2 import LifecycleRecord

T0 = 1_700_000_000_000
D0 = (bytes(32), 0)
D1 = (b"\x01" * 32, 1)
D2 = (b"\x02" * 32, 2)


def make(kind: Any = HOLD, study: str = "1.2.3", releases: bytes = b"") -> tuple[bytes, bytes]:
    return LifecycleBook.make(kind, study, "why", "operator:alice", "n0", T0, releases)


# ---- the machine by hand ----------------------------------------------------------------


def test_one_request_per_peer_at_each_interval() -> None:
    s = LifecycleSync("me", interval_s=5.0)
    assert s.tick(0.0, ["a", "b", "me"], D0) == [DigestAsk("a"), DigestAsk("b")]
    assert s.tick(1.0, ["a", "b"], D0) == []  # in flight
    assert s.on_digest(1.0, "a", D0, D0) == []
    assert s.tick(4.9, ["a", "b"], D0) == []  # answered, but not due yet
    assert s.tick(5.0, ["a", "b"], D0) == [DigestAsk("a")]  # b still in flight
    s.on_failure(6.0, "b")
    assert s.tick(10.9, ["a", "b"], D0) == []  # after a failure: the next interval
    assert s.tick(11.0, ["a", "b"], D0) == [DigestAsk("b")]
    assert s.on_digest(11.0, "zz", D1, D0) == []  # never asked: ignored


def test_a_different_digest_pulls_every_page_then_ends() -> None:
    s = LifecycleSync("me", page_limit=2)
    s.tick(0.0, ["a"], D0)
    [ask] = s.on_digest(0.5, "a", D2, D0)
    assert ask == RecordsAsk("a", b"", 2)
    page = [make()[1], make()[1]]
    last = max(content_hash(r) for r in page)
    raws, nxt = s.on_records(1.0, "a", page, True, last)
    assert raws == page and nxt == [RecordsAsk("a", last, 2)]
    raws, nxt = s.on_records(1.5, "a", [make()[1]], False)
    assert len(raws) == 1 and nxt == []
    assert s.on_records(1.6, "a", page, False) == ([], [])  # nothing in flight: ignored
    # a peer with no records has nothing for us; and no pull at all when digests agree
    s.tick(9.0, ["a"], D0)
    assert s.on_digest(9.0, "a", D0, D2) == []


def test_a_local_change_asks_every_peer_again_at_once() -> None:
    s = LifecycleSync("me", interval_s=5.0)
    s.tick(0.0, ["a", "b"], D0)
    s.on_digest(0.1, "a", D0, D0)
    s.on_digest(0.1, "b", D0, D0)
    assert s.tick(1.0, ["a", "b"], D0) == []
    s.note_local_change(1.0)
    assert s.tick(1.0, ["a", "b"], D1) == [DigestAsk("a"), DigestAsk("b")]
    # the tick notices a change the caller did not report, too
    s.on_digest(1.1, "a", D1, D1)
    s.on_digest(1.1, "b", D1, D1)
    assert s.tick(2.0, ["a", "b"], D2) == [DigestAsk("a"), DigestAsk("b")]


def test_confirmed_needs_every_alive_peer_fresh_and_equal() -> None:
    s = LifecycleSync("me", confirm_within_s=60.0)
    assert not s.confirmed(0.0, [], D0)
    assert s.confirmed(0.0, ["me"], D0, alone_ok=True)  # a one-node cluster
    s.tick(10.0, ["a", "b"], D1)
    s.on_digest(10.5, "a", D1, D1)
    assert not s.confirmed(11.0, ["a", "b"], D1)  # b has not answered
    assert s.unconfirmed(11.0, ["a", "b"], D1) == ["b"]
    s.on_digest(11.0, "b", D1, D1)
    assert s.confirmed(11.0, ["a", "b"], D1)
    assert s.seen("a") == (10.0, D1)  # the age is when it was asked
    assert not s.confirmed(11.0, ["a", "b"], D2)  # our book grew since: another set
    assert not s.confirmed(70.1, ["a", "b"], D1)  # too old
    assert not s.confirmed(11.0, ["a", "b", "c"], D1)  # a peer never asked
    # a peer that answers differently is no longer agreed, whatever it said before
    s.tick(20.0, ["a", "b"], D1)
    s.on_digest(20.0, "a", D2, D1)
    assert s.unconfirmed(20.0, ["a", "b"], D1) == ["a"]
    # and once we hold what it held, its answer counts (no need to ask again)
    assert s.confirmed(20.0, ["a"], D2)


def test_peers_no_longer_alive_are_forgotten() -> None:
    s = LifecycleSync("me")
    s.tick(0.0, ["a"], D0)
    s.on_digest(0.1, "a", D0, D0)
    s.tick(5.0, ["a"], D0)
    s.tick(6.0, [], D0)  # a is gone: its state and its request in flight
    assert s.seen("a") is None
    assert s.on_digest(6.1, "a", D0, D0) == []
    assert not s.confirmed(6.2, ["a"], D0)
    assert s.tick(6.2, ["a"], D0) == [DigestAsk("a")]  # back: asked at once


def test_a_request_never_answered_is_given_up_after_timeout(caplog: Any) -> None:
    s = LifecycleSync("me", interval_s=5.0, timeout_s=30.0)
    s.tick(0.0, ["a"], D0)
    assert s.tick(29.0, ["a"], D0) == []
    with caplog.at_level(logging.WARNING):
        assert s.tick(30.0, ["a"], D0) == [DigestAsk("a")]
    assert "no answer from a" in caplog.text


def test_a_round_is_bounded_and_resumes_where_it_stopped(caplog: Any) -> None:
    s = LifecycleSync("me", page_limit=1, pages_max=2)
    s.tick(0.0, ["a"], D0)
    s.on_digest(0.0, "a", D2, D0)
    _, nxt = s.on_records(0.1, "a", [b"x"], True, b"\x10" * 32)
    assert nxt == [RecordsAsk("a", b"\x10" * 32, 1)]
    with caplog.at_level(logging.WARNING):
        _, nxt = s.on_records(0.2, "a", [b"y"], True, b"\x20" * 32)
    assert nxt == [] and "2 pages pulled from a" in caplog.text
    s.tick(5.0, ["a"], D0)
    assert s.on_digest(5.0, "a", D2, D0) == [RecordsAsk("a", b"\x20" * 32, 1)]
    # a page that does not advance ends the round; the next one starts from the first
    _, nxt = s.on_records(5.1, "a", [b"z"], True, b"\x05" * 32)
    assert nxt == []
    s.tick(10.0, ["a"], D0)
    assert s.on_digest(10.0, "a", D2, D0) == [RecordsAsk("a", b"", 1)]
    # a failed page: the next round goes on from where it failed
    s.on_records(10.1, "a", [b"w"], True, b"\x30" * 32)
    s.on_failure(10.2, "a")
    s.tick(15.2, ["a"], D0)
    assert s.on_digest(15.2, "a", D2, D0) == [RecordsAsk("a", b"\x30" * 32, 1)]
    # more records than asked for: the page is dropped, nothing to add
    assert s.on_records(15.3, "a", [b"a", b"b"], True, b"\x40" * 32) == ([], [])


# ---- a record added while a pull round runs ---------------------------------------------


def _open(path: Path) -> tuple[Any, LifecycleBook]:
    env = lmdb.open(str(path), map_size=64 << 20, max_dbs=64, subdir=True)
    return env, LifecycleBook(env)


def _serve(book: LifecycleBook, ask: Ask) -> Any:
    return book.digest() if isinstance(ask, DigestAsk) else book.page(ask.after, ask.limit)


def test_records_added_during_a_pull_round_are_not_lost(tmp_path: Path) -> None:
    envs_books = {"a": _open(tmp_path / "a"), "b": _open(tmp_path / "b")}
    books = {name: eb[1] for name, eb in envs_books.items()}
    syncs = {name: LifecycleSync(name) for name in books}
    books["a"].add([make(study=f"1.2.{i}")[1] for i in range(2500)])  # three pages

    b = syncs["b"]
    [ask] = b.tick(0.0, ["a"], books["b"].digest())
    [ask] = b.on_digest(0.1, "a", _serve(books["a"], ask), books["b"].digest())
    page, more = _serve(books["a"], ask)
    raws, [cursor] = b.on_records(0.2, "a", page, more)
    books["b"].add(raws)
    assert isinstance(cursor, RecordsAsk) and cursor.after
    # a's new record sorts before the cursor (the rest of this round never reaches it);
    # and b takes a hold of its own meanwhile
    while True:
        early_id, early = make(study="1.9.1")
        if early_id < cursor.after:
            break
    books["a"].add([early])
    own_id, own = make(study="1.9.2")
    books["b"].add([own])
    b.note_local_change(0.25)
    t = 0.3
    pending: list[Ask] = [cursor]
    while pending:  # the round goes on to its end
        page, more = _serve(books["a"], pending.pop())
        raws, pending = b.on_records(t, "a", page, more)
        books["b"].add(raws)
        t += 0.1
    assert books["b"].get(early_id) is None  # not in this round...
    assert not b.confirmed(t, ["a"], books["b"].digest())

    for step in range(100):  # ...but not lost: both machines run until they agree
        now = t + step * 1.0
        for me, other in (("a", "b"), ("b", "a")):
            pending = syncs[me].tick(now, [other], books[me].digest())
            while pending:
                ask = pending.pop()
                answer = _serve(books[other], ask)
                if isinstance(ask, DigestAsk):
                    pending += syncs[me].on_digest(now, other, answer, books[me].digest())
                else:
                    raws, nxt = syncs[me].on_records(now, other, *answer)
                    if books[me].add(raws).ids:
                        syncs[me].note_local_change(now)
                    pending += nxt
        if all(syncs[n].confirmed(now, [o], books[n].digest()) for n, o in ("ab", "ba")):
            break
    assert books["a"].digest() == books["b"].digest()
    assert books["b"].get(early_id) == early and books["a"].get(own_id) == own
    assert books["a"].digest()[1] == 2502
    assert step < 20  # a few seconds, not an interval per record
    for env, _ in envs_books.values():
        env.close()


# ---- five nodes in a simulation -----------------------------------------------------------

TIMEOUT_S = 2.0  # the runtime's gRPC deadline: a lost message fails after it
DETECT_S = 3.0  # membership notices a node down or cut off after this
DT = 0.5


@dataclass
class SimNode:
    name: str
    path: Path
    env: Any = None
    book: LifecycleBook = field(init=False)
    sync: LifecycleSync = field(init=False)
    within_s: float = 60.0
    up: bool = True
    epoch: int = 0  # a restart drops answers meant for the process before
    arrived: list[tuple[float, bytes]] = field(default_factory=list)  # into the book, when
    known: set[bytes] = field(default_factory=set)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.path), map_size=64 << 20, max_dbs=64, subdir=True)
        self.book = LifecycleBook(self.env)
        self.sync = LifecycleSync(self.name, interval_s=5.0, confirm_within_s=self.within_s)
        self.up = True
        self.epoch += 1

    def stop(self) -> None:
        self.up = False
        self.env.close()


class World:
    def __init__(self, root: Path, seed: int, n: int = 5, loss: float = 0.1,
                 push: bool = True, within_s: float = 60.0) -> None:
        self.rng = random.Random(seed)
        self.loss, self.push, self.within_s = loss, push, within_s
        self.now = 0.0
        self.nodes = {f"n{i}": SimNode(f"n{i}", root / f"n{i}", within_s=within_s)
                      for i in range(n)}
        for node in self.nodes.values():
            node.start()
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.cut: set[frozenset[str]] = set()
        self.lost_at: dict[frozenset[str], float] = {}  # a link went away then
        self.created: list[bytes] = []

    # ---- the network ----

    def reachable(self, a: str, b: str) -> bool:
        return (self.nodes[a].up and self.nodes[b].up
                and frozenset((a, b)) not in self.cut)

    def alive(self, a: str) -> list[str]:
        """Membership's view: reachable peers, and lost ones until it notices."""
        return [b for b in self.nodes if b != a and (
            self.reachable(a, b)
            or self.now - self.lost_at.get(frozenset((a, b)), -1e9) < DETECT_S)]

    def _lose(self, a: str, b: str) -> None:
        self.lost_at[frozenset((a, b))] = self.now

    def crash(self, name: str) -> None:
        for other in self.nodes:
            if other != name:
                self._lose(name, other)
        self.nodes[name].stop()

    def restart(self, name: str) -> None:
        self.nodes[name].start()

    def partition(self, name: str) -> None:
        for other in self.nodes:
            if other != name:
                self.cut.add(frozenset((name, other)))
                self._lose(name, other)

    def heal(self) -> None:
        self.cut.clear()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn))

    def latency(self) -> float:
        return self.rng.uniform(0.01, 0.3)

    # ---- the node's runtime, as cluster/ would drive it ----

    def _added(self, node: SimNode, ids: list[bytes]) -> None:
        for rid in ids:
            node.arrived.append((self.now, rid))
            node.known.add(rid)
        if ids:
            node.sync.note_local_change(self.now)

    def request(self, a: str, ask: Ask) -> None:
        b, epoch = ask.peer, self.nodes[a].epoch

        def fail() -> None:
            node = self.nodes[a]
            if node.up and node.epoch == epoch:
                node.sync.on_failure(self.now, b)

        def deliver(answer: Any) -> None:
            node = self.nodes[a]
            if not node.up or node.epoch != epoch:
                return
            if not self.reachable(a, b):
                self.at(self.now + TIMEOUT_S, fail)
                return
            if isinstance(ask, DigestAsk):
                for nxt in node.sync.on_digest(self.now, b, answer, node.book.digest()):
                    self.request(a, nxt)
                return
            raws, asks = node.sync.on_records(self.now, b, *answer)
            self._added(node, node.book.add(raws).ids)
            for nxt in asks:
                self.request(a, nxt)

        def serve() -> None:
            if not self.reachable(a, b) or self.rng.random() < self.loss:
                self.at(self.now + TIMEOUT_S, fail)
                return
            answer = _serve(self.nodes[b].book, ask)
            self.at(self.now + self.latency(), lambda: deliver(answer))

        if self.rng.random() < self.loss:
            self.at(self.now + TIMEOUT_S, fail)
        else:
            self.at(self.now + self.latency(), serve)

    def create(self, a: str) -> None:
        node = self.nodes[a]
        study = f"1.2.{self.rng.randrange(10)}"
        holds = node.book.holds(study)
        roll = self.rng.random()
        if holds and roll < 0.4:
            kind, releases = RELEASE, self.rng.choice(holds)[0]
        else:
            kind, releases = (DELETE if roll > 0.85 else HOLD), b""
        # a nonce from the seed, not os.urandom: the same seed, the same run
        raw = LifecycleRecord(kind=kind, study_uid=study, reason="why", who="operator:bob",
                              node=a, at_ms=T0 + int(self.now * 1000), releases=releases,
                              nonce=self.rng.randbytes(16)).SerializeToString(
                                  deterministic=True)
        LifecycleBook.validate(raw)
        rid = content_hash(raw)
        self.created.append(rid)
        self._added(node, node.book.add([raw]).ids)
        if not self.push:
            return
        for b in self.alive(a):  # PushLifecycle, fire and forget
            if self.rng.random() < self.loss:
                continue

            def receive(b: str = b, epoch: int = self.nodes[b].epoch) -> None:
                peer = self.nodes[b]
                if self.reachable(a, b) and peer.epoch == epoch:
                    self._added(peer, peer.book.add([raw]).ids)

            self.at(self.now + self.latency(), receive)

    # ---- time ----

    def step(self) -> None:
        self.now += DT
        while self.events and self.events[0][0] <= self.now:
            _, _, fn = heapq.heappop(self.events)
            fn()
        for name, node in self.nodes.items():
            if node.up:
                for ask in node.sync.tick(self.now, self.alive(name), node.book.digest()):
                    self.request(name, ask)

    def confirmed(self, name: str) -> bool:
        node = self.nodes[name]
        return node.up and node.sync.confirmed(self.now, self.alive(name), node.book.digest())

    def check_confirmed_means_caught_up(self) -> None:
        """The promise the deleter relies on: a confirmed node holds every record that any
        peer it counts as alive held confirm_within_s ago."""
        for name, node in self.nodes.items():
            if not self.confirmed(name):
                continue
            assert self.alive(name), f"{name} confirmed alone"
            for peer in self.alive(name):
                for t, rid in self.nodes[peer].arrived:
                    if t > self.now - self.within_s:
                        break
                    assert rid in node.known, (
                        f"t={self.now}: {name} confirmed without {rid.hex()[:8]}, which "
                        f"{peer} had at {t}")

    def converged(self) -> bool:
        digests = {n.book.digest() for n in self.nodes.values() if n.up}
        return len(digests) == 1 and all(self.confirmed(n) for n in self.nodes)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.up:
                node.stop()


@pytest.fixture
def world_factory(tmp_path: Path) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def factory(seed: int, **kw: Any) -> World:
        w = World(tmp_path / f"w{len(made)}", seed, **kw)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.close()


@pytest.mark.parametrize(("seed", "push", "loss", "within_s", "settle_s"), [
    (1, True, 0.1, 15.0, 90.0),  # a short window: the promise is checked often
    (2, False, 0.3, 60.0, 150.0),  # digests and pulls alone, half the round trips lost
    (5, True, 0.2, 60.0, 90.0),
])
def test_five_nodes_converge_through_loss_crashes_and_a_partition(
        world_factory: Callable[..., World], seed: int, push: bool, loss: float,
        within_s: float, settle_s: float) -> None:
    """Records made at random up nodes while one crashes and restarts and another is cut
    off; then all converge and confirm. (Over 20-30 seeds each, the first two settled in
    at most 42 and 95 s.)"""
    w = world_factory(seed, push=push, loss=loss, within_s=within_s)
    script = {60.0: lambda: w.crash("n2"), 120.0: lambda: w.restart("n2"),
              150.0: lambda: w.partition("n4"), 200.0: w.heal}
    confirmations = 0
    while w.now < 300.0:  # about one record every 6 s
        w.step()
        if w.now in script:
            script[w.now]()
        if w.rng.random() < DT / 6:
            w.create(w.rng.choice([n for n, node in w.nodes.items() if node.up]))
        w.check_confirmed_means_caught_up()
        confirmations += sum(w.confirmed(n) for n in w.nodes)
    assert confirmations > 50  # the check above was not vacuous
    assert len(w.created) > 30
    quiet = w.now
    while not w.converged():
        w.step()
        w.check_confirmed_means_caught_up()
        assert w.now - quiet < settle_s, "no convergence after the last change"
    whole = digest_of(w.created)
    for node in w.nodes.values():
        assert node.book.digest() == whole
        assert node.known == set(w.created)


def test_a_partitioned_node_is_not_confirmed_until_it_synced_after_rejoining(
        world_factory: Callable[..., World]) -> None:
    w = world_factory(3, loss=0.05)
    for _ in range(5):
        w.create("n0")
    while not w.converged():
        w.step()
    assert w.confirmed("n4")
    w.partition("n4")
    for _ in range(int(DETECT_S / DT) + 1):
        w.step()
    assert w.alive("n4") == [] and not w.confirmed("n4")
    for i in range(3):  # holds n4 cannot hear of (its pushes are cut too)
        w.create(f"n{i}")
        w.step()
    missed = set(w.created[-3:])
    for _ in range(int(20 / DT)):  # 20 s: shorter than confirm_within_s
        w.step()
        assert not w.confirmed("n4")
        w.check_confirmed_means_caught_up()
    assert all(w.confirmed(n) for n in ("n0", "n1", "n2", "n3"))  # they go on without it
    w.heal()
    while True:
        w.step()
        w.check_confirmed_means_caught_up()
        if w.confirmed("n4"):
            break
        assert w.now < 200
    assert missed <= w.nodes["n4"].known
    assert len({n.book.digest() for n in w.nodes.values()}) == 1


def test_confirmed_is_lost_the_moment_a_peer_differs_and_regained_once_all_agree(
        world_factory: Callable[..., World]) -> None:
    w = world_factory(4, loss=0.0, push=False)
    w.create("n1")
    while not w.converged():
        w.step()
    w.create("n3")  # no push: only n3 knows it
    assert not w.confirmed("n3")  # its own digest changed: no peer agrees with it yet
    others = ["n0", "n1", "n2", "n4"]
    lost: set[str] = set()
    while not w.converged():
        w.step()
        for name in others:
            differs = w.nodes[name].book.digest() != w.nodes["n3"].book.digest()
            if differs and not w.confirmed(name):
                lost.add(name)
            w.check_confirmed_means_caught_up()
        assert w.now < 100
    # each of the others, once it had asked n3, stayed unconfirmed until it pulled
    assert lost == set(others)
    assert all(w.confirmed(n) for n in w.nodes)
