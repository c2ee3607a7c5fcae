"""Cluster membership by gossip: a state machine with no IO.

Every node keeps a table of member records (id, site, position, address,
capacity, incarnation, heartbeat, state). Each round it raises its own heartbeat
and pushes the whole table to a few random peers; a receiver merges it and
replies with the records the sender lacks, so one round trip converges both
sides (push-pull anti-entropy, as in Scuttlebutt and Cassandra's gossiper).

A record's version is (incarnation, heartbeat). Only the node itself raises its
own version, so a newer version is proof of life and the newest record wins.
Liveness is judged locally with SWIM's states but timeouts instead of probes: a
peer whose version has not risen for suspect_after_s is suspect, for
dead_after_s dead. A node that sees itself suspected or declared dead raises its
incarnation (SWIM refutation). A clean shutdown announces "left", which is not
"dead": the placement layer decides what a long absence means.

Trust bounds. Any peer, even one holding a valid certificate, may lie in what it
relays; one lying peer must not be able to kill, move or inflate another member:

1. Hearsay is bounded. A record of X from a sender other than X may raise X's
   incarnation by at most INCARNATION_HEARSAY_STEP, plus INCARNATIONS_PER_S_MAX
   per second since X's record last changed here, and X's heartbeat by at most
   HEARTBEATS_PER_S_MAX per second since then (plus HEARSAY_JITTER_S worth, for
   late and reordered delivery). A record of a member we do not know may claim
   neither counter above UNKNOWN_COUNTER_MAX. Records over a bound are dropped
   with a reason (RecordDropped, once a minute per sender, member and rule).
2. A node's own word beats hearsay. X's record in a message whose sender is X
   (in the runtime, when it can tell: the channel authenticated X; a message
   whose authenticated id is not its sender is refused whole) is taken even when
   hearsay had raised X's version above it, and is proof of life. Only X moves
   its address, site and position: hearsay about a known member brings its
   version, state and storage figures, never where it is. No node calls itself
   suspect or dead; such a record is dropped.
3. Accusations yield to first-hand contact: hearsay calling X suspect or dead is
   dropped while X itself spoke to us within suspect_after_s.
4. Refutation stays possible. Hearsay raises X's incarnation by a bounded step
   per accepted record, so X outbids it by one. X answers a record of itself only
   within INCARNATION_HEARSAY_STEP of its own incarnation (an honest peer holds
   no more, by rule 1), so no message drives X towards COUNTER_MAX; a record of X
   beyond that is dropped, and X's own word (rule 2) corrects whoever holds it.
   The runtime keeps refuted incarnations, so a restart starts above them.

Without an authenticated channel the sender is only a claim: whoever pretends to
be X gets rule 2's weight for X, until X's next message. Storage claims are
bounded where they matter, in placement (cluster/state.py placement_weights).

The runtime calls ``tick(now)`` about every gossip_interval_s, hands incoming
messages to ``on_gossip`` (returns the reply to send back) and ``on_reply``, and
carries out the returned effects: send a message, log a state change or a
refusal. ``now`` is the caller's monotonic clock in seconds; randomness comes
from the caller's ``random.Random``, so a seeded simulation replays exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import NewType, TypeAlias

NodeId = NewType("NodeId", str)

FANOUT_DEFAULT = 3
GOSSIP_INTERVAL_S_DEFAULT = 1.0
# Five silent rounds: a live peer reaches us through several random paths per
# round, so missing five in a row means trouble, not bad luck.
SUSPECT_AFTER_ROUNDS = 5
DEAD_AFTER_S_DEFAULT = 600.0  # CONTRACT.md [cluster] dead_after_s
# Bounds memory and message size; far above any real federation of sites.
MEMBERS_MAX = 1024
# Dead and left peers are still tried now and then, so a node that comes back,
# or the other side of a healed partition, is found again.
GONE_PROBE_PROBABILITY = 0.1
SEED_PROBE_PROBABILITY = 0.1  # per round, when we know live peers already
# A timer that fires a little early still counts as a round, and float sums of
# intervals are never exact.
ROUND_EARLY_FRACTION = 0.1
# A misconfigured peer is refused every round; the operator needs one clear
# line a minute, not one a second.
REFUSAL_REPEAT_S = 60.0
REFUSALS_TRACKED_MAX = 256
NODE_ID_LENGTH_MAX = 128
SITE_LENGTH_MAX = 256
ADDRESS_LENGTH_MAX = 260  # a 253-character DNS name, ":" and a port
COUNTER_MAX = 2**63 - 1  # int64 on the wire
PORT_MAX = 65535
# Trust bounds (module docstring). Honest counters rise slowly: the incarnation by
# one per restart or refutation, the heartbeat by one per gossip round.
INCARNATION_HEARSAY_STEP = 16
INCARNATIONS_PER_S_MAX = 1.0  # a restart takes longer; a refutation needs a suspicion
HEARTBEATS_PER_S_MAX = 100.0  # one per round, with rounds down to 10 ms
GOSSIP_INTERVAL_S_MIN = 1.0 / HEARTBEATS_PER_S_MAX
HEARSAY_JITTER_S = 10.0  # records relayed late or out of order by up to this much
# Restarting every second for 30,000 years stays below; it leaves 2**63 - 2**40
# to outbid whatever a first record claimed.
UNKNOWN_COUNTER_MAX = 2**40
ELAPSED_S_MAX = 1e9  # keeps the bound arithmetic in small integers, whatever the caller's clock


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"  # announced a clean shutdown; expected back


_STATE_VALUES = frozenset(state.value for state in MemberState)


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Cluster-wide settings; nodes federate only when these are equal."""

    copies: int
    min_distance_miles: float
    partitions: int
    # fingerprint of the retention policy (node/retention.py): a node deleting by other
    # rules than its peers would keep removing what they keep sending back
    retention: str = ""


