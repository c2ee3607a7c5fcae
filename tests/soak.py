"""Fault injection on real node processes, with a checker of every acknowledged instance.

Five sites at real US cities (every pair >= 250 miles apart, so any three make a
safe set and one or two may be down), each a real `pacsmesh node` process whose
peer traffic crosses tests/faultproxy.py. While a traffic thread puts small CT
studies at random live nodes and records every instance a node acknowledged,
faults are injected:

    kill       SIGKILL, restart after a random time (often past dead_after_s)
    stop       SIGSTOP longer than dead_after_s, then SIGCONT
    partition  the sites cut into two groups (black hole or resets), then healed
    slow       links with added delay and a byte-rate throttle
    lossy      links whose connections are reset at random
    diskfull   one node's data dir sits on its own tmpfs; a ballast file leaves it
               with less than the node's 64 MiB reserve, or nearly nothing
    flip       bytes flipped in a node's packs while it runs (only in data that was
               held in full at >= 3 sites when the pack length was sampled, so a
               flip never hits a sole copy; the scrubber must find and repair it)
    wipe       a node killed, its data dir deleted, restarted empty with the same id
               (only when every acknowledged study is held in full by another node: new
               puts avoid it meanwhile; a sole copy lost with its disk is no bug)
    clock      a node's wall clock jumped ahead (< max_clock_ahead_s) or back
               (tests/faultclock.py; monotonic clocks untouched)

At the end every fault is healed, the cluster is given a bounded time to converge,
every node scrubs a full pass, and then: every acknowledged instance is restored
(`GetStudy`, from a random node) and compared byte for byte with the file that was
put ("lost" otherwise), and every study with an acknowledged instance must be safe
both by `locate` and by ground truth (>= 3 nodes hold every acknowledged instance
of it in full, by their own `ls --local`) ("unsafe" otherwise).

    python -m tests.soak --minutes 30 [--seed N] [--record]     (./dev soak)

Every run prints its seed; `--seed` replays the same fault sequence (timings of
real processes differ from run to run, so a replay is close, not exact).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pydicom

from pacsmesh.cli import CHANNEL_OPTIONS
from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.restore import get_study
from pacsmesh.sample import StudySpec, study_uid, write_study
from pacsmesh.upload import Outcome, Uploader
from tests import faultclock
from tests.clusterproc import CITIES, Cluster
from tests.faultproxy import FaultProxy, LinkFault
from tests.nodeproc import NodeProc

SITES = [("boston", "Boston"), ("chicago", "Chicago"), ("denver", "Denver"),
         ("seattle", "Seattle"), ("atlanta", "Atlanta")]
KINDS = ("kill", "stop", "partition", "slow", "lossy", "diskfull", "flip", "wipe", "clock")
DISK_NODE = "atlanta"  # the node whose data dir is on its own small filesystem
API_TIMEOUT_S = 5.0
PUT_TIMEOUT_S = 20.0
GET_TIMEOUT_S = 60.0
RESERVE_BYTES = 64 << 20  # node/store.py FREE_RESERVE_BYTES: below this free, ingest refuses


@dataclass(frozen=True)
class Profile:
    name: str
    duration_s: float
    put_gap_s: float  # mean time between two puts
    instances: int  # per study
    dead_after_s: float
    converge_s: float  # at most, after healing, for every study to be safe
    script: tuple[tuple[float, str], ...] = ()  # (at second, kind): fixed, else random
    fault_gap_s: float = 4.0  # mean gap between random faults
    scrub_interval_s: float = 5.0
    disk_mb: int = 512
    # after the final pass, how long an unrepairable chunk may take to be repaired (the
    # scrubber retries every REPAIR_RETRY_S = 60 s); 0: report without waiting
    unrepairable_wait_s: float = 0.0


SHORT = Profile(
    name="short", duration_s=34.0, put_gap_s=0.5, instances=3, dead_after_s=3.0,
    # 40 s was not enough once in a full CI run on a loaded machine (3 studies at 2 sites
    # 40 s after healing; the seed's replay converged): a stall would still fail at 90 s
    converge_s=90.0,
    # one of each kind, overlapping, in a fixed order that finishes before the end; the
    # wipe first, as it needs a moment with no other node fault (it is retried until then)
    script=((0.0, "wipe"), (1.0, "slow"), (2.0, "kill"), (4.0, "clock"), (6.0, "flip"),
            (8.0, "partition"), (10.0, "diskfull"), (14.0, "stop"), (16.0, "lossy"),
            (24.0, "partition"), (26.0, "clock"), (28.0, "flip")),
)


def long_profile(minutes: float) -> Profile:
    return Profile(name="soak", duration_s=minutes * 60, put_gap_s=0.7, instances=3,
                   dead_after_s=4.0, converge_s=240.0, fault_gap_s=4.0,
                   scrub_interval_s=20.0, disk_mb=1024, unrepairable_wait_s=100.0)


@dataclass
class Instance:
    path: Path
    sop: str
    sha256: bytes


@dataclass
class StudyRecord:
    uid: str
    instances: dict[str, Instance]  # sop -> instance
    acked: set[str] = field(default_factory=set)  # sops a node acknowledged
    node: str = ""
    acked_at: float = 0.0


@dataclass
class Report:
    seed: int
    profile: str
    duration_s: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # a fault not possible right then
    puts: int = 0
    studies_acked: int = 0
    acknowledged: int = 0
    refused: int = 0  # instances a node did not acknowledge (down, full, stopped...)
    lost: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    converge_s: float = 0.0
    scrub_corrupt: int = 0
    scrub_repaired: int = 0
    unrepairable: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # a node that exited on its own
    tracebacks: Counter[str] = field(default_factory=Counter)  # in node logs, by last line
    damage_logged: int = 0  # chunks the nodes logged as damaged (scrub, or a peer's read)
    repair_logged: int = 0  # chunks the scrubber logged as repaired from a peer
    proxy: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # the fault sequence, with times

    @property
    def ok(self) -> bool:
        return (not self.lost and not self.unsafe and not self.crashes
                and self.acknowledged > 0)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {self.faults[k]}" for k in KINDS if self.faults[k])
        lines = [
            f"seed {self.seed} ({self.profile} profile), {self.duration_s:.0f} s",
            f"faults injected: {sum(self.faults.values())} ({kinds})",
            f"instances acknowledged: {self.acknowledged} in {self.studies_acked} studies "
            f"({self.puts} puts; {self.refused} instances not acknowledged)",
            f"lost: {len(self.lost)}",
            f"unsafe at the end: {len(self.unsafe)}",
            f"node crashes: {len(self.crashes)}",
            f"converged {self.converge_s:.1f} s after healing; scrub found "
            f"{self.scrub_corrupt} corrupt chunks, repaired {self.scrub_repaired}, "
            f"unrepairable {len(self.unrepairable)} (over the whole run, by the node logs: "
            f"{self.damage_logged} damaged, {self.repair_logged} repaired from a peer)",
        ]
        if self.tracebacks:
            lines.append(f"tracebacks in node logs: {sum(self.tracebacks.values())}")
            lines.extend(f"  {n} x {msg}" for msg, n in self.tracebacks.most_common(8))
        if self.skipped:
            lines.append("faults skipped when not possible: "
                         + ", ".join(f"{k} {n}" for k, n in sorted(self.skipped.items())))
        for what in (self.lost[:10], self.unsafe[:10], self.unrepairable[:10],
                     self.crashes[:10]):
            lines.extend(f"  {x}" for x in what)
        return "\n".join(lines)


class AckRecorder(Uploader):
    """The real client: records each file a node acknowledged (stored or duplicate)."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.acked: list[Path] = []

    def _account_locked(self, res: node_pb2.IngestResult, path: Path) -> None:
        super()._account_locked(res, path)
        if res.outcome in (Outcome.STORED, Outcome.DUPLICATE):
            self.acked.append(path)


