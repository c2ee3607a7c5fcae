"""The simulated world: clock, event queue, network, fault plan and invariants.

Everything random comes from the seed: which sites take part, when studies
arrive and where, every message's delay and loss, when nodes crash, partitions
form and heal, and whether a disk dies. Time is a float in seconds advanced by
the event queue, never read from the machine, so a seed replays exactly.

Invariants (each failure raises `SimFailure` naming the seed and the time):
  1. No acknowledged instance is lost: every ingested manifest stays held by a
     node whose disk still exists (a crashed node's disk counts; it comes back).
  2. No trim leaves a copy short: when a node drops a study's copies, the other
     holders of each dropped manifest, by the world's truth and not the node's
     beliefs, still span N sites pairwise >= D apart.
  3. After the faults heal, every study is held in full by N live nodes
     pairwise >= D apart.
  4. After the faults heal, every live node sees every other live node alive and
     every lost one gone (or has never heard of it), and knows every manifest.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import NoReturn

from pacsmesh.cluster.membership import ClusterSettings, Member, MemberState, NodeId
from pacsmesh.cluster.messages import approx_size
from pacsmesh.cluster.placement import max_pairwise_set_size, partition_of
from tests.sim.simnode import (
    Disk,
    OnReply,
    OnTimeout,
    Process,
    Reply,
    Request,
    SimManifest,
    Timing,
)

COPIES = 3
MIN_DISTANCE_MILES = 250.0
PARTITIONS = 64  # small: placement is recomputed on every member change
PORT = 7400
CAPACITIES_TB = (2, 4, 8, 16)  # powers of two: quantized_capacity keeps them as they are
TB = 1 << 40
DELAY_MIN_S = 0.005
DELAY_MAX_S = 0.2
# Heal: the world waits this long with no faults before it judges the end state.
HEAL_S = 600.0
# A node down longer than dead_after_s drops out of placement; choose both kinds.
DOWNTIME_SHORT_S = (2.0, 25.0)
DOWNTIME_LONG_S = (40.0, 900.0)
CLEAN_LEAVE_PROBABILITY = 0.3
PARTITION_S = (5.0, 600.0)
LOSS_BASE_MAX = 0.05
LOSS_BURST = (0.2, 0.6)
LOSS_BURST_S = (10.0, 300.0)
# A congested or flapping uplink: every message to or from one node takes this
# much longer, for a while. Views then lag by seconds, not milliseconds.
SLOW_EXTRA_S = (0.5, 5.0)
SLOW_S = (30.0, 300.0)
DISK_LOSS_PROBABILITY = 0.5
DISK_REPLACED_PROBABILITY = 0.5
DISK_LOSS_RETRY_S = 20.0
INGEST_RETRY_S = 10.0  # a modality whose archive is down tries again
INSTANCE_GAP_S = (0.2, 5.0)
# A later instance of a study sent to another site (a follow-up series there):
# makes a site both a non-origin holder and an origin of one study.
INSTANCE_ELSEWHERE_PROBABILITY = 0.15
PROBLEMS_SHOWN_MAX = 12
# After the heal, the end state is looked at this often; once it holds, the run
# goes on for SETTLE_S more (late trims must keep it) and then ends, so quick
# convergence leaves time for more seeds. A trim cannot break invariant 3 without
# breaking invariant 2 first, which is checked on every trim.
CONVERGENCE_PROBE_S = 10.0
SETTLE_S = 60.0


@dataclass(frozen=True)
class Site:
    node_id: str
    site: str
    lat: float
    lon: float

    @property
    def address(self) -> str:
        return f"{self.node_id}.sim:{PORT}"


# Real US cities. boston-b shares Boston's site, and the northeast corridor is a
# chain of near neighbours: Boston - New York 190 miles, New York - Philadelphia
# 80, Philadelphia - Washington 123, yet Boston - Philadelphia 271 and New York -
# Washington 204. Closeness is not transitive there, so which of them placement
# picks depends on who else is in the member table: views that differ by one
# member can disagree about more than that member.
SITES = (
    Site("boston", "boston", 42.3601, -71.0589),
    Site("boston-b", "boston", 42.3601, -71.0589),
    Site("new-york", "new-york", 40.7128, -74.0060),
    Site("philadelphia", "philadelphia", 39.9526, -75.1652),
    Site("washington", "washington", 38.9072, -77.0369),
    Site("chicago", "chicago", 41.8781, -87.6298),
    Site("denver", "denver", 39.7392, -104.9903),
    Site("seattle", "seattle", 47.6062, -122.3321),
    Site("los-angeles", "los-angeles", 34.0522, -118.2437),
    Site("atlanta", "atlanta", 33.7490, -84.3880),
    Site("dallas", "dallas", 32.7767, -96.7970),
)


@dataclass(frozen=True)
class SimConfig:
    """How much of each thing one seed gets; (a, b) means a random count in a..b."""

    fault_phase_s: float = 600.0
    heal_s: float = HEAL_S
    nodes: tuple[int, int] = (5, 8)
    sites: tuple[Site, ...] = ()  # fixed sites for a scripted scenario; () picks by seed
    capacity_tb: int = 0  # every node's, for a scripted scenario; 0 picks by seed
    studies: tuple[int, int] = (15, 30)
    instances: tuple[int, int] = (1, 6)
    crashes: tuple[int, int] = (2, 8)
    partitions: tuple[int, int] = (1, 4)
    loss_bursts: tuple[int, int] = (0, 3)
    slow_nodes: tuple[int, int] = (0, 3)
    loss_base_max: float = LOSS_BASE_MAX
    disk_loss_probability: float = DISK_LOSS_PROBABILITY
    timing: Timing = field(default_factory=Timing)
    events_max: int = 50_000_000  # a runaway simulation fails instead of hanging

    def scaled(self, hours: float) -> SimConfig:
        """The same density of studies and faults over ``hours`` of faulty time."""
        k = hours * 3600.0 / self.fault_phase_s

        def more(r: tuple[int, int]) -> tuple[int, int]:
            return (round(r[0] * k), round(r[1] * k))

        return replace(self, fault_phase_s=hours * 3600.0, studies=more(self.studies),
                       crashes=more(self.crashes), partitions=more(self.partitions),
                       loss_bursts=more(self.loss_bursts), slow_nodes=more(self.slow_nodes))


class SimFailure(AssertionError):
    """An invariant broke; the message names the seed and time that replay it."""


@dataclass
class Slot:
    """A site's machine: its disk outlives processes, unless the disk itself dies."""

    site: Site
    capacity_bytes: int
    disk: Disk
    proc: Process | None = None
    lost: bool = False  # disk gone, never coming back
    boots: int = 0

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.up