@dataclass(frozen=True, slots=True)
class Member:
    """One node's gossiped record. ``state`` is the sender's view of it."""

    node_id: NodeId
    site: str
    lat: float
    lon: float
    address: str  # host:port, for peers
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    incarnation: int  # raised by the node on every restart and to refute suspicion
    heartbeat: int  # raised by the node every gossip round
    state: MemberState = MemberState.ALIVE

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.heartbeat)


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A push (to ``on_gossip``) or the reply to one (to ``on_reply``)."""

    sender: NodeId
    address: str  # the sender's own address, for refusal messages
    settings: ClusterSettings
    members: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class SendGossip:
    address: str
    message: GossipMessage


@dataclass(frozen=True, slots=True)
class StateChanged:
    node_id: NodeId
    old: MemberState | None  # None: a member we had not heard of before
    new: MemberState


@dataclass(frozen=True, slots=True)
class Refused:
    """We would not federate with a peer; its records were not merged."""

    peer: str  # the node id it claims
    address: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecordDropped:
    """A record from a peer was ignored (malformed, the table is full, or a trust
    bound refused what it claims)."""

    peer: str
    node_id: str | None  # None when the drop covers several records
    reason: str
    rule: str = ""  # the trust bound that refused it ("self-accused", ...); "" if malformed


@dataclass(frozen=True, slots=True)
class Refuted:
    """We raised our incarnation because a peer held a wrong record of us."""

    peer: str
    incarnation: int  # our new incarnation
    reason: str


@dataclass(frozen=True, slots=True)
class LeftTimedOut:
    """A left member has now been silent for dead_after_s; it stays "left"."""

    node_id: NodeId
    silent_s: float


Effect: TypeAlias = SendGossip | StateChanged | Refused | RecordDropped | Refuted | LeftTimedOut


def address_problem(address: object) -> str | None:
    """Why ``address`` is not a usable host:port, or None."""
    if not isinstance(address, str) or not address or len(address) > ADDRESS_LENGTH_MAX:
        return f"address {address!r} is empty, too long or not text"
    host, colon, port = address.rpartition(":")
    if any(c.isspace() for c in address) or not colon or not host:
        return f"address {address!r} is not host:port"
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= PORT_MAX):
        return f"address {address!r} has no port in 1..{PORT_MAX}"
    return None


def member_problem(record: object) -> str | None:
    """Why a record received from the wire is malformed, or None."""
    if not isinstance(record, Member):
        return f"not a member record: {type(record).__name__}"
    node_id = record.node_id
    if not isinstance(node_id, str) or not node_id.strip():
        return "empty node id"
    if len(node_id) > NODE_ID_LENGTH_MAX or not node_id.isprintable():
        return f"node id longer than {NODE_ID_LENGTH_MAX} or not printable"
    if not isinstance(record.site, str) or len(record.site) > SITE_LENGTH_MAX:
        return f"site not text or longer than {SITE_LENGTH_MAX}"
    if not (_is_real(record.lat) and -90.0 <= record.lat <= 90.0):
        return f"latitude {record.lat!r} outside [-90, 90]"
    if not (_is_real(record.lon) and -180.0 <= record.lon <= 180.0):
        return f"longitude {record.lon!r} outside [-180, 180]"
    problem = address_problem(record.address)
    if problem is not None:
        return problem
    for name in ("capacity_bytes", "used_bytes", "free_bytes", "incarnation", "heartbeat"):
        value = getattr(record, name)
        if not (_is_int(value) and 0 <= value <= COUNTER_MAX):
            return f"{name} {value!r} is not an integer in [0, 2**63)"
    if not (isinstance(record.state, str) and record.state in _STATE_VALUES):
        return f"unknown state {record.state!r}"
    return None


def _impostor(message: GossipMessage, authenticated: NodeId) -> str:
    return (f"message from {message.sender!r} came on a channel authenticated as "
            f"{authenticated!r}")


def settings_differences(ours: ClusterSettings, theirs: ClusterSettings) -> list[str]:
    """Each differing field as "name ours != theirs"."""
    differences = []
    for field in fields(ClusterSettings):
        mine, other = getattr(ours, field.name), getattr(theirs, field.name, None)
        if mine != other:
            differences.append(f"{field.name} {mine!r} != {other!r}")
    return differences


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


@dataclass(slots=True)
class _Peer:
    record: Member  # state is our local view
    heard_at: float  # local time its record last changed (newer version, or its own word)
    left_timeout_reported: bool = False
    first_hand_at: float = -math.inf  # local time the member itself last spoke to us


class Membership:
    """The member table of one node, and the gossip protocol that keeps it."""

    def __init__(
        self,
        me: Member,
        settings: ClusterSettings,
        seeds: Sequence[str] = (),
        *,
        rng: random.Random,
        gossip_interval_s: float = GOSSIP_INTERVAL_S_DEFAULT,
        suspect_after_s: float | None = None,
        dead_after_s: float = DEAD_AFTER_S_DEFAULT,
        fanout: int = FANOUT_DEFAULT,
    ) -> None:
        """``me.incarnation`` must exceed the one of the previous run (persisted
        by the runtime), so the records of this run win over the old ones."""
        problem = member_problem(me)
        if problem is not None:
            raise ValueError(f"own member record: {problem}")
        if me.state != MemberState.ALIVE:
            raise ValueError(f"own member record must start alive, not {me.state}")
        if settings.copies < 1 or settings.partitions < 1 or settings.min_distance_miles < 0:
            raise ValueError(f"cluster settings out of range: {settings}")
        if suspect_after_s is None:
            suspect_after_s = SUSPECT_AFTER_ROUNDS * gossip_interval_s
        if not GOSSIP_INTERVAL_S_MIN <= gossip_interval_s <= suspect_after_s < dead_after_s:
            raise ValueError(
                f"need {GOSSIP_INTERVAL_S_MIN} <= gossip_interval_s <= suspect_after_s < "
                f"dead_after_s, got {gossip_interval_s}, {suspect_after_s}, {dead_after_s}"
            )
        if fanout < 1:
            raise ValueError(f"fanout must be at least 1, got {fanout}")
        for seed in seeds:
            problem = address_problem(seed)
            if problem is not None:
                raise ValueError(f"seed: {problem}")
        self._me = replace(me, state=MemberState.ALIVE)
        self._settings = settings
        self._seeds = tuple(dict.fromkeys(s for s in seeds if s != me.address))
        self._rng = rng
        self._gossip_interval_s = gossip_interval_s
        self._suspect_after_s = suspect_after_s
        self._dead_after_s = dead_after_s
        self._fanout = fanout
        self._peers: dict[NodeId, _Peer] = {}
        self._refused_at: dict[tuple[str, str, str], float] = {}
        self._dropped_at: dict[tuple[str, str, str], float] = {}
        self._now = -math.inf
        self._next_round_at = -math.inf

    # Queries

    @property
    def me(self) -> Member:
        return self._me

    @property
    def settings(self) -> ClusterSettings:
        return self._settings

    @property
    def dead_after_s(self) -> float:
        return self._dead_after_s

    def members(self) -> tuple[Member, ...]:
        """Every known member, ourselves included, by node id, with our view of its state."""
        records = [self._me, *(peer.record for peer in self._peers.values())]
        return tuple(sorted(records, key=lambda m: m.node_id))

    def alive_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members() if m.state == MemberState.ALIVE)

    def get(self, node_id: str) -> Member | None:
        if node_id == self._me.node_id:
            return self._me
        peer = self._peers.get(NodeId(node_id))
        return None if peer is None else peer.record

    def time_since_heard(self, node_id: str, now: float) -> float:
        """Seconds since the member's record last changed here; KeyError if unknown."""
        if node_id == self._me.node_id:
            return 0.0
        return max(0.0, now - self._peers[NodeId(node_id)].heard_at)

    # Inputs

    def tick(self, now: float) -> list[Effect]:
        """Call about every gossip_interval_s: runs the failure detector, and
        a gossip round when one is due."""
        now = self._advance(now)
        effects = self._detect_failures(now)
        if now >= self._next_round_at - ROUND_EARLY_FRACTION * self._gossip_interval_s:
            # Keep the cadence when a timer fires early; restart it after a stall
            # rather than bursting to catch up.
            scheduled = self._next_round_at + self._gossip_interval_s
            self._next_round_at = scheduled if scheduled > now else now + self._gossip_interval_s
            if self._me.state == MemberState.ALIVE:
                self._me = replace(self._me, heartbeat=self._bumped(self._me.heartbeat))
            message = self._message()
            effects.extend(SendGossip(a, message) for a in self._round_targets())
        return effects

    def on_gossip(
        self, message: GossipMessage, now: float, *, authenticated: NodeId | None = None
    ) -> tuple[GossipMessage | None, list[Effect]]:
        """A peer's push. Returns the reply for the runtime to send back (None:
        send nothing) and the effects. ``authenticated``: the node id the channel
        proved (a TLS client certificate), when the runtime knows it."""
        now = self._advance(now)
        if authenticated is not None and authenticated != message.sender:
            return None, self._refused(message, _impostor(message, authenticated), now)
        if self._is_loopback(message):
            return None, []
        reason = self._refusal_reason(message)
        if reason is not None:
            # Our settings in the reply let the other side refuse us just as clearly.
            reply = GossipMessage(self._me.node_id, self._me.address, self._settings, ())
            return reply, self._refused(message, reason, now)
        their_versions, effects = self._merge(message, now)
        return self._message(their_versions), effects

    def on_reply(
        self, message: GossipMessage, now: float, *, authenticated: NodeId | None = None
    ) -> list[Effect]:
        """The reply to one of our pushes; ``authenticated`` as for on_gossip."""
        now = self._advance(now)
        if authenticated is not None and authenticated != message.sender:
            return self._refused(message, _impostor(message, authenticated), now)
        if self._is_loopback(message):
            return []
        reason = self._refusal_reason(message)
        if reason is not None:
            return self._refused(message, reason, now)
        return self._merge(message, now)[1]

    def leave(self, now: float) -> list[Effect]:
        """Announce a clean shutdown. The runtime sends the effects, then stops."""
        now = self._advance(now)
        self._me = replace(
            self._me, state=MemberState.LEFT, heartbeat=self._bumped(self._me.heartbeat)
        )
        message = self._message()
        targets = self._live_targets() or self._sample(self._seeds)
        return [SendGossip(a, message) for a in targets]

    def update_self(
        self,
        *,
        used_bytes: int | None = None,
        free_bytes: int | None = None,
        capacity_bytes: int | None = None,
    ) -> None:
        """New storage figures; they spread with the next round's heartbeat."""
        changed = replace(
            self._me,
            used_bytes=self._me.used_bytes if used_bytes is None else used_bytes,
            free_bytes=self._me.free_bytes if free_bytes is None else free_bytes,
            capacity_bytes=self._me.capacity_bytes if capacity_bytes is None else capacity_bytes,
        )
        problem = member_problem(changed)
        if problem is not None:
            raise ValueError(problem)
        self._me = changed

    # Internals

    def _advance(self, now: float) -> float:
        # Timers must never run backwards, whatever clock the caller has.
        self._now = max(self._now, now)
        return self._now

    @staticmethod
    def _bumped(counter: int) -> int:
        return min(counter + 1, COUNTER_MAX)

    def _detect_failures(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for node_id, peer in self._peers.items():
            silent_s = now - peer.heard_at
            old = peer.record.state
            if old == MemberState.LEFT:
                if silent_s >= self._dead_after_s and not peer.left_timeout_reported:
                    peer.left_timeout_reported = True
                    effects.append(LeftTimedOut(node_id, silent_s))
                continue
            new = old
            if silent_s >= self._dead_after_s:
                new = MemberState.DEAD
            elif silent_s >= self._suspect_after_s and old == MemberState.ALIVE:
                new = MemberState.SUSPECT
            if new != old:
                peer.record = replace(peer.record, state=new)
                effects.append(StateChanged(node_id, old, new))
        return effects

    def _sample(self, addresses: Sequence[str]) -> list[str]:
        return self._rng.sample(addresses, min(self._fanout, len(addresses)))

    def _addresses(self, *states: MemberState) -> list[str]:
        found = {
            peer.record.address
            for peer in self._peers.values()
            if peer.record.state in states and peer.record.address != self._me.address
        }
        return sorted(found)

    def _live_targets(self) -> list[str]:
        return self._sample(self._addresses(MemberState.ALIVE, MemberState.SUSPECT))

    def _round_targets(self) -> list[str]:
        targets = self._live_targets()
        if not targets:
            # Alone: the seeds are how a new node joins and a healed cluster re-forms.
            targets = self._sample(self._seeds)
        elif self._seeds and self._rng.random() < SEED_PROBE_PROBABILITY:
            # Also now and then when not alone (as Cassandra's gossiper does): two halves
            # that formed apart (booted during a partition) meet again through a seed.
            targets.append(self._rng.choice(list(self._seeds)))
        gone = self._addresses(MemberState.DEAD, MemberState.LEFT)
        if gone and self._rng.random() < GONE_PROBE_PROBABILITY:
            targets.append(self._rng.choice(gone))
        return list(dict.fromkeys(targets))

    def _message(self, skip: dict[NodeId, tuple[int, int]] | None = None) -> GossipMessage:
        """Our table; in a reply, without what the pusher already has as new, but
        always with our own record: our word corrects hearsay it may hold of us."""
        records = [self._me, *(p.record for p in self._peers.values())]
        if skip is not None:
            records = [
                r
                for r in records
                if r is self._me or r.version > skip.get(r.node_id, (-1, -1))
            ]
        return GossipMessage(self._me.node_id, self._me.address, self._settings, tuple(records))

    def _is_loopback(self, message: GossipMessage) -> bool:
        # A seed list may name this very node under another host name.
        return message.sender == self._me.node_id and message.address == self._me.address

    def _refusal_reason(self, message: GossipMessage) -> str | None:
        if message.sender == self._me.node_id:
            return (
                f"node id {self._me.node_id!r} is ours too, but that node is at "
                f"{message.address!r} and we are at {self._me.address!r} (copied data dir?)"
            )
        differences = settings_differences(self._settings, message.settings)
        if differences:
            return "cluster settings differ (ours != theirs): " + ", ".join(differences)
        return None

    def _refused(self, message: GossipMessage, reason: str, now: float) -> list[Effect]:
        key = (str(message.sender), str(message.address), reason)
        last = self._refused_at.pop(key, None)
        if last is not None and now - last < REFUSAL_REPEAT_S:
            self._refused_at[key] = last
            return []
        self._refused_at[key] = now
        if len(self._refused_at) > REFUSALS_TRACKED_MAX:
            del self._refused_at[next(iter(self._refused_at))]
        return [Refused(str(message.sender), str(message.address), reason)]

    def _merge(
        self, message: GossipMessage, now: float
    ) -> tuple[dict[NodeId, tuple[int, int]], list[Effect]]:
        """Takes every record newer than ours. Returns the versions the sender
        holds (to trim our reply) and the effects."""
        sender = str(message.sender)
        effects: list[Effect] = []
        records = message.members
        if len(records) > MEMBERS_MAX:
            effects.append(
                RecordDropped(sender, None, f"{len(records)} records, over the limit {MEMBERS_MAX}")
            )
            records = records[:MEMBERS_MAX]
        their_versions: dict[NodeId, tuple[int, int]] = {}
        table_full_count = 0
        for raw in records:
            problem = member_problem(raw)
            if problem is not None:
                node_id = getattr(raw, "node_id", None)
                shown = node_id[:NODE_ID_LENGTH_MAX] if isinstance(node_id, str) else None
                effects.append(RecordDropped(sender, shown, problem))
                continue
            record = replace(raw, state=MemberState(raw.state))
            their_versions[record.node_id] = max(
                record.version, their_versions.get(record.node_id, (-1, -1))
            )
            if record.node_id == self._me.node_id:
                effects.extend(self._check_record_of_me(record, sender, now))
            elif not self._take(record, record.node_id == message.sender, now, effects, sender):
                table_full_count += 1
        if table_full_count:
            reason = f"member table full ({MEMBERS_MAX}): {table_full_count} new members ignored"
            effects.append(RecordDropped(sender, None, reason))
        return their_versions, effects

    def _take(
        self, record: Member, first_hand: bool, now: float, effects: list[Effect], sender: str
    ) -> bool:
        """Merges one valid record of a peer (``first_hand``: from the peer itself)
        under the trust bounds; False when the table is full."""
        node_id = record.node_id
        if first_hand and record.state in (MemberState.SUSPECT, MemberState.DEAD):
            reason = f"calls itself {record.state}; no node does"
            effects.extend(self._dropped(sender, node_id, "self-accused", reason, now))
            return True
        peer = self._peers.get(node_id)
        if peer is None:
            if max(record.incarnation, record.heartbeat) > UNKNOWN_COUNTER_MAX:
                reason = (f"a new member at version {record.version}, over "
                          f"{UNKNOWN_COUNTER_MAX} (2**40)")
                effects.extend(self._dropped(sender, node_id, "new-bound", reason, now))
                return True
            if len(self._peers) + 1 >= MEMBERS_MAX:
                return False
            # Adopt the sender's view: a newcomer learns at once who is dead.
            self._peers[node_id] = _Peer(record, heard_at=now,
                                         first_hand_at=now if first_hand else -math.inf)
            effects.append(StateChanged(node_id, None, record.state))
            return True
        known = peer.record
        if first_hand:  # rule 2: whatever hearsay said, even of a higher version
            peer.first_hand_at = now
            if record == known:
                return True
        elif record.version <= known.version:
            return True  # nothing new: our own timers judge it
        else:
            problem = self._hearsay_problem(known, record, now - peer.heard_at)
            if problem is None and record.state in (MemberState.SUSPECT, MemberState.DEAD):
                spoke_s = now - peer.first_hand_at
                if spoke_s < self._suspect_after_s:  # rule 3
                    problem = ("accusation", f"calls it {record.state}, but it spoke to us "
                               f"{spoke_s:.1f} s ago")
            if problem is not None:
                effects.extend(self._dropped(sender, node_id, *problem, now))
                return True
            # Only the member itself says where it is.
            record = replace(record, address=known.address, site=known.site, lat=known.lat,
                             lon=known.lon)
        peer.record, peer.heard_at, peer.left_timeout_reported = record, now, False
        if record.state != known.state:
            effects.append(StateChanged(node_id, known.state, record.state))
        return True

    @staticmethod
    def _hearsay_problem(
        known: Member, record: Member, elapsed_s: float
    ) -> tuple[str, str] | None:
        """(rule, reason) when a relayed record raises a member's counters faster
        than the member itself can (rule 1)."""
        elapsed_s = min(max(0.0, elapsed_s), ELAPSED_S_MAX)
        incarnation_max = (known.incarnation + INCARNATION_HEARSAY_STEP
                           + int(elapsed_s * INCARNATIONS_PER_S_MAX))
        if record.incarnation > incarnation_max:
            return ("incarnation", f"incarnation {record.incarnation} relayed, over "
                    f"{incarnation_max} (ours {known.incarnation}, risen {elapsed_s:.0f} s ago)")
        heartbeat_max = known.heartbeat + int((elapsed_s + HEARSAY_JITTER_S)
                                              * HEARTBEATS_PER_S_MAX)
        if record.heartbeat > heartbeat_max:
            return ("heartbeat", f"heartbeat {record.heartbeat} relayed, over "
                    f"{heartbeat_max} (ours {known.heartbeat}, risen {elapsed_s:.0f} s ago)")
        return None

    def _dropped(
        self, sender: str, node_id: str, rule: str, reason: str, now: float
    ) -> list[Effect]:
        """A record refused by a trust bound; told once a minute per sender, member
        and rule (a lying peer repeats itself every round)."""
        key = (sender, node_id, rule)
        last = self._dropped_at.pop(key, None)
        if last is not None and now - last < REFUSAL_REPEAT_S:
            self._dropped_at[key] = last
            return []
        self._dropped_at[key] = now
        if len(self._dropped_at) > REFUSALS_TRACKED_MAX:
            del self._dropped_at[next(iter(self._dropped_at))]
        return [RecordDropped(sender, node_id, reason, rule)]

    def _check_record_of_me(self, record: Member, sender: str, now: float) -> list[Effect]:
        """SWIM refutation: outbid any record that says we are down, or that is
        newer than our own (a restart whose incarnation was not raised), unless it
        is beyond what any honest peer would hold (rule 4)."""
        me = self._me
        if me.state == MemberState.LEFT:
            return []
        if record.incarnation > me.incarnation + INCARNATION_HEARSAY_STEP:
            reason = (f"holds us at incarnation {record.incarnation}, over ours "
                      f"{me.incarnation} + {INCARNATION_HEARSAY_STEP}; not outbid, our own "
                      "word corrects it")
            return self._dropped(sender, me.node_id, "us", reason, now)
        accused = (
            record.state in (MemberState.SUSPECT, MemberState.DEAD)
            and record.incarnation >= me.incarnation
        )
        if not accused and record.version <= me.version:
            return []
        incarnation = self._bumped(max(me.incarnation, record.incarnation))
        self._me = replace(me, incarnation=incarnation)
        if accused:
            why = f"{sender} holds us as {record.state} at incarnation {record.incarnation}"
        else:
            why = f"{sender} holds a newer record of us {record.version} than ours {me.version}"
        return [Refuted(sender, incarnation, why)]