def _stub(address: str) -> tuple[grpc.Channel, node_pb2_grpc.NodeApiStub]:
    ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return ch, node_pb2_grpc.NodeApiStub(ch)


def _distance_ok(ids: set[str], miles: float = 250.0) -> bool:
    from pacsmesh.cluster.placement import great_circle_miles
    where = {n: CITIES[c] for n, c in SITES}
    return all(great_circle_miles(*where[a], *where[b]) >= miles
               for a in ids for b in ids if a < b)


def _stable_ports(n: int) -> list[int]:
    """Free ports below the kernel's ephemeral range, so that while a node is down no
    outgoing connection can take its port and make its restart fail to bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not the run's seed: parallel runs must not collide
    out: list[int] = []
    while len(out) < n:
        port = rng.randrange(max(1024, low - 12000), low)
        if port in out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
    return out


class Soak:
    def __init__(self, workdir: Path, seed: int, profile: Profile,
                 say: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.seed = seed
        self.profile = profile
        self.say_ = say
        self.rng = random.Random(seed)  # faults
        self.traffic_rng = random.Random(seed + 1)
        self.mid_put_rng = random.Random(seed + 3)
        self.report = Report(seed, profile.name)
        self.proxy = FaultProxy(seed + 2)
        self.cluster = Cluster(workdir / "c")
        self.nodes: dict[str, NodeProc] = {}
        self.studies: dict[str, StudyRecord] = {}
        self.lock = threading.RLock()
        self.state: dict[str, str] = {}  # node -> up | killed | stopped
        self.busy: dict[str, str] = {}  # node -> the node fault it is under
        self.undo: list[tuple[float, str, Callable[[], None]]] = []  # (when, kind, heal)
        self.partitioned = False
        self.links_faulted: set[str] = set()  # "slow", "lossy" while active
        self.clocks: dict[str, faultclock.Clock] = {}
        self.clock_lib = faultclock.shim()
        self.disk: Path | None = None
        self.flip_region: dict[str, tuple[int, dict[str, int]]] = {}  # node -> (pid, sizes)
        self.started = 0.0
        self.stop_traffic = threading.Event()
        self.study_no = 0
        self.inflight: dict[str, str] = {}  # study -> the node a put of it is going to
        self.draining: set[str] = set()  # nodes no new put may go to (about to be wiped)

    # ---- output ------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        at = time.monotonic() - self.started if self.started else 0.0
        line = f"[{at:7.1f}s] {msg}"
        self.report.log.append(line)
        self.say_(line)

    # ---- the cluster ---------------------------------------------------------------------

    def _mount_disk(self) -> Path | None:
        """A tmpfs for DISK_NODE's data dir (root only; elsewhere diskfull is skipped)."""
        if os.geteuid() != 0 or not shutil.which("mount"):
            return None
        mnt = self.workdir / f"{DISK_NODE}-disk"
        mnt.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.profile.disk_mb}m",
                              "tmpfs", str(mnt)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            self.say(f"no tmpfs for {DISK_NODE} ({res.stderr.strip()}): diskfull skipped")
            return None
        return mnt

    def data_dir(self, name: str) -> Path:
        if name == DISK_NODE and self.disk is not None:
            return self.disk / "data"
        return self.nodes[name].data_dir

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disk = self._mount_disk()
        seeds: list[str] = []
        ports = _stable_ports(len(SITES))
        for (name, city), node_port in zip(SITES, ports, strict=True):
            node = self.cluster.add(
                name, city, seeds=list(seeds), dead_after_s=self.profile.dead_after_s,
                proof_audit_interval_s=5.0, repair_stalled_after_s=60.0)
            node.port = node_port
            port = self.proxy.add_node(name, node.port)
            node.extra["node"] = {"advertise": self.proxy.address(name)}
            node.extra["scrub"] = {"rate_mb_s": 20.0, "interval_s": self.profile.scrub_interval_s}
            if name == DISK_NODE and self.disk is not None:
                node.extra["node"]["data_dir"] = str(self.disk / "data")
            if self.clock_lib is not None:
                clock = faultclock.Clock(self.workdir / f"{name}.clock")
                self.clocks[name] = clock
                node.env.update(clock.env(self.clock_lib))
            node.env["PACSMESH_LOG"] = "INFO"
            self.nodes[name] = node
            if not seeds:
                seeds.append(f"127.0.0.1:{port}")
        self.started = time.monotonic()
        for name, node in self.nodes.items():
            node.start(wait=False)
            self._started(name)
        for node in self.nodes.values():
            node.wait_ready()
        self.cluster.wait_converged(30)
        self.say(f"5 sites up: {', '.join(f'{n}={self.proxy.address(n)}' for n in self.nodes)}"
                 + ("" if self.clock_lib else "; no C compiler: clock faults skipped"))

    def _started(self, name: str) -> None:
        node = self.nodes[name]
        assert node.proc is not None
        self.proxy.set_pid(name, node.proc.pid)
        self.state[name] = "up"

    def close(self) -> None:
        self.stop_traffic.set()
        for name, node in self.nodes.items():
            if self.state.get(name) == "stopped" and node.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGCONT)
        self.cluster.stop()
        self.proxy.close()
        if self.disk is not None:
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True, check=False)

    def up(self) -> list[str]:
        return [n for n, s in self.state.items() if s == "up"]

    # ---- traffic ---------------------------------------------------------------------------

    def _new_study(self) -> StudyRecord:
        self.study_no += 1
        spec = StudySpec(study_index=self.study_no, instances=self.profile.instances,
                         rows=128, columns=128, seed=self.seed % 1_000_000 + 1)
        folder = self.workdir / "in" / f"study-{self.study_no}"
        paths = write_study(folder, spec)
        instances = {}
        for p in paths:
            sop = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            instances[sop] = Instance(p, sop, hashlib.sha256(p.read_bytes()).digest())
        return StudyRecord(study_uid(spec), instances)

    def put_once(self) -> None:
        with self.lock:
            candidates = [n for n in self.up() if n not in self.draining]
            if not candidates:
                return
            name = self.traffic_rng.choice(sorted(candidates))
            rec = self._new_study()
            self.inflight[rec.uid] = name
        by_path = {i.path: i.sop for i in rec.instances.values()}
        ch = grpc.insecure_channel(self.nodes[name].address, options=CHANNEL_OPTIONS)
        up = AckRecorder(ch)
        timer = threading.Timer(PUT_TIMEOUT_S, ch.close)  # a stopped node: give up
        timer.start()
        try:
            up.put(sorted(by_path))
        except Exception as exc:
            self.say(f"put at {name} failed: {exc!r}")
        finally:
            timer.cancel()
            ch.close()
        rec.acked = {by_path[p] for p in up.acked if p in by_path}
        rec.node, rec.acked_at = name, time.monotonic()
        with self.lock:
            del self.inflight[rec.uid]
            self.report.puts += 1
            self.report.refused += len(rec.instances) - len(rec.acked)
            if rec.acked:
                self.studies[rec.uid] = rec

    def traffic(self) -> None:
        while not self.stop_traffic.is_set():
            try:
                self.put_once()
            except Exception as exc:
                self.say(f"traffic: {exc!r}")
            self.stop_traffic.wait(self.traffic_rng.expovariate(1 / self.profile.put_gap_s))

    # ---- ground truth ----------------------------------------------------------------------

    def local_counts(self, name: str) -> dict[str, int]:
        """study -> instances this node holds in full, by its own word (`ls --local`)."""
        out: dict[str, int] = {}
        ch, stub = _stub(self.nodes[name].address)
        with ch:
            after = ""
            while True:
                reply = stub.ListStudies(node_pb2.ListStudiesRequest(
                    local=True, after=after, limit=1000), timeout=API_TIMEOUT_S)
                for st in reply.studies:
                    out[st.study_uid] = st.instances
                after = reply.next
                if not after:
                    return out

    def holders(self, names: list[str]) -> dict[str, set[str]]:
        """acked study -> the nodes (of ``names``) holding every acknowledged instance."""
        with self.lock:
            need = {uid: len(r.acked) for uid, r in self.studies.items()}
        out: dict[str, set[str]] = {uid: set() for uid in need}
        for name in names:
            counts = self.local_counts(name)
            for uid, n in need.items():
                if counts.get(uid, 0) >= n:
                    out[uid].add(name)
        return out

    # ---- faults ----------------------------------------------------------------------------

    def _node_victim(self, allow_busy_down: int = 2) -> str | None:
        """A node under no other node fault, keeping at most two nodes down at once."""
        with self.lock:
            down = sum(1 for s in self.state.values() if s != "up")
            free = [n for n in self.nodes if n not in self.busy and self.state[n] == "up"]
        if not free or down >= allow_busy_down:
            return None
        return self.rng.choice(sorted(free))

    def _later(self, after_s: float, kind: str, heal: Callable[[], None]) -> None:
        self.undo.append((time.monotonic() + after_s, kind, heal))

    def inject(self, kind: str, count_skip: bool = True) -> bool:
        fn = getattr(self, f"fault_{kind}")
        done = bool(fn())
        if done:
            self.report.faults[kind] += 1
        elif count_skip:
            self.report.skipped[kind] += 1
        return done

    def fault_kill(self) -> bool:
        victim = self._node_victim()
        if victim is None:
            return False
        with self.lock:  # half the time, a node a put is streaming to right now
            putting = sorted({n for n in self.inflight.values() if n not in self.busy
                              and self.state.get(n) == "up"})
        # (its own generator: whether a put is under way depends on timing, and the main
        # sequence of fault choices must not)
        mid_put = bool(putting) and self.mid_put_rng.random() < 0.5
        if mid_put:
            victim = self.mid_put_rng.choice(putting)
        d = self.profile.dead_after_s
        down_s = self.rng.choice([self.rng.uniform(0.2, d / 2), self.rng.uniform(d + 1, 2 * d + 3)])
        self.busy[victim] = "kill"
        self.nodes[victim].kill()
        self.flip_region.pop(victim, None)
        self.state[victim] = "killed"
        self.say(f"kill -9 {victim}{' during a put to it' if mid_put else ''}; "
                 f"restart in {down_s:.1f} s")

        def restart() -> None:
            self.nodes[victim].start(wait=False)
            self._started(victim)
            del self.busy[victim]
            self.say(f"restarted {victim}")
        self._later(down_s, "kill", restart)
        return True

    def fault_stop(self) -> bool:
        victim = self._node_victim()
        if victim is None:
            return False
        d = self.profile.dead_after_s
        stop_s = self.rng.uniform(d + 1, 2 * d + 2)
        proc = self.nodes[victim].proc
        assert proc is not None
        self.busy[victim] = "stop"
        proc.send_signal(signal.SIGSTOP)
        self.state[victim] = "stopped"
        self.say(f"SIGSTOP {victim} for {stop_s:.1f} s (dead_after_s {d:g})")

        def cont() -> None:
            proc.send_signal(signal.SIGCONT)
            self.state[victim] = "up"
            del self.busy[victim]
            self.say(f"SIGCONT {victim}")
        self._later(stop_s, "stop", cont)
        return True

    def fault_partition(self) -> bool:
        if self.partitioned:
            return False
        names = sorted(self.nodes)
        self.rng.shuffle(names)
        cut = self.rng.randint(1, 2)
        groups = [names[:cut], names[cut:]]
        mode = self.rng.choice(["blackhole", "reset"])
        span = self.rng.uniform(2.0, 3 * self.profile.dead_after_s)
        self.proxy.partition(groups, mode)
        self.partitioned = True
        self.say(f"partition {groups[0]} | {groups[1]} ({mode}) for {span:.1f} s")

        def heal() -> None:
            self.proxy.heal_partition()
            self.partitioned = False
            self.say("partition healed")
        self._later(span, "partition", heal)
        return True

    def _links(self, kind: str, make: Callable[[], LinkFault]) -> bool:
        if kind in self.links_faulted or self.links_faulted:
            return False  # one link fault set at a time (shape() replaces per link)
        names = sorted(self.nodes)
        pairs = {tuple(sorted(self.rng.sample(names, 2))) for _ in range(self.rng.randint(1, 3))}
        span = self.rng.uniform(4.0, 15.0)
        desc = []
        for a, b in sorted(pairs):
            fault = make()
            self.proxy.shape(a, b, fault)
            self.proxy.shape(b, a, fault)
            desc.append(f"{a}<->{b} {fault}")
        self.links_faulted.add(kind)
        self.say(f"{kind} links for {span:.1f} s: {'; '.join(desc)}")

        def heal() -> None:
            self.proxy.clear_links()
            self.links_faulted.discard(kind)
            self.say(f"{kind} links healed")
        self._later(span, kind, heal)
        return True

    def fault_slow(self) -> bool:
        return self._links("slow", lambda: LinkFault(
            delay_s=round(self.rng.uniform(0.02, 0.3), 3),
            rate_bytes_s=float(self.rng.choice([64_000, 256_000, 1_000_000]))))

    def fault_lossy(self) -> bool:
        return self._links("lossy", lambda: LinkFault(
            delay_s=round(self.rng.uniform(0.0, 0.05), 3),
            resets_per_s=round(self.rng.uniform(0.3, 2.0), 2)))

    def fault_diskfull(self) -> bool:
        if self.disk is None or DISK_NODE in self.busy or self.state[DISK_NODE] != "up":
            return False
        leave = self.rng.choice([1 << 20, RESERVE_BYTES // 2])
        free = shutil.disk_usage(self.disk).free
        ballast = self.disk / "ballast"
        size = max(0, free - leave)
        with open(ballast, "wb") as f, contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, size)
        span = self.rng.uniform(4.0, 15.0)
        self.busy[DISK_NODE] = "diskfull"
        self.say(f"disk full at {DISK_NODE}: {shutil.disk_usage(self.disk).free >> 20} MiB "
                 f"free for {span:.1f} s")

        def heal() -> None:
            ballast.unlink(missing_ok=True)
            del self.busy[DISK_NODE]
            self.say(f"disk of {DISK_NODE} freed")
        self._later(span, "diskfull", heal)
        return True

    def checkpoint_flips(self) -> None:
        """Sample pack lengths; once every study acknowledged before the sample is held in
        full at >= 3 nodes, bytes below those lengths may be flipped (no sole copies)."""
        with self.lock:
            before = set(self.studies)
            going = set(self.inflight)  # puts under way may have written below the sample
            live = {n: self.nodes[n].proc.pid for n in self.up()  # type: ignore[union-attr]
                    if n not in self.busy}
        sizes = {}
        for n in live:
            packs = self.data_dir(n) / "packs"
            with contextlib.suppress(OSError):
                sizes[n] = {p.name: p.stat().st_size for p in packs.iterdir()
                            if p.is_file() and p.stat().st_size > 0}
        try:
            held = self.holders(sorted(self.up()))
        except grpc.RpcError:
            return
        with self.lock:
            if going & set(self.inflight):
                return  # not finished yet: what they acknowledge is not known
            before |= going & set(self.studies)
        if all(len(held.get(uid, ())) >= 3 for uid in before):
            for n, s in sizes.items():
                proc = self.nodes[n].proc
                if proc is not None and proc.pid == live[n] and s:
                    self.flip_region[n] = (live[n], s)

    def fault_flip(self) -> bool:
        candidates = []
        for n, (pid, sizes) in self.flip_region.items():
            proc = self.nodes[n].proc
            if proc is not None and proc.pid == pid and proc.poll() is None and sizes:
                candidates.append(n)
        if not candidates:
            return False
        victim = self.rng.choice(sorted(candidates))
        sizes = self.flip_region[victim][1]
        flips = []
        for _ in range(self.rng.randint(1, 8)):
            pack = self.rng.choice(sorted(p for p, s in sizes.items() if s > 0))
            offset = self.rng.randrange(sizes[pack])
            bit = 1 << self.rng.randrange(8)
            path = self.data_dir(victim) / "packs" / pack
            try:
                with open(path, "r+b") as f:
                    f.seek(offset)
                    old = f.read(1)
                    if len(old) != 1:
                        continue
                    f.seek(offset)
                    f.write(bytes([old[0] ^ bit]))
            except OSError:
                continue
            flips.append(f"{pack}@{offset}^{bit:#04x}")
        if not flips:
            return False
        self.say(f"flipped bytes at {victim}: {', '.join(flips)}")
        return True

    def fault_wipe(self) -> bool:
        with self.lock:
            if self.busy or any(s != "up" for s in self.state.values()):
                return False  # alone: the other copies must all be reachable
        victim = self.rng.choice(sorted(self.nodes))
        others = [n for n in self.nodes if n != victim]
        # no put may be acknowledged by the victim between the check and the wipe
        with self.lock:
            self.draining.add(victim)
        short: list[str] = ["?"]
        deadline = time.monotonic() + PUT_TIMEOUT_S + 5
        while victim in self.inflight.values() and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 8.0  # for its last puts to reach another node
        while victim not in self.inflight.values() and time.monotonic() < deadline:
            try:
                held = self.holders(others)
            except grpc.RpcError:
                held = {"?": set()}
            short = [uid for uid, h in held.items() if not h]
            if not short:
                break
            time.sleep(0.3)
        if short or victim in self.inflight.values():
            with self.lock:
                self.draining.discard(victim)
            return False
        self.busy[victim] = "wipe"
        self.nodes[victim].kill()
        self.flip_region.pop(victim, None)
        self.state[victim] = "killed"
        data = self.data_dir(victim)
        shutil.rmtree(data, ignore_errors=True)
        self.say(f"wiped {victim} (every acknowledged study is held in full elsewhere); "
                 "rejoining empty")

        def restart() -> None:
            self.nodes[victim].start(wait=False)
            self._started(victim)
            del self.busy[victim]
            self.draining.discard(victim)
            self.say(f"restarted {victim} empty")
        self._later(self.rng.uniform(0.2, 2.0), "wipe", restart)
        return True

    def fault_clock(self) -> bool:
        if not self.clocks:
            return False
        victim = self._node_victim(allow_busy_down=5)
        if victim is None:
            return False
        # ahead by less than max_clock_ahead_s (300 s: further ahead, peers rightly make a
        # version wait for their clocks, see node/hlc.py), or behind by up to 15 minutes
        offset = self.rng.choice([self.rng.uniform(20, 240), -self.rng.uniform(20, 900)])
        span = self.rng.uniform(4.0, 20.0)
        self.busy[victim] = "clock"
        self.clocks[victim].set(offset)
        self.say(f"clock of {victim} jumped {offset:+.0f} s for {span:.1f} s")

        def heal() -> None:
            self.clocks[victim].set(0)
            del self.busy[victim]
            self.say(f"clock of {victim} back to true time")
        self._later(span, "clock", heal)
        return True

    def run_due_undos(self, force: bool = False) -> None:
        now = time.monotonic()
        due = [u for u in self.undo if force or u[0] <= now]
        self.undo = [u for u in self.undo if u not in due]
        for _, _, heal in sorted(due, key=lambda u: u[0]):
            with self.lock:
                heal()

    # ---- the run -----------------------------------------------------------------------

    def warm_up(self) -> None:
        for _ in range(3):
            self.put_once()
        self.wait_safe(self.profile.converge_s)
        self.checkpoint_flips()

    def drive(self) -> None:
        p = self.profile
        traffic = threading.Thread(target=self.traffic, name="traffic", daemon=True)
        traffic.start()
        t0 = time.monotonic()
        script = list(p.script)
        next_random = t0 + self.rng.expovariate(1 / p.fault_gap_s)
        next_checkpoint = t0 + 2.0
        next_progress = t0 + 60.0
        pending: list[str] = []  # scripted faults not possible yet: retried
        try:
            while time.monotonic() - t0 < p.duration_s:
                now = time.monotonic()
                self.run_due_undos()
                self._reap()
                if now >= next_progress:
                    with self.lock:
                        acked = sum(len(r.acked) for r in self.studies.values())
                    self.say(f"progress: {acked} instances acknowledged, "
                             f"{sum(self.report.faults.values())} faults "
                             f"({dict(self.report.faults)})")
                    next_progress = now + 60.0
                if now >= next_checkpoint:
                    self.checkpoint_flips()
                    next_checkpoint = time.monotonic() + 3.0
                if script:
                    while script and now - t0 >= script[0][0]:
                        pending.append(script.pop(0)[1])
                    for kind in list(pending):
                        if self.inject(kind, count_skip=False):  # else retried
                            pending.remove(kind)
                elif not p.script and now >= next_random:
                    self.inject(self.rng.choice(KINDS))
                    next_random = now + self.rng.expovariate(1 / p.fault_gap_s)
                time.sleep(0.1)
            for kind in pending:
                self.report.skipped[kind] += 1
                self.say(f"scripted {kind} never became possible")
        finally:
            self.stop_traffic.set()
            traffic.join(PUT_TIMEOUT_S + 10)

    def _reap(self) -> None:
        """A node that died on its own (not killed by us) is a crash: say so, restart it."""
        for name, node in self.nodes.items():
            if self.state.get(name) == "up" and node.proc is not None \
                    and node.proc.poll() is not None:
                self.say(f"CRASH: {name} exited with {node.proc.returncode} on its own; "
                         f"last log lines:\n{node.log()[-1500:]}")
                self.report.crashes.append(f"{name} exited with {node.proc.returncode}")
                node.start(wait=False)
                self._started(name)

    def heal_all(self) -> None:
        self.run_due_undos(force=True)
        self.proxy.heal_all()
        for name, clock in self.clocks.items():
            clock.set(0)
            self.busy.pop(name, None)
        for name, node in self.nodes.items():
            if node.proc is None or node.proc.poll() is not None:
                node.start(wait=False)
                self._started(name)
        for node in self.nodes.values():
            node.wait_ready()
        self.say("every fault healed")

    def unsafe_now(self) -> list[str]:
        """Studies not safe by `locate` at a random node, or not held in full at >= 3."""
        with self.lock:
            uids = sorted(self.studies)
        held = self.holders(sorted(self.nodes))
        asker = self.rng.choice(sorted(self.nodes))
        ch, stub = _stub(self.nodes[asker].address)
        bad = []
        with ch:
            for uid in uids:
                r = stub.Locate(node_pb2.LocateRequest(study_uid=uid), timeout=API_TIMEOUT_S)
                full = held.get(uid, set())
                if not r.safe or len(full) < 3 or not _distance_ok(full):
                    bad.append(f"{uid}: locate at {asker} safe={r.safe} "
                               f"({r.safe_copies} copies); held in full at {sorted(full)}")
        return bad

    def wait_safe(self, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        bad: list[str] = ["not checked"]
        while time.monotonic() < deadline:
            try:
                bad = self.unsafe_now()
            except grpc.RpcError as exc:
                bad = [f"rpc: {exc.code().name}"]
            if not bad:
                return []
            time.sleep(0.5)
        return bad

    def scrub_all(self, timeout_s: float) -> None:
        """A full scrub pass on every node, requested after healing; then re-converge."""
        requested = {}
        asked_at = time.monotonic()
        for name, node in self.nodes.items():
            ch, stub = _stub(node.address)
            with ch:
                requested[name] = stub.Scrub(node_pb2.ScrubRequest(now=True),
                                             timeout=API_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        done: set[str] = set()
        while len(done) < len(self.nodes) and time.monotonic() < deadline:
            for name, node in self.nodes.items():
                if name in done:
                    continue
                ch, stub = _stub(node.address)
                with ch:
                    r = stub.Scrub(node_pb2.ScrubRequest(), timeout=API_TIMEOUT_S)
                if not r.running and 0 <= r.last_pass_completed_age_s < (
                        time.monotonic() - asked_at) and r.chunks_verified > \
                        requested[name].chunks_verified:
                    done.add(name)
            time.sleep(0.3)
        if len(done) < len(self.nodes):
            self.say(f"scrub pass not finished in {timeout_s:g} s at "
                     f"{sorted(set(self.nodes) - done)}")
        until = time.monotonic() + self.profile.unrepairable_wait_s
        while True:
            replies = {}
            for name, node in self.nodes.items():
                ch, stub = _stub(node.address)
                with ch:
                    replies[name] = stub.Scrub(node_pb2.ScrubRequest(), timeout=API_TIMEOUT_S)
            left = [f"{n}: {u}" for n, r in replies.items() for u in r.unrepairable]
            if not left or time.monotonic() >= until:
                break
            time.sleep(2.0)
        self.report.scrub_corrupt = sum(r.corrupt_found for r in replies.values())
        self.report.scrub_repaired = sum(r.repaired for r in replies.values())
        self.report.unrepairable = left

    def verify(self) -> None:
        """Restore every study with an acknowledged instance from a random node."""
        out_root = self.workdir / "restored"
        for uid, rec in sorted(self.studies.items()):
            name = self.rng.choice(sorted(self.nodes))
            out = out_root / name
            ch = grpc.insecure_channel(self.nodes[name].address, options=CHANNEL_OPTIONS)
            timer = threading.Timer(GET_TIMEOUT_S, ch.close)
            timer.start()
            try:
                got = get_study(ch, uid, out)
                failed = got.failed
            except grpc.RpcError as exc:
                failed = [{"sop_instance_uid": "*", "reason": exc.code().name}]
            finally:
                timer.cancel()
                ch.close()
            files = {f.stem: f for f in (out / uid).glob("*/*.dcm")}
            for sop in sorted(rec.acked):
                f = files.get(sop)
                if f is None:
                    why = next((x["reason"] for x in failed
                                if x["sop_instance_uid"] in (sop, "*", "?")), "not returned")
                    self.report.lost.append(f"{uid}/{sop} (put at {rec.node}, got from {name}: "
                                            f"{why})")
                elif hashlib.sha256(f.read_bytes()).digest() != rec.instances[sop].sha256:
                    self.report.lost.append(f"{uid}/{sop}: bytes differ (got from {name})")
            for sop, f in files.items():  # whatever else came back must be right too
                if sop in rec.instances and sop not in rec.acked and \
                        hashlib.sha256(f.read_bytes()).digest() != rec.instances[sop].sha256:
                    self.report.lost.append(f"{uid}/{sop}: unacknowledged, returned wrong")
            shutil.rmtree(out / uid, ignore_errors=True)

    def finish(self) -> None:
        self.heal_all()
        t = time.monotonic()
        self.cluster.wait_converged(60)
        bad = self.wait_safe(self.profile.converge_s)
        self.report.converge_s = time.monotonic() - t
        self.say(f"converged after {self.report.converge_s:.1f} s" if not bad
                 else f"NOT converged after {self.report.converge_s:.1f} s: {len(bad)} unsafe")
        self.scrub_all(60)
        bad = self.wait_safe(self.profile.converge_s if bad else 20.0)
        self.report.unsafe += bad
        self.verify()

    def run(self) -> Report:
        try:
            self.start()
            self.warm_up()
            self.drive()
            self.finish()
        finally:
            self.report.duration_s = time.monotonic() - self.started
            self.report.proxy = self.proxy.describe()
            self.scan_logs()
            with self.lock:
                self.report.studies_acked = len(self.studies)
                self.report.acknowledged = sum(len(r.acked) for r in self.studies.values())
            self.close()
        return self.report

    def scan_logs(self) -> None:
        """Unexpected exceptions in the node logs, by their last line (for the report)."""
        for node in self.nodes.values():
            try:
                text = node.log_path.read_text(errors="replace")
            except OSError:
                continue
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if "scrub: chunk " in line or "asked for a damaged chunk" in line:
                    self.report.damage_logged += 1
                if "repaired chunk " in line:
                    self.report.repair_logged += 1
                if line.startswith("Traceback"):
                    j = i + 1
                    while j < len(lines) and (lines[j].startswith(" ") or not lines[j]):
                        j += 1
                    last = lines[j] if j < len(lines) else "?"
                    self.report.tracebacks[f"{node.node_id}: {last[:160]}"] += 1

    def dump_logs(self, lines: int = 60) -> str:
        out = []
        for name, node in self.nodes.items():
            tail = node.log().splitlines()[-lines:]
            out.append(f"===== {name} =====\n" + "\n".join(tail))
        return "\n".join(out)


def run(workdir: Path, seed: int, profile: Profile,
        say: Callable[[str], None] = print) -> tuple[Report, Soak]:
    soak = Soak(workdir, seed, profile, say)
    return soak.run(), soak


def record(report: Report, minutes: float) -> Path:
    from bench.common import append_results
    kinds = " | ".join(str(report.faults[k]) for k in KINDS)
    text = "\n".join([
        f"`./dev soak --minutes {minutes:g} --seed {report.seed}` (tests/soak.py): five sites "
        "(Boston, Chicago, Denver, Seattle, Atlanta), real node processes, peer traffic through "
        "a user-space fault proxy, a study of 3 CT instances put at a random live node every "
        "~0.7 s; dead_after_s 4, gossip 0.2 s.",
        "",
        "| " + " | ".join(KINDS) + " | total |",
        "|" + "---|" * (len(KINDS) + 1),
        f"| {kinds} | {sum(report.faults.values())} |",
        "",
        "| duration | instances acknowledged | studies | lost | unsafe at the end | "
        "converged after healing | damaged chunks found / repaired from a peer by the "
        "scrubber (node logs) | unrepairable at the end |",
        "|---|---|---|---|---|---|---|---|",
        f"| {report.duration_s / 60:.1f} min | {report.acknowledged} | {report.studies_acked} | "
        f"{len(report.lost)} | {len(report.unsafe)} | {report.converge_s:.1f} s | "
        f"{report.damage_logged} / {report.repair_logged} | {len(report.unrepairable)} |",
    ])
    if report.skipped:
        text += ("\n\nFaults drawn but not possible at that moment (not counted): "
                 + ", ".join(f"{k} {n}" for k, n in report.skipped.most_common()) + ".")
    text += (f"\n\nNode crashes: {len(report.crashes)}; tracebacks in node logs: "
             f"{sum(report.tracebacks.values())}.")
    return append_results(f"Fault soak: {minutes:g} minutes of faults", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./dev soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    ap.add_argument("--short", action="store_true", help="the test suite's scripted profile")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every node stopped, the tmpfs unmounted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    profile = SHORT if args.short else long_profile(args.minutes)
    workdir = Path(tempfile.mkdtemp(prefix=f"pacsmesh-soak-{seed}-"))
    print(f"soak: seed {seed}, {profile.duration_s / 60:.1f} min of faults, work dir {workdir}",
          flush=True)
    soak = Soak(workdir, seed, profile, lambda s: print(s, flush=True))
    report = soak.run()
    print("\n" + report.summary())
    (workdir / "report.json").write_text(json.dumps(
        {**{k: v for k, v in vars(report).items() if k != "log"},
         "faults": dict(report.faults), "skipped": dict(report.skipped)}, indent=1,
        default=str))
    if not report.ok:
        print(soak.dump_logs(), file=sys.stderr)
        print(f"FAILED: replay with --seed {seed}; logs kept in {workdir}", file=sys.stderr)
        return 1
    if args.record:
        print(f"recorded in {record(report, args.minutes)}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
