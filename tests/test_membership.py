"""Membership driven over a tiny deterministic network: no sockets, no clock.

``Net`` delivers every SendGossip at once (or loses it, by a seeded coin or a
blocked link) and carries the reply straight back, the way the runtime does over
one gRPC call. Simulated time advances one gossip interval per round.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import TypeVar

import pytest

from pacsmesh.cluster.membership import (
    COUNTER_MAX,
    GOSSIP_INTERVAL_S_MIN,
    HEARSAY_JITTER_S,
    HEARTBEATS_PER_S_MAX,
    INCARNATION_HEARSAY_STEP,
    MEMBERS_MAX,
    REFUSAL_REPEAT_S,
    UNKNOWN_COUNTER_MAX,
    ClusterSettings,
    Effect,
    GossipMessage,
    LeftTimedOut,
    Member,
    Membership,
    MemberState,
    NodeId,
    RecordDropped,
    Refused,
    Refuted,
    SendGossip,
    StateChanged,
)

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)
SETTINGS = ClusterSettings(copies=3, min_distance_miles=250.0, partitions=1024)
INTERVAL_S = 1.0
SUSPECT_AFTER_S = 5.0  # the default: 5 rounds
DEAD_AFTER_S = 20.0
E = TypeVar("E", bound=Effect)
NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]


def addr(name: str) -> str:
    return f"{name}.example:7400"


def record(name: str, incarnation: int = 0, heartbeat: int = 0, **changes: object) -> Member:
    base = Member(
        node_id=NodeId(name),
        site=f"site-{name}",
        lat=40.0,
        lon=-75.0,
        address=addr(name),
        capacity_bytes=1000,
        used_bytes=100,
        free_bytes=900,
        incarnation=incarnation,
        heartbeat=heartbeat,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def node(
    name: str,
    seeds: list[str],
    *,
    seed: int = 0,
    incarnation: int = 0,
    settings: ClusterSettings = SETTINGS,
) -> Membership:
    return Membership(
        record(name, incarnation),
        settings,
        seeds,
        rng=random.Random(f"{seed}-{name}-{incarnation}"),
        gossip_interval_s=INTERVAL_S,
        dead_after_s=DEAD_AFTER_S,
    )


@dataclass
class Net:
    nodes: dict[str, Membership]
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    loss: float = 0.0
    down: set[str] = field(default_factory=set)  # crashed: neither ticks nor receives
    blocked: set[tuple[str, str]] = field(default_factory=set)  # (from, to) links
    log: list[tuple[float, str, Effect]] = field(default_factory=list)
    now: float = 0.0

    def lost(self, src: str, dst: str) -> bool:
        if dst not in self.nodes or dst in self.down or (src, dst) in self.blocked:
            return True
        return self.loss > 0 and self.rng.random() < self.loss

    def deliver(self, src: str, effects: list[Effect]) -> None:
        for effect in effects:
            self.log.append((self.now, src, effect))
            if not isinstance(effect, SendGossip) or self.lost(src, effect.address):
                continue
            dst = effect.address
            reply, got = self.nodes[dst].on_gossip(effect.message, self.now)
            self.log.extend((self.now, dst, e) for e in got)
            if reply is not None and not self.lost(dst, src):
                got = self.nodes[src].on_reply(reply, self.now)
                self.log.extend((self.now, src, e) for e in got)

    def round(self) -> None:
        self.now += INTERVAL_S
        for address in sorted(self.nodes):
            if address not in self.down:
                self.deliver(address, self.nodes[address].tick(self.now))

    def rounds(self, count: int) -> None:
        for _ in range(count):
            self.round()

    def view(self, name: str) -> dict[str, MemberState]:
        return {m.node_id: m.state for m in self.nodes[addr(name)].members()}

    def live_names(self) -> list[str]:
        return [str(n.me.node_id) for a, n in self.nodes.items() if a not in self.down]

    def states_of(self, name: str) -> set[MemberState | None]:
        """How every live node other than ``name`` sees it."""
        return {self.view(o).get(name) for o in self.live_names() if o != name}

    def converged(self) -> bool:
        live = set(self.live_names())
        return all({n for n, s in self.view(o).items() if s == ALIVE} >= live for o in live)

    def rounds_until_converged(self, rounds_max: int) -> int:
        for count in range(1, rounds_max + 1):
            self.round()
            if self.converged():
                return count
        pytest.fail(f"not converged after {rounds_max} rounds: {self.views()}")

    def views(self) -> dict[str, dict[str, MemberState]]:
        return {n: self.view(n) for n in self.live_names()}

    def effects(self, kind: type[E], at: str | None = None) -> list[tuple[float, str, E]]:
        found: list[tuple[float, str, E]] = []
        for time, src, effect in self.log:
            if isinstance(effect, kind) and (at is None or src == addr(at)):
                found.append((time, src, effect))
        return found


def cluster(names: list[str], *, seed: int = 0, loss: float = 0.0) -> Net:
    """Every node knows only the first one as its seed; the first knows nobody."""
    nodes = {
        addr(name): node(name, [] if i == 0 else [addr(names[0])], seed=seed)
        for i, name in enumerate(names)
    }
    return Net(nodes, rng=random.Random(seed), loss=loss)


def converged_cluster(names: list[str], *, seed: int = 0) -> Net:
    net = cluster(names, seed=seed)
    net.rounds_until_converged(10)
    net.rounds(2)
    return net


def single(effects: list[Effect], kind: type[E]) -> E:
    """The one effect, which must be of ``kind``."""
    assert len(effects) == 1, effects
    (effect,) = effects
    assert isinstance(effect, kind), effect
    return effect


def push(sender: str, members: list[Member], settings: ClusterSettings = SETTINGS) -> GossipMessage:
    return GossipMessage(NodeId(sender), addr(sender), settings, tuple(members))


# Convergence


@pytest.mark.parametrize("seed", range(20))
def test_five_nodes_converge_from_one_seed(seed: int) -> None:
    net = cluster(NAMES[:5], seed=seed)
    assert net.rounds_until_converged(3) <= 3
    assert all(len(net.view(n)) == 5 for n in NAMES[:5])


@pytest.mark.parametrize("seed", range(10))
def test_converges_despite_20_percent_message_loss(seed: int) -> None:
    net = cluster(NAMES, seed=seed, loss=0.2)
    net.rounds_until_converged(8)
    assert net.effects(Refused) == []


@pytest.mark.parametrize("seed", range(3))
def test_no_false_suspicion_under_20_percent_message_loss(seed: int) -> None:
    net = cluster(NAMES, seed=seed, loss=0.2)
    net.rounds_until_converged(8)
    start = len(net.log)
    net.rounds(300)
    assert [e for _, _, e in net.log[start:] if isinstance(e, StateChanged)] == []


def test_same_seed_replays_the_same_run() -> None:
    def run() -> list[tuple[float, str, Effect]]:
        net = cluster(NAMES, seed=7, loss=0.2)
        net.rounds(15)
        return net.log

    assert run() == run()


def test_member_details_spread_with_the_next_heartbeat() -> None:
    net = converged_cluster(NAMES[:4])
    net.nodes[addr("b")].update_self(used_bytes=500, free_bytes=500)
    net.rounds(3)
    for other in ["a", "c", "d"]:
        seen = net.nodes[addr(other)].get("b")
        assert seen is not None and (seen.used_bytes, seen.free_bytes) == (500, 500)


# Failure detection


def test_silent_node_goes_suspect_then_dead_at_the_right_times() -> None:
    net = converged_cluster(NAMES[:5])
    crashed_at = net.now
    net.down.add(addr("e"))
    net.rounds(3)
    assert net.states_of("e") == {ALIVE}
    net.rounds(int(DEAD_AFTER_S) + 5)
    assert net.states_of("e") == {DEAD}
    assert all(net.states_of(n) == {ALIVE} for n in "abcd")  # nobody else suspected
    for observer in "abcd":
        changes = [
            (t, e)
            for t, _, e in net.effects(StateChanged, at=observer)
            if e.node_id == "e" and t > crashed_at
        ]
        assert [(e.old, e.new) for _, e in changes] == [(ALIVE, SUSPECT), (SUSPECT, DEAD)]
        # Each observer judges from the last heartbeat it saw, one round before the
        # crash or relayed a round or two later, and acts on its next tick.
        (suspect_at, _), (dead_at, _) = changes
        assert crashed_at + SUSPECT_AFTER_S - 1 <= suspect_at <= crashed_at + SUSPECT_AFTER_S + 2
        assert crashed_at + DEAD_AFTER_S - 1 <= dead_at <= crashed_at + DEAD_AFTER_S + 2
        assert dead_at - suspect_at == DEAD_AFTER_S - SUSPECT_AFTER_S


def test_time_since_heard_follows_the_simulated_clock() -> None:
    net = converged_cluster(NAMES[:3])
    a = net.nodes[addr("a")]
    assert a.time_since_heard("b", net.now) <= INTERVAL_S
    assert a.time_since_heard("a", net.now) == 0.0
    net.down.add(addr("b"))
    last = net.now
    net.rounds(4)
    assert a.time_since_heard("b", net.now) >= 4 * INTERVAL_S
    assert a.time_since_heard("b", last + 100) >= 100
    with pytest.raises(KeyError):
        a.time_since_heard("nobody", net.now)


def test_exact_thresholds_on_one_node() -> None:
    a = node("a", [])
    a.on_gossip(push("b", [record("b", heartbeat=1)]), now=100.0)
    assert all(not isinstance(e, StateChanged) for e in a.tick(104.9))
    assert StateChanged(NodeId("b"), ALIVE, SUSPECT) in a.tick(105.0)
    assert all(not isinstance(e, StateChanged) for e in a.tick(119.9))
    assert StateChanged(NodeId("b"), SUSPECT, DEAD) in a.tick(120.0)
    assert a.time_since_heard("b", 120.0) == 20.0


def test_restarted_node_is_alive_again_everywhere() -> None:
    net = converged_cluster(NAMES[:5])
    net.down.add(addr("e"))
    net.rounds(int(DEAD_AFTER_S) + 3)
    assert net.states_of("e") == {DEAD}
    old = net.nodes[addr("e")].me
    net.nodes[addr("e")] = node("e", [addr("a")], incarnation=old.incarnation + 1)
    net.down.discard(addr("e"))
    net.rounds_until_converged(6)
    for other in "abcd":
        seen = net.nodes[addr(other)].get("e")
        assert seen is not None and seen.incarnation == old.incarnation + 1


def test_quick_restart_wins_over_the_old_run_at_once() -> None:
    net = converged_cluster(NAMES[:4])
    old = net.nodes[addr("d")].me
    assert old.heartbeat > 3
    net.nodes[addr("d")] = node("d", [addr("a")], incarnation=old.incarnation + 1)
    net.round()
    a_sees = net.nodes[addr("a")].get("d")
    assert a_sees is not None and a_sees.version == (old.incarnation + 1, 1)


def test_restart_without_raising_incarnation_heals_by_refutation() -> None:
    net = converged_cluster(NAMES[:4])
    old = net.nodes[addr("d")].me
    net.nodes[addr("d")] = node("d", [addr("a")], incarnation=old.incarnation)
    net.rounds(3)
    d = net.nodes[addr("d")].me
    assert d.incarnation > old.incarnation
    assert net.effects(Refuted, at="d")
    assert net.states_of("d") == {ALIVE}
    assert all(net.nodes[addr(o)].get("d") == d for o in "abc")


# Refutation


def test_false_suspicion_is_refuted_by_a_higher_incarnation() -> None:
    c = node("c", [])
    c.tick(1.0)
    accusation = replace(c.me, state=SUSPECT)
    reply, effects = c.on_gossip(push("b", [accusation]), now=2.0)
    assert c.me.incarnation == accusation.incarnation + 1
    assert c.me.state == ALIVE
    refuted = single(effects, Refuted)
    assert (refuted.peer, refuted.incarnation) == ("b", c.me.incarnation)
    assert "suspect" in refuted.reason
    assert reply is not None and c.me in reply.members


def test_stale_accusation_from_an_older_incarnation_is_ignored() -> None:
    c = node("c", [], incarnation=3)
    _, effects = c.on_gossip(push("b", [record("c", incarnation=2, state=DEAD)]), now=1.0)
    assert effects == [] and c.me.incarnation == 3


def test_node_cut_off_then_suspected_refutes_and_is_alive_everywhere() -> None:
    net = converged_cluster(NAMES[:5])
    before = net.nodes[addr("c")].me.incarnation
    # c still hears the others but nothing it sends gets through.
    net.blocked = {(addr("c"), addr(o)) for o in "abde"}
    net.rounds(int(SUSPECT_AFTER_S) + 3)
    assert net.states_of("c") == {SUSPECT}
    assert net.effects(Refuted, at="c")
    net.blocked.clear()
    net.rounds(3)
    assert net.states_of("c") == {ALIVE}
    for other in "abde":
        seen = net.nodes[addr(other)].get("c")
        assert seen is not None and seen.incarnation > before


# Leaving


def test_leaving_node_shows_left_not_dead_then_alive_when_it_returns() -> None:
    net = converged_cluster(NAMES[:5])
    e = net.nodes[addr("e")]
    net.deliver(addr("e"), e.leave(net.now))
    net.down.add(addr("e"))
    net.rounds(2)
    assert net.states_of("e") == {LEFT}
    net.rounds(int(DEAD_AFTER_S) + 3)
    assert net.states_of("e") == {LEFT}  # long silence: still left, never dead
    timed_out = {src for _, src, eff in net.effects(LeftTimedOut) if eff.node_id == "e"}
    assert timed_out == {addr(o) for o in "abcd"}  # reported once by each observer
    assert len(net.effects(LeftTimedOut)) == 4
    assert all(net.nodes[addr(o)].time_since_heard("e", net.now) >= DEAD_AFTER_S for o in "abcd")
    net.nodes[addr("e")] = node("e", [addr("a")], incarnation=e.me.incarnation + 1)
    net.down.discard(addr("e"))
    net.rounds_until_converged(5)
    assert net.states_of("e") == {ALIVE}


def test_left_node_is_not_a_gossip_target_but_is_probed_now_and_then() -> None:
    net = converged_cluster(NAMES[:3])
    net.deliver(addr("c"), net.nodes[addr("c")].leave(net.now))
    net.down.add(addr("c"))
    net.rounds(100)
    to_c = [e for t, s, e in net.effects(SendGossip) if e.address == addr("c") and s != addr("c")]
    # Probes at about 0.1 per node and round: 2 nodes * 100 rounds -> ~20.
    assert 5 <= len(to_c) <= 40


# Settings and identity


def test_settings_mismatch_refused_on_both_sides_and_nothing_merged() -> None:
    other = ClusterSettings(copies=2, min_distance_miles=250.0, partitions=512)
    net = cluster(["a", "b"])
    net.nodes[addr("x")] = node("x", [addr("a")], settings=other)
    net.rounds(5)
    (_, _, at_a), *more_a = net.effects(Refused, at="a")
    (_, _, at_x), *more_x = net.effects(Refused, at="x")
    assert more_a == [] and more_x == []  # repeats within a minute stay quiet
    assert at_a == Refused("x", addr("x"), at_a.reason)
    assert at_a.reason == (
        "cluster settings differ (ours != theirs): copies 3 != 2, partitions 1024 != 512"
    )
    assert at_x.peer == "a" and "copies 2 != 3" in at_x.reason
    assert "min_distance_miles" not in at_x.reason
    assert "x" not in net.view("a") and "x" not in net.view("b")
    assert set(net.view("x")) == {"x"}


def test_refusal_repeats_after_a_minute() -> None:
    a = node("a", [])
    message = push("x", [record("x")], ClusterSettings(3, 100.0, 1024))
    reply, effects = a.on_gossip(message, now=0.0)
    assert "min_distance_miles 250.0 != 100.0" in single(effects, Refused).reason
    assert reply is not None and reply.members == () and reply.settings == SETTINGS
    assert a.on_gossip(message, now=REFUSAL_REPEAT_S - 1)[1] == []
    assert len(a.on_gossip(message, now=REFUSAL_REPEAT_S + 1)[1]) == 1
    assert a.members() == (a.me,)


def test_reply_with_other_settings_is_refused() -> None:
    a = node("a", [])
    effects = a.on_reply(push("b", [record("b")], replace(SETTINGS, copies=5)), now=1.0)
    assert "copies 3 != 5" in single(effects, Refused).reason
    assert a.get("b") is None


def test_two_nodes_with_one_id_refuse_each_other() -> None:
    a = node("a", [])
    impostor = replace(record("a"), address="elsewhere.example:7400")
    message = GossipMessage(NodeId("a"), impostor.address, SETTINGS, (impostor,))
    reply, effects = a.on_gossip(message, now=1.0)
    assert "copied data dir" in single(effects, Refused).reason
    assert a.me.address == addr("a") and a.me.incarnation == 0
    assert reply is not None and reply.sender == "a" and reply.address == addr("a")


def test_gossip_to_ourselves_is_ignored() -> None:
    a = node("a", ["localhost:7400"])
    (send,) = a.tick(1.0)
    assert isinstance(send, SendGossip) and send.address == "localhost:7400"
    assert a.on_gossip(send.message, now=1.0) == (None, [])


# Seeds and partitions


def test_alone_node_keeps_gossiping_to_seeds() -> None:
    net = cluster(["a", "b"])
    net.down.add(addr("a"))
    net.rounds(10)
    sent = [e.address for _, s, e in net.effects(SendGossip, at="b")]
    assert sent == [addr("a")] * 10
    net.down.clear()
    net.rounds_until_converged(2)


def test_cluster_reforms_after_a_partition_heals() -> None:
    net = converged_cluster(NAMES[:6])
    west, east = "abc", "def"
    net.blocked = {(addr(w), addr(e)) for w in west for e in east}
    net.blocked |= {(b, a) for a, b in net.blocked}
    net.rounds(int(DEAD_AFTER_S) + 3)
    assert all(net.view(w)[e] == DEAD for w in west for e in east)
    assert all(net.view(e)[w] == DEAD for w in west for e in east)
    net.blocked.clear()
    assert net.rounds_until_converged(25) <= 25


def test_tick_gossips_once_per_interval() -> None:
    a = node("a", [addr("b")])
    # A hundred seconds of ticks every 0.1 s, some timers firing a little early.
    sends = [
        e
        for t in range(1000)
        for e in a.tick(t * 0.1 - 0.05 * (t % 2))
        if isinstance(e, SendGossip)
    ]
    assert 99 <= len(sends) <= 101
    assert a.me.heartbeat == len(sends)
    # After a stall, one round, not a burst of catch-up rounds.
    assert len(a.tick(500.0)) == 1 and a.tick(500.5) == []


def test_reply_carries_only_what_the_pusher_lacks() -> None:
    a = node("a", [])
    a.on_gossip(push("b", [record("b", heartbeat=1), record("c", heartbeat=4)]), now=1.0)
    reply, _ = a.on_gossip(push("d", [record("d", heartbeat=1), record("c", heartbeat=4)]), now=2.0)
    assert reply is not None
    assert sorted(m.node_id for m in reply.members) == ["a", "b"]


# Malformed input and limits


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"node_id": ""}, "empty node id"),
        ({"node_id": "x" * 500}, "node id longer"),
        ({"lat": 91.0}, "latitude 91.0"),
        ({"lat": math.nan}, "latitude nan"),
        ({"lon": -180.5}, "longitude -180.5"),
        ({"address": "no-port"}, "not host:port"),
        ({"address": "host:99999"}, "no port"),
        ({"used_bytes": -1}, "used_bytes -1"),
        ({"heartbeat": 2**64}, "heartbeat"),
        ({"incarnation": 1.5}, "incarnation 1.5"),
        ({"state": "zombie"}, "unknown state 'zombie'"),
        ({"site": None}, "site"),
    ],
)
def test_malformed_records_are_dropped_with_a_reason(
    changes: dict[str, object], reason: str
) -> None:
    a = node("a", [])
    bad = replace(record("m", heartbeat=1), **changes)  # type: ignore[arg-type]
    _, effects = a.on_gossip(push("b", [record("b", heartbeat=1), bad]), now=1.0)
    (dropped,) = [e for e in effects if isinstance(e, RecordDropped)]
    assert dropped.peer == "b" and reason in dropped.reason
    assert {m.node_id for m in a.members()} == {"a", "b"}


def test_wrong_record_type_is_dropped() -> None:
    a = node("a", [])
    message = GossipMessage(NodeId("b"), addr("b"), SETTINGS, ("junk",))  # type: ignore[arg-type]
    _, effects = a.on_gossip(message, now=1.0)
    assert effects == [RecordDropped("b", None, "not a member record: str")]


def test_member_table_is_capped() -> None:
    a = node("a", [])
    many = [replace(record("b"), node_id=NodeId(f"n{i}"), heartbeat=1) for i in range(1500)]
    _, effects = a.on_gossip(push("b", many), now=1.0)
    assert len(a.members()) == MEMBERS_MAX
    dropped = [e for e in effects if isinstance(e, RecordDropped)]
    assert [e.node_id for e in dropped] == [None, None]
    assert "over the limit" in dropped[0].reason and "table full" in dropped[1].reason
    # Known members still update when the table is full.
    newer = replace(many[0], heartbeat=2)
    a.on_gossip(push("b", [newer]), now=2.0)
    assert a.get("n0") == newer


def test_bad_configuration_is_refused_at_construction() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="latitude"):
        Membership(record("a", lat=100.0), SETTINGS, rng=rng)
    with pytest.raises(ValueError, match="seed"):
        Membership(record("a"), SETTINGS, ["nonsense"], rng=rng)
    with pytest.raises(ValueError, match="suspect_after_s < dead_after_s"):
        Membership(record("a"), SETTINGS, rng=rng, suspect_after_s=10, dead_after_s=5)
    with pytest.raises(ValueError, match="start alive"):
        Membership(record("a", state=DEAD), SETTINGS, rng=rng)
    with pytest.raises(ValueError, match="settings"):
        Membership(record("a"), replace(SETTINGS, copies=0), rng=rng)
    with pytest.raises(ValueError, match="free_bytes"):
        Membership(record("a"), SETTINGS, rng=rng).update_self(free_bytes=-5)


# Trust bounds: one lying peer cannot kill, move or inflate another member


FAKE = "forged.example:9"


def forged(name: str, incarnation: int, heartbeat: int, state: MemberState = DEAD) -> Member:
    """A record of ``name`` as a rogue would relay it: at a fake place, dead."""
    return record(name, incarnation, heartbeat, state=state, address=FAKE, site="nowhere",
                  lat=0.0, lon=0.0)


def dropped(effects: list[Effect]) -> list[RecordDropped]:
    return [e for e in effects if isinstance(e, RecordDropped)]


def knows_b(now: float = 0.0) -> Membership:
    """Node a, having heard b itself at incarnation 1, heartbeat 10."""
    a = node("a", [])
    a.on_gossip(push("b", [record("b", 1, 10)]), now=now)
    return a


def test_forged_max_record_does_not_kill_a_member() -> None:
    """The attack of issue 9: one entry for c, dead at a fake address at the highest
    version, pushed to every peer, used to mark c dead everywhere for good."""
    net = converged_cluster(["a", "b", "c"])
    forged_at = net.now
    for name in "ab":
        _, effects = net.nodes[addr(name)].on_gossip(
            push("rogue", [forged("c", COUNTER_MAX, COUNTER_MAX)]), net.now)
        (drop,) = dropped(effects)
        assert (drop.peer, drop.node_id) == ("rogue", "c") and "incarnation" in drop.reason
    net.rounds(int(SUSPECT_AFTER_S) + 2)
    assert net.states_of("c") == {ALIVE}
    assert [e for t, _, e in net.effects(StateChanged) if t >= forged_at] == []
    for name in "ab":
        seen = net.nodes[addr(name)].get("c")
        assert seen is not None and seen.address == addr("c") and seen.incarnation == 0


def test_hearsay_raises_counters_by_a_bound_only() -> None:
    a = knows_b()
    step = INCARNATION_HEARSAY_STEP
    # one second later: the step, plus one incarnation a second
    _, effects = a.on_gossip(push("r", [record("b", 1 + step + 2, 10)]), now=1.0)
    assert "incarnation" in dropped(effects)[0].reason and a.get("b") == record("b", 1, 10)
    a.on_gossip(push("r", [record("b", 1 + step + 1, 10)]), now=1.0)
    assert a.get("b") == record("b", 1 + step + 1, 10)
    # heartbeats: a hundred a second since the version last rose, plus ten seconds' worth
    limit = 10 + int((2.0 + HEARSAY_JITTER_S) * HEARTBEATS_PER_S_MAX)
    _, effects = a.on_gossip(push("r", [record("b", 1 + step + 1, limit + 1)]), now=3.0)
    assert "heartbeat" in dropped(effects)[0].reason
    a.on_gossip(push("r", [record("b", 1 + step + 1, limit)]), now=3.0)
    assert a.get("b") == record("b", 1 + step + 1, limit)


def test_a_new_member_may_not_claim_huge_counters() -> None:
    a = node("a", [])
    for sender, changes in (("b", {"incarnation": UNKNOWN_COUNTER_MAX + 1}),
                            ("c", {"heartbeat": UNKNOWN_COUNTER_MAX + 1})):
        claim = replace(record("m"), **changes)  # type: ignore[arg-type]
        _, effects = a.on_gossip(push(sender, [claim]), now=1.0)
        assert "new member" in dropped(effects)[0].reason and a.get("m") is None
    a.on_gossip(push("b", [record("m", UNKNOWN_COUNTER_MAX, UNKNOWN_COUNTER_MAX)]), now=1.0)
    assert a.get("m") is not None


def test_own_word_beats_hearsay_that_raised_a_version() -> None:
    a = knows_b()
    a.on_gossip(push("r", [forged("b", 1 + INCARNATION_HEARSAY_STEP, 20)]), now=10.0)
    seen = a.get("b")
    assert seen is not None and seen.state == DEAD
    assert seen.address == addr("b") and seen.site == "site-b"  # hearsay never moves it
    # b's own next record is older than the forged one, and wins
    a.on_gossip(push("b", [record("b", 1, 11)]), now=11.0)
    assert a.get("b") == record("b", 1, 11)
    # a stale accusation relayed again is answered by b having spoken just now
    _, effects = a.on_gossip(push("r", [forged("b", 1 + INCARNATION_HEARSAY_STEP, 21)]),
                             now=12.0)
    assert "spoke to us" in dropped(effects)[0].reason
    assert a.get("b") == record("b", 1, 11)


def test_the_accused_outbids_a_bounded_forgery_and_ignores_an_unbounded_one() -> None:
    b = node("b", [], incarnation=1)
    _, effects = b.on_gossip(push("r", [forged("b", COUNTER_MAX, COUNTER_MAX)]), now=1.0)
    assert "not outbid" in dropped(effects)[0].reason and b.me.incarnation == 1
    _, effects = b.on_gossip(push("r", [forged("b", 1 + INCARNATION_HEARSAY_STEP, 5)]),
                             now=2.0)
    assert single(effects, Refuted).incarnation == b.me.incarnation == 2 + INCARNATION_HEARSAY_STEP
    # and the peers that took the forgery take the refutation: it is within their bound
    a = knows_b()
    a.on_gossip(push("r", [forged("b", 1 + INCARNATION_HEARSAY_STEP, 5)]), now=10.0)
    a.on_gossip(push("c", [replace(b.me, heartbeat=11)]), now=10.5)
    seen = a.get("b")
    assert seen is not None and seen.state == ALIVE and seen.version == (b.me.incarnation, 11)


def test_hearsay_cannot_move_an_address_only_the_member_itself() -> None:
    a = knows_b()
    moved = replace(record("b", 1, 11), address="elsewhere.example:7400", lat=10.0)
    a.on_gossip(push("c", [moved]), now=1.0)
    seen = a.get("b")
    assert seen is not None and seen.heartbeat == 11  # the news of life is taken
    assert (seen.address, seen.lat) == (addr("b"), 40.0)
    a.on_gossip(GossipMessage(NodeId("b"), moved.address, SETTINGS,
                              (replace(moved, heartbeat=12),)), now=2.0)
    seen = a.get("b")
    assert seen is not None and (seen.address, seen.lat) == ("elsewhere.example:7400", 10.0)


def test_no_node_calls_itself_dead() -> None:
    a = node("a", [])
    _, effects = a.on_gossip(push("b", [record("b", 1, 10, state=DEAD)]), now=1.0)
    assert "calls itself dead" in dropped(effects)[0].reason and a.get("b") is None


def test_wrong_authenticated_sender_is_refused_whole() -> None:
    a = node("a", [])
    message = push("b", [record("b", 1, 10), record("c", 1, 10)])
    reply, effects = a.on_gossip(message, now=1.0, authenticated=NodeId("c"))
    assert reply is None and a.members() == (a.me,)
    assert "authenticated as 'c'" in single(effects, Refused).reason
    assert "authenticated as 'c'" in single(
        a.on_reply(message, now=61.0, authenticated=NodeId("c")), Refused).reason
    assert a.members() == (a.me,)
    reply, effects = a.on_gossip(message, now=2.0, authenticated=NodeId("b"))
    assert reply is not None and {m.node_id for m in a.members()} == {"a", "b", "c"}


def test_forged_records_are_reported_once_a_minute() -> None:
    a = knows_b()
    counts = [len(dropped(a.on_gossip(push("r", [forged("b", COUNTER_MAX, 1)]), now=t)[1]))
              for t in (1.0, 2.0, REFUSAL_REPEAT_S, REFUSAL_REPEAT_S + 2.0)]
    assert counts == [1, 0, 0, 1]


def test_a_pumping_rogue_needs_a_message_per_step() -> None:
    """Each accepted forgery raises the incarnation by the step at most: reaching
    COUNTER_MAX would take about 2**59 messages, and the member outbids each."""
    a = knows_b()
    for i in range(100):
        known = a.get("b")
        assert known is not None
        a.on_gossip(push("r", [forged("b", known.incarnation + 10**6, 1, ALIVE)]), now=10.0 + i)
        a.on_gossip(push("r", [forged("b", known.incarnation + INCARNATION_HEARSAY_STEP + 1,
                                       known.heartbeat, ALIVE)]), now=10.0 + i)
    seen = a.get("b")
    assert seen is not None and seen.incarnation <= 1 + 100 * (INCARNATION_HEARSAY_STEP + 1)


def test_the_gossip_interval_floor_matches_the_config_check() -> None:
    from pacsmesh.node import config

    assert config.GOSSIP_INTERVAL_S_MIN == GOSSIP_INTERVAL_S_MIN
    with pytest.raises(ValueError, match="gossip_interval_s"):
        Membership(record("a"), SETTINGS, rng=random.Random(0), gossip_interval_s=0.001)


def test_capacity_claims_are_capped_and_placement_agrees_across_nodes() -> None:
    from pacsmesh.cluster.state import ClusterState, placement_weights

    assert placement_weights({"a": 1, "b": 1, "c": 1 << 62}) == {"a": 1, "b": 1, "c": 4}
    assert placement_weights({"a": 8, "b": 1 << 62}) == {"a": 8, "b": 32}
    assert placement_weights({}) == {}
    names = ["a", "b", "c", "d", "e"]
    net = converged_cluster(names)
    net.nodes[addr("e")].update_self(capacity_bytes=1 << 62)  # claims four million TB
    net.rounds(3)
    tables = []
    for name in names:
        state = ClusterState(name, 64, 1, 0.0, DEAD_AFTER_S)
        state.publish(net.nodes[addr(name)].members(), {})
        assert state.snapshot.table is not None
        tables.append([state.snapshot.table.placement(p).replicas for p in range(64)])
    assert all(t == tables[0] for t in tables)  # one placement on every node
    share = sum(replicas == ("e",) for replicas in tables[0]) / 64
    # capped at 4x the others: about half the partitions, not all of them
    assert 0.25 < share < 0.75, share