@dataclass
class _Call:
    proc: Process
    on_reply: OnReply | None
    on_timeout: OnTimeout | None


@dataclass(frozen=True)
class SimResult:
    seed: int
    trace: str  # hash of every event, for the determinism check
    stats: dict[str, int]
    simulated_s: float


def replay_hint(seed: int) -> str:
    return f"replay: PACSMESH_SIM_SEED={seed} pytest tests/sim -k seed_{seed}"


class World:
    def __init__(self, seed: int, config: SimConfig | None = None,
                 replay: str | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.replay = replay or replay_hint(seed)  # how to run this world again
        self.now = 0.0
        self.stats: collections.Counter[str] = collections.Counter()
        # per node: messages and bytes it sent (requests and replies), for the
        # at-rest cost checker
        self.sent_messages: collections.Counter[str] = collections.Counter()
        self.sent_bytes: collections.Counter[str] = collections.Counter()
        self.sent_kinds: collections.Counter[str] = collections.Counter()  # by message type
        self.settings = ClusterSettings(COPIES, MIN_DISTANCE_MILES, PARTITIONS)
        self.acked: dict[bytes, SimManifest] = {}
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._tickets = itertools.count()
        self._calls: dict[int, _Call] = {}
        self._net_rng = random.Random(f"{seed}/net")
        self._fault_rng = random.Random(f"{seed}/faults")
        self._trace = hashlib.blake2b(digest_size=16)
        self._groups: dict[str, int] | None = None  # the active partition
        self._partition_episode = -1
        self._loss_base = 0.0
        self._loss = 0.0
        self._loss_episode = -1
        self._slow_s: dict[str, float] = {}  # node -> extra latency of its messages
        self._healed = False
        self._end_s = self.config.fault_phase_s + self.config.heal_s
        plan = random.Random(f"{seed}/plan")
        sites = self.config.sites or pick_sites(plan, self.config.nodes)
        capacity_tb = self.config.capacity_tb
        self.slots = {s.node_id: Slot(s, (capacity_tb or plan.choice(CAPACITIES_TB)) * TB,
                                      Disk(PARTITIONS))
                      for s in sites}
        self._by_address = {slot.site.address: node_id for node_id, slot in self.slots.items()}
        for slot in self.slots.values():
            self._boot(slot)
        self._plan(plan)

    # ---- clock and queue -------------------------------------------------------------

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn))

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay_s, fn)

    def every(self, proc: Process, interval_s: float, fn: Callable[[], None]) -> None:
        """A process timer; it stops when the process dies. Random phase, as real
        timers start whenever the process did."""
        def fire() -> None:
            if proc.up:
                fn()
                self.after(interval_s, fire)
        self.after(self._net_rng.uniform(0.0, interval_s), fire)

    def run(self) -> SimResult:
        for _ in range(self.config.events_max):
            if not self._queue or self._queue[0][0] > self._end_s:
                break
            self.now, _, fn = heapq.heappop(self._queue)
            fn()
        else:
            self.fail("event budget", f"more than {self.config.events_max} events")
        self.now = self._end_s
        self._check_end()
        return SimResult(self.seed, self._trace.hexdigest(), dict(sorted(self.stats.items())),
                         self._end_s)

    def trace(self, *fields: object) -> None:
        self._trace.update(f"{self.now:.6f} {' '.join(map(str, fields))}\n".encode())

    def fail(self, invariant: str, detail: str) -> NoReturn:
        raise SimFailure(f"seed={self.seed} t={self.now:.3f}s {invariant}: {detail}\n"
                         f"{self.replay}")

    # ---- network ---------------------------------------------------------------------

    def node_at(self, address: str) -> str:
        """The node listening at ``address``; an address nobody listens at (a forged
        one) names itself, and whatever is sent there is lost."""
        return self._by_address.get(address, address)

    def call(self, proc: Process, dst: str, request: Request, on_reply: OnReply | None = None,
             on_timeout: OnTimeout | None = None) -> None:
        """A unary call: the request, then at most one reply; silence ends in a timeout."""
        ticket = next(self._tickets)
        if on_reply is not None or on_timeout is not None:
            self._calls[ticket] = _Call(proc, on_reply, on_timeout)
            self.after(self.config.timing.rpc_timeout_s, partial(self._expire, ticket))
        src = proc.node_id
        self._transmit(src, dst, request, partial(self._serve, src, dst, request, ticket))

    def latency_s(self, src: str, dst: str, message: Request | Reply) -> float:
        """How long ``message`` takes; a scripted test may make some slower."""
        delay_s = self._net_rng.uniform(DELAY_MIN_S, DELAY_MAX_S)
        return delay_s + self._slow_s.get(src, 0.0) + self._slow_s.get(dst, 0.0)

    def _transmit(self, src: str, dst: str, message: Request | Reply,
                  deliver: Callable[[], None]) -> None:
        self.sent_messages[src] += 1
        self.sent_bytes[src] += approx_size(message)
        self.sent_kinds[type(message).__name__] += 1
        if dst not in self.slots or self._cut(src, dst) or self._net_rng.random() < self._loss:
            self.stats["dropped"] += 1
            return
        self.after(self.latency_s(src, dst, message), partial(self._arrive, src, dst, deliver))

    def _arrive(self, src: str, dst: str, deliver: Callable[[], None]) -> None:
        if self._cut(src, dst) or not self.slots[dst].up:
            self.stats["dropped"] += 1
            return
        self.stats["delivered"] += 1
        deliver()

    def _serve(self, src: str, dst: str, request: Request, ticket: int) -> None:
        proc = self.slots[dst].proc
        assert proc is not None
        self.trace("serve", src, dst, type(request).__name__)
        reply = proc.serve(request)
        if ticket in self._calls:  # the caller waits for an answer
            self._transmit(dst, src, reply, partial(self._answer, ticket, reply))

    def _answer(self, ticket: int, reply: Reply) -> None:
        call = self._calls.pop(ticket, None)
        if call is not None and call.proc.up and call.on_reply is not None:
            call.on_reply(reply)

    def _expire(self, ticket: int) -> None:
        call = self._calls.pop(ticket, None)
        if call is not None and call.proc.up and call.on_timeout is not None:
            call.on_timeout()

    def _cut(self, a: str, b: str) -> bool:
        groups = self._groups
        return groups is not None and groups[a] != groups[b]

    # ---- nodes -----------------------------------------------------------------------

    def _boot(self, slot: Slot) -> None:
        disk, site = slot.disk, slot.site
        disk.incarnation += 1  # persisted, so this run's records beat the last one's
        slot.boots += 1
        me = Member(NodeId(site.node_id), site.site, site.lat, site.lon, site.address,
                    slot.capacity_bytes, 0, slot.capacity_bytes, disk.incarnation, 0)
        seeds = sorted(s.site.address for s in self.slots.values() if s is not slot)
        slot.proc = Process(self, me, disk, seeds, self.settings, self.config.timing,
                            f"{self.seed}/{site.node_id}/{slot.boots}")
        slot.proc.start()
        self.trace("boot", site.node_id, disk.incarnation)

    def crash(self, node_id: str, clean: bool) -> None:
        slot = self.slots[node_id]
        if slot.proc is None or not slot.up:
            return
        if clean:
            slot.proc.leave()
        slot.proc.up = False
        self.stats["crashes"] += 1
        self.trace("crash", node_id, clean)

    def restart(self, node_id: str) -> None:
        slot = self.slots[node_id]
        if not slot.up and not slot.lost:
            self._boot(slot)
            self.stats["restarts"] += 1

    def trimming(self, proc: Process, study_uid: str, mids: Sequence[bytes]) -> None:
        """Invariant 2, checked against the truth before the node drops anything."""
        self.trace("trim", proc.node_id, study_uid, len(mids))
        for mid in mids:
            others = [n for n, s in self.slots.items()
                      if n != proc.node_id and not s.lost and mid in s.disk.held]
            safe = self.safe_copies(others)
            if safe < COPIES:
                self.fail("invariant 2 (a trim left fewer than N safe copies)",
                          f"{proc.node_id} trimmed study {study_uid}; manifest {mid.hex()[:12]} "
                          f"is left on {others or 'no node'} ({safe} safe copies < {COPIES})")
        self.after(0.0, partial(self._check_held, list(mids)))

    def safe_copies(self, node_ids: Iterable[str]) -> int:
        sites = [self.slots[n].site for n in node_ids]
        return max_pairwise_set_size([(s.site, s.lat, s.lon) for s in sites], MIN_DISTANCE_MILES)

    def _check_held(self, mids: Iterable[bytes]) -> None:
        """Invariant 1 for these manifests."""
        for mid in mids:
            if mid in self.acked and not self._holders(mid, live_only=False):
                m = self.acked[mid]
                self.fail("invariant 1 (an acknowledged instance was lost)",
                          f"manifest {mid.hex()[:12]} of study {m.study_uid} (ingested at "
                          f"{m.origin}) is held by no node whose disk exists")

    def _holders(self, mid: bytes, live_only: bool) -> list[str]:
        return [n for n, s in self.slots.items()
                if not s.lost and (s.up or not live_only) and mid in s.disk.held]

    # ---- the plan of the run ---------------------------------------------------------

    def _plan(self, rng: random.Random) -> None:
        fault_s = self.config.fault_phase_s
        self._plan_ingests(rng, fault_s)
        self._plan_crashes(rng, fault_s)
        self._plan_partitions(rng, fault_s)
        self._plan_loss(rng, fault_s)
        self._plan_slow(rng, fault_s)
        if rng.random() < self.config.disk_loss_probability:
            replaced = rng.random() < DISK_REPLACED_PROBABILITY
            when = rng.uniform(0.25 * fault_s, 0.75 * fault_s)
            self.at(when, partial(self._lose_disk, replaced, rng.uniform(*DOWNTIME_LONG_S)))
        self.at(fault_s, self._heal)

    def _plan_ingests(self, rng: random.Random, fault_s: float) -> None:
        ids = sorted(self.slots)
        for i in range(rng.randint(*self.config.studies)):
            study = f"1.2.826.0.1.3680043.10.543.{self.seed}.{i}"
            home, t = rng.choice(ids), rng.uniform(0.0, 0.9 * fault_s)
            for k in range(rng.randint(*self.config.instances)):
                target = home
                t += rng.uniform(*INSTANCE_GAP_S)
                if rng.random() < INSTANCE_ELSEWHERE_PROBABILITY:
                    target = rng.choice(ids)
                    t += rng.uniform(0.0, 0.1 * fault_s)
                self.at(min(t, fault_s), partial(self.ingest, study, k, target))

    def _plan_crashes(self, rng: random.Random, fault_s: float) -> None:
        ids = sorted(self.slots)
        for _ in range(rng.randint(*self.config.crashes)):
            node_id, when = rng.choice(ids), rng.uniform(0.0, fault_s)
            downtime = rng.choice((DOWNTIME_SHORT_S, DOWNTIME_LONG_S))
            self.at(when, partial(self.crash, node_id, rng.random() < CLEAN_LEAVE_PROBABILITY))
            self.at(when + rng.uniform(*downtime), partial(self.restart, node_id))

    def _plan_partitions(self, rng: random.Random, fault_s: float) -> None:
        ids = sorted(self.slots)
        for episode in range(rng.randint(*self.config.partitions)):
            cut = rng.randint(1, len(ids) - 1)  # often one site alone, sometimes halves
            shuffled = rng.sample(ids, len(ids))
            groups = {n: int(i < cut) for i, n in enumerate(shuffled)}
            when = rng.uniform(0.0, fault_s)
            self.at(when, partial(self._partition, groups, episode))
            self.at(when + rng.uniform(*PARTITION_S), partial(self._unpartition, episode))

    def _plan_loss(self, rng: random.Random, fault_s: float) -> None:
        self._loss_base = self._loss = rng.uniform(0.0, self.config.loss_base_max)
        for episode in range(rng.randint(*self.config.loss_bursts)):
            when = rng.uniform(0.0, fault_s)
            self.at(when, partial(self._loss_burst, rng.uniform(*LOSS_BURST), episode))
            self.at(when + rng.uniform(*LOSS_BURST_S), partial(self._loss_calm, episode))

    def _plan_slow(self, rng: random.Random, fault_s: float) -> None:
        ids = sorted(self.slots)
        for _ in range(rng.randint(*self.config.slow_nodes)):
            node_id, when = rng.choice(ids), rng.uniform(0.0, fault_s)
            self.at(when, partial(self.slow, node_id, rng.uniform(*SLOW_EXTRA_S)))
            self.at(when + rng.uniform(*SLOW_S), partial(self.slow, node_id, 0.0))

    # ---- faults ----------------------------------------------------------------------

    def _partition(self, groups: dict[str, int], episode: int) -> None:
        if not self._healed:
            self._groups, self._partition_episode = groups, episode
            self.stats["partitions"] += 1
            self.trace("partition", sorted(groups.items()))

    def _unpartition(self, episode: int) -> None:
        if self._partition_episode == episode:
            self._groups = None
            self.trace("unpartition", episode)

    def split(self, *groups: Sequence[str]) -> None:
        """A scripted partition between ``groups``, until `mend`."""
        self._partition({n: i for i, group in enumerate(groups) for n in group}, episode=-2)

    def mend(self) -> None:
        self._unpartition(episode=-2)

    def _loss_burst(self, loss: float, episode: int) -> None:
        if not self._healed:
            self._loss, self._loss_episode = loss, episode

    def slow(self, node_id: str, extra_s: float) -> None:
        """Every message to or from ``node_id`` takes ``extra_s`` longer (0: normal)."""
        if extra_s > 0.0 and not self._healed:
            self._slow_s[node_id] = extra_s
            self.stats["slow_links"] += 1
        else:
            self._slow_s.pop(node_id, None)
        self.trace("slow", node_id, extra_s)

    def _loss_calm(self, episode: int) -> None:
        if self._loss_episode == episode:
            self._loss = self._loss_base

    def _heal(self) -> None:
        """The end of the faults: every disk that exists comes back, the network is whole."""
        self._healed = True
        self._groups, self._loss, self._loss_base = None, 0.0, 0.0
        self._slow_s.clear()
        for node_id in sorted(self.slots):
            self.restart(node_id)
        self.trace("heal")
        self.after(CONVERGENCE_PROBE_S, self._probe_convergence)

    def _probe_convergence(self) -> None:
        if self._view_problems() or self._unsafe_studies():
            self.after(CONVERGENCE_PROBE_S, self._probe_convergence)
            return
        self.stats["converged_after_s"] = round(self.now - self.config.fault_phase_s)
        self._end_s = min(self._end_s, self.now + SETTLE_S)

    def ingest(self, study: str, index: int, target: str) -> None:
        """A modality stores instance ``index`` of ``study`` at ``target`` (or, if
        that site is down, at another one that answers)."""
        up = [n for n in sorted(self.slots) if self.slots[n].up]
        if not up:
            self.after(INGEST_RETRY_S, partial(self.ingest, study, index, target))
            return
        if target not in up:  # the modality sends to a site that answers
            target = self._fault_rng.choice(up)
        mid = hashlib.blake2b(f"{study}/{index}".encode(), digest_size=16).digest()
        m = SimManifest(mid, study, target, partition_of(study, PARTITIONS))
        self.acked[mid] = m
        proc = self.slots[target].proc
        assert proc is not None
        proc.ingest(m)
        self.stats["ingested"] += 1
        self.trace("ingest", target, study, index)

    def _lose_disk(self, replaced: bool, downtime_s: float) -> None:
        """A disk dies for good. Only when nothing would be lost by it alone and
        no trim is in flight: a double fault proves nothing about the protocol."""
        victim = self._disk_loss_victim()
        if victim is None:
            if self.now + DISK_LOSS_RETRY_S < self.config.fault_phase_s:
                self.after(DISK_LOSS_RETRY_S, partial(self._lose_disk, replaced, downtime_s))
            return
        self.crash(victim, clean=False)
        slot = self.slots[victim]
        slot.disk = Disk(PARTITIONS)  # the incarnation counter went with it
        if replaced:
            self.after(downtime_s, partial(self.restart, victim))
        else:
            slot.lost = True
        self.stats["disk_losses"] += 1
        self.trace("disk lost", victim, replaced)
        self._check_held(list(self.acked))

    def _disk_loss_victim(self) -> str | None:
        if any(s.proc is not None and s.up and s.proc.trimming for s in self.slots.values()):
            return None
        existing = [n for n in sorted(self.slots) if not self.slots[n].lost]
        candidates = []
        for n in existing:
            rest = [o for o in existing if o != n]
            if self.safe_copies(rest) < COPIES:
                continue  # geography must still allow N copies after the loss
            held = self.slots[n].disk.held
            if all(any(mid in self.slots[o].disk.held for o in rest) for mid in held):
                candidates.append(n)
        return self._fault_rng.choice(candidates) if candidates else None

    # ---- the end state -----------------------------------------------------------------

    def _check_end(self) -> None:
        self._check_held(list(self.acked))
        problems = self._view_problems() + self._unsafe_studies()
        if problems:
            shown = problems[:PROBLEMS_SHOWN_MAX]
            more = len(problems) - len(shown)
            detail = "\n  ".join([*shown, *([f"... and {more} more"] if more else [])])
            self.fail(f"after {self.config.heal_s:g} s of healing", "\n  " + detail)

    def _view_problems(self) -> list[str]:
        """Invariant 4: one view of the members and of the manifests."""
        problems = []
        acked = set(self.acked)
        for node_id, slot in sorted(self.slots.items()):
            if slot.proc is None or not slot.up:
                continue
            for other, other_slot in sorted(self.slots.items()):
                record = slot.proc.membership.get(other)
                state = None if record is None else record.state
                # A lost node may be forgotten: member tables are not kept across
                # restarts, and every node that knew it may have restarted since.
                expected = ((MemberState.ALIVE,) if other_slot.up
                            else (MemberState.DEAD, MemberState.LEFT, None))
                if state not in expected:
                    problems.append(f"invariant 4: {node_id} sees {other} as {state}, "
                                    f"expected {' or '.join(map(str, expected))}")
            unknown = len(acked - slot.disk.manifests.keys())
            if unknown:
                problems.append(f"invariant 4: {node_id} does not know {unknown} manifests")
        return problems

    def _unsafe_studies(self) -> list[str]:
        """Invariant 3: every study held in full by N live, distant nodes."""
        by_study: dict[str, list[bytes]] = {}
        for mid, m in self.acked.items():
            by_study.setdefault(m.study_uid, []).append(mid)
        problems = []
        for study, mids in sorted(by_study.items()):
            full = [n for n, s in sorted(self.slots.items())
                    if s.up and all(mid in s.disk.held for mid in mids)]
            safe = self.safe_copies(full)
            if safe < COPIES:
                problems.append(f"invariant 3: study {study} ({len(mids)} instances) is held in "
                                f"full by {full} only: {safe} safe copies < {COPIES}")
        return problems


def pick_sites(rng: random.Random, nodes: tuple[int, int]) -> list[Site]:
    """Some of SITES where N copies fit even after any one disk is lost."""
    for _ in range(100):
        chosen = sorted(rng.sample(SITES, rng.randint(*nodes)), key=lambda s: s.node_id)
        if all(_fits([s for s in chosen if s is not gone]) for gone in chosen):
            return chosen
    raise AssertionError("no site mix allows N copies")


def _fits(sites: Sequence[Site]) -> bool:
    positions = [(s.site, s.lat, s.lon) for s in sites]
    return max_pairwise_set_size(positions, MIN_DISTANCE_MILES) >= COPIES
