"""Scale: real node processes over an archive of N studies, at rest and at work.

    python -m bench.scale [--studies 10000 ...] [--instances 1 ...] [--record]
                          [--label TEXT] [--skip PHASE,...] [--idle-s 60] [--timeout-s 300]

For each size (``--studies`` N with ``--instances`` K per study; several sizes run
one after the other and land side by side, one column each) the bulk loader
(bench/scale_load.py) writes the archive into the data dirs, then real
`pacsmesh node` processes start on loopback:

federation: Boston, Denver, Seattle; copies 3; D = 250 miles; gossip every 1.0 s
  (the default); every node holds every study.
  - settle: start until every node's status says every study is safe;
  - idle: CPU (utime+stime from /proc/PID/stat over ``--idle-s`` seconds, % of one
    core) and RSS per node; bytes between nodes, counted by nftables rules on the
    loopback port of each node (IP packet bytes, headers included; nothing but
    the nodes talks to those ports in the window);
  - latency: Status, Locate and ListStudies as RPC round trips from an in-process
    gRPC client (a CLI process start would dominate), median of up to 20 calls
    within ``--latency-budget-s``; one `pacsmesh status/locate/ls --json` wall time
    each for reference; C-FIND by PatientID (study level) from an in-process
    pynetdicom SCU on one association;
  - safe: 10 new small studies (pacsmesh.sample) put at Boston until `locate`
    calls each safe;
  - ingest: 200 small instances put at Boston, here and into an empty federation
    of the same three sites (best of 4 batches each; `put --json` seconds);
  - restart: SIGTERM Boston, start it again, time until Status answers, until
    gRPC health says SERVING and until its status calls every study safe again;
  - learn: a 4th node (Chicago) with an empty data dir joins; time until its
    status counts as many studies as Boston's.
repair: Boston, Dallas, Denver, Seattle, Chicago; copies 2; dead_after_s 10 (the
  default is 600 s: a short grace so the figure is the re-copy, not the wait);
  Denver holds 2/5 of the studies (1/5 of the copies); SIGKILL it and time until
  a survivor's status says 0 unsafe studies.

Each size's figures are also saved to bench/out/scale/NxK.json, so sizes run
apart (the top one takes hours) can be tabled together: ``--collect`` with the
same ``--studies``/``--instances`` runs nothing and tables (and ``--record``s) them.
Before loading, a phase that would not fit on the disk is skipped, saying so.

Every wait is bounded by ``--timeout-s``; a wait that runs out is reported with
the figure it reached, not hidden. The scrubber is off (`[scrub] interval_s` 1e10:
a first pass never comes due): its cost follows its configured rate, not the
archive's size (bench.scrub measures it); over tiny chunks at the default 50 MB/s
it would drown the rest, and its rate-limit sleep (one batch of 64 chunks at the
configured rate) is not cut short at shutdown, so a throttled one shows up in the
restart figure instead (up to the worker runner's 10 s stop timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import OUT_DIR, append_results, machine_line
from bench.scale_load import (
    STUDIES_PER_PATIENT,
    Corpus,
    LoadReport,
    Site,
    jobs_for,
    load_all,
    patient_id,
    placement_table,
    study_uid,
)
from pacsmesh.node.health import human_bytes
from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.sample import StudySpec, write_study
from pacsmesh.sample import study_uid as sample_study_uid
from tests.nodeproc import PYTHON, NodeProc, free_port

T = TypeVar("T")

PARTITIONS = 1024  # the [cluster] default
MIN_DISTANCE_MILES = 250.0
CAPACITY_BYTES = 1 << 40  # every node reports the same power of two: placement weights are equal
SCRUB_INTERVAL_S = 1e10  # no pass comes due while we measure: see the module docstring
REPAIR_DEAD_AFTER_S = 10.0
BOSTON = Site("boston-1", "Boston", 42.3601, -71.0589)
DENVER = Site("denver-1", "Denver", 39.7392, -104.9903)
SEATTLE = Site("seattle-1", "Seattle", 47.6062, -122.3321)
CHICAGO = Site("chicago-1", "Chicago", 41.8781, -87.6298)
DALLAS = Site("dallas-1", "Dallas", 32.7767, -96.7970)
FEDERATION = [BOSTON, DENVER, SEATTLE]
REPAIR_SITES = [BOSTON, DALLAS, DENVER, SEATTLE, CHICAGO]  # pairwise >= 660 miles
REPAIR_VICTIM = DENVER
AE_TITLE = "PACSMESH"
CALLING_AE = "SCALEBENCH"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R Information Model - FIND
NEW_STUDIES = 10
INGEST_STUDIES, INGEST_PER_STUDY = 10, 20  # 200 instances of 128x128
INGEST_SEEDS = (9101, 9102, 9103, 9104)  # best of 4: one 0.4 s put is noisy here
NEW_STUDY_SEED = 9200
LATENCY_CALLS = 20
CFIND_CALLS = 10
LS_PAGE = 1000
RPC_TIMEOUT_S = 600.0  # a slow answer is a figure too; only a hung node should time out
QUIET_S = 10.0  # after settling: the first anti-entropy and holdings rounds are over
POLL_S = 0.5
SLOW_STOP_S = 3.0  # a shutdown slower than this gets its log printed
DISK_PER_INSTANCE_GUESS = 3300  # bytes a full holder uses, until this run measures it
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 1 << 30)]
PHASES = ("idle", "latency", "cfind", "safe", "ingest", "restart", "learn", "repair")


# ---- small helpers ------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


@dataclass
class Waited:
    ok: bool
    seconds: float
    last: Any


def wait_until(check: Callable[[], Any], timeout_s: float, interval_s: float = POLL_S
               ) -> Waited:
    """Polls until ``check`` returns something truthy, at most ``timeout_s``; never raises
    for a gRPC error (a node that is starting is not an answer yet)."""
    started = time.monotonic()
    last: Any = None
    while True:
        try:
            got = check()
        except grpc.RpcError as exc:
            got, last = None, f"{exc.code().name}"
        else:
            last = got
        elapsed = time.monotonic() - started
        if got:
            return Waited(True, elapsed, got)
        if elapsed >= timeout_s:
            return Waited(False, elapsed, last)
        time.sleep(interval_s)


@contextlib.contextmanager
def api(address: str) -> Iterator[node_pb2_grpc.NodeApiStub]:
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as ch:
        yield node_pb2_grpc.NodeApiStub(ch)


def status(address: str, timeout_s: float = RPC_TIMEOUT_S) -> node_pb2.StatusReply:
    with api(address) as stub:
        reply: node_pb2.StatusReply = stub.Status(node_pb2.StatusRequest(), timeout=timeout_s)
        return reply


def run_cli(*args: str) -> tuple[float, int, str]:
    """(wall seconds, exit code, stdout) of one `pacsmesh` process."""
    started = time.perf_counter()
    res = subprocess.run([PYTHON, "-m", "pacsmesh.cli", *args], capture_output=True,
                         text=True, timeout=RPC_TIMEOUT_S * 2, check=False)
    return time.perf_counter() - started, res.returncode, res.stdout


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> tuple[float, float]:
    """(resident, of which anonymous) in MiB: the rest is mostly LMDB's mapped file."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("RssAnon", 0.0)


def median_timed(call: Callable[[int], Any], calls: int, budget_s: float) -> tuple[float, int]:
    """(median seconds, calls made): up to ``calls`` calls, at least 3, stopping once
    ``budget_s`` is spent. The first call (connection set-up) is not counted."""
    call(-1)
    times: list[float] = []
    spent_from = time.perf_counter()
    for i in range(calls):
        started = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - started)
        if len(times) >= 3 and time.perf_counter() - spent_from > budget_s:
            break
    return statistics.median(times), len(times)


# ---- network counters ------------------------------------------------------------------------


class LoopbackCounters:
    """Bytes of TCP packets on loopback to and from each node's gRPC port (nftables).

    Counted once, on the output hook. A connection between two nodes always has
    one node's listening port at one end, so the sum over ports is the traffic
    between nodes, each byte once."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.table = f"pacsmesh_scale_{os.getpid()}"
        self.installed = False

    @staticmethod
    def unavailable() -> str | None:
        if shutil.which("nft") is None:
            return "nft is not installed (apt-get install nftables)"
        if os.geteuid() != 0:
            return "nftables rules need root"
        return None

    def install(self) -> None:
        rules = []
        for name, port in self.ports.items():
            rules.append(f'oifname "lo" tcp dport {port} counter comment "{name} in"')
            rules.append(f'oifname "lo" tcp sport {port} counter comment "{name} out"')
        script = (f"table inet {self.table} {{\n chain out {{\n"
                  "  type filter hook output priority 0; policy accept;\n  "
                  + "\n  ".join(rules) + "\n }\n}\n")
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True,
                       capture_output=True)
        self.installed = True

    def read(self) -> dict[str, int]:
        """node id -> bytes to and from its port so far."""
        res = subprocess.run(["nft", "-j", "list", "table", "inet", self.table],
                             capture_output=True, text=True, check=True)
        out: dict[str, int] = dict.fromkeys(self.ports, 0)
        for item in json.loads(res.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            name = rule["comment"].rsplit(" ", 1)[0]
            for expr in rule["expr"]:
                if "counter" in expr:
                    out[name] += int(expr["counter"]["bytes"])
        return out

    def remove(self) -> None:
        if self.installed:
            subprocess.run(["nft", "delete", "table", "inet", self.table],
                           capture_output=True, check=False)
            self.installed = False


# ---- a federation of node processes ------------------------------------------------------------


@dataclass
class Federation:
    workdir: Path
    sites: list[Site]
    copies: int
    dead_after_s: float | None = None
    dicom_port: int = 0  # Boston's DICOM listener (0: none)
    nodes: dict[str, NodeProc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.sites:
            self.nodes[s.node_id] = NodeProc(self.workdir, node_id=s.node_id, site=s.site,
                                             lat=s.lat, lon=s.lon)
        for n in self.nodes.values():  # everyone seeds everyone: any of them may restart
            self._configure(n, [m.address for m in self.nodes.values() if m is not n])

    def join(self, s: Site) -> NodeProc:
        """A newcomer seeded by the members; their configs do not name it (it is not up
        while they settle, and a dead seed would be gossiped at every round)."""
        node = NodeProc(self.workdir, node_id=s.node_id, site=s.site, lat=s.lat, lon=s.lon)
        self._configure(node, [m.address for m in self.nodes.values()])
        self.nodes[s.node_id] = node
        return node

    def _configure(self, n: NodeProc, seeds: list[str]) -> None:
        cluster: dict[str, Any] = {"seeds": seeds, "copies": self.copies,
                                   "min_distance_miles": MIN_DISTANCE_MILES,
                                   "partitions": PARTITIONS}
        if self.dead_after_s is not None:
            cluster["dead_after_s"] = self.dead_after_s
        n.extra = {"node": {"capacity_bytes": CAPACITY_BYTES}, "cluster": cluster,
                   "scrub": {"interval_s": SCRUB_INTERVAL_S}}
        if n.node_id == BOSTON.node_id and self.dicom_port:
            n.extra["dicom"] = {"listen": f"127.0.0.1:{self.dicom_port}", "ae_title": AE_TITLE}

    def dirs(self) -> dict[str, Path]:
        return {k: n.data_dir for k, n in self.nodes.items()}

    def start(self, timeout_s: float, only: list[str] | None = None) -> None:
        started = [self.nodes[k] for k in (only or list(self.nodes))]
        for n in started:
            n.start(wait=False)
        for n in started:
            wait_serving(n, timeout_s)

    def stop(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes.values():
            n.stop()

    def running(self) -> list[NodeProc]:
        return [n for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]


def serving(node: NodeProc) -> bool:
    """gRPC health says SERVING: readiness that does not grow with the archive, as a
    Status call (a full catalog scan before issue 8) does."""
    assert node.proc is not None
    if node.proc.poll() is not None:
        raise RuntimeError(f"{node.node_id} exited with {node.proc.returncode}:\n{node.log()}")
    with grpc.insecure_channel(node.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=2)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_serving(node: NodeProc, timeout_s: float) -> None:
    waited = wait_until(lambda: serving(node), timeout_s, 0.1)
    if not waited.ok:
        raise TimeoutError(f"{node.node_id} not serving after {fmt_s(waited.seconds)}:\n"
                           f"{node.log()}")


def all_judged(addresses: list[str]) -> bool:
    return all(status(a).repair.judging == 0 for a in addresses)


def all_alive(fed: Federation) -> bool:
    want = len(fed.running())
    for n in fed.running():
        states = [m.state for m in status(n.address).nodes]
        if states.count("alive") != want:
            return False
    return True


def all_safe(addresses: list[str], studies: int | None = None) -> bool:
    for address in addresses:
        st = status(address)
        if st.unsafe_studies != 0 or (studies is not None and st.studies < studies):
            return False
    return True


# ---- one size --------------------------------------------------------------------------------


@dataclass
class SizeRun:
    args: argparse.Namespace
    corpus: Corpus
    workdir: Path
    figures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_rate: float = 0.0
    disk_full: float = 0.0  # bytes per instance on a node that holds everything
    disk_known: float = 0.0  # bytes per instance on a repair-phase node (holds 2/5)
    ingest_empty_rate: float = 0.0  # measured first, shown beside the loaded figure
    rng: random.Random = field(default_factory=lambda: random.Random(8))

    def say(self, text: str) -> None:
        print(f"[{self.corpus.studies:,} x {self.corpus.instances}] {text}", flush=True)

    def put(self, key: str, value: str) -> None:
        self.figures[key] = value
        self.say(f"{key}: {value}")

    def enabled(self, phase: str) -> bool:
        return phase not in self.args.skip

    def guarded(self, phase: str, fn: Callable[[], None]) -> None:
        """A phase that fails is a figure too: note it and go on with the next one."""
        if self.enabled(phase):
            self.attempt(phase, fn)

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # the run must go on and report what it measured
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.notes.append(f"{what} failed: {type(exc).__name__}: {first}")
            self.say(f"{what} FAILED: {exc!r}")

    # ---- the archive ----

    def fits(self, nodes: int, what: str) -> bool:
        need = nodes * self.corpus.total_instances * (self.disk_full or DISK_PER_INSTANCE_GUESS)
        free = shutil.disk_usage(self.workdir).free
        if need * 1.2 > free:
            self.notes.append(f"{what} skipped: it needs about {human_bytes(need)} of disk, "
                              f"{human_bytes(free)} is free under {self.workdir}")
            self.say(self.notes[-1])
            return False
        return True

    def load(self, fed: Federation) -> None:
        """Write each node's data dir; a federation where every node holds everything
        is loaded once and copied (the data dirs would be byte-identical)."""
        table = placement_table(fed.sites, PARTITIONS, fed.copies, MIN_DISTANCE_MILES,
                                CAPACITY_BYTES)
        jobs = list(jobs_for(fed.sites, fed.dirs(), self.corpus, PARTITIONS, table))
        copy_of_first = all(j.held_partitions is None for j in jobs)
        started = time.perf_counter()
        reports: list[LoadReport] = load_all(jobs[:1] if copy_of_first else jobs)
        for r in reports:
            self.say(f"loaded {r.data_dir.name}: {r.manifests:,} manifests ({r.held:,} held) "
                     f"in {r.seconds:.1f} s = {r.rate:,.0f}/s, {human_bytes(r.disk_bytes)}")
        if copy_of_first:
            for job in jobs[1:]:
                shutil.copytree(jobs[0].data_dir, job.data_dir)
        wall = time.perf_counter() - started
        rate = statistics.mean(r.rate for r in reports)
        instances = self.corpus.total_instances
        if copy_of_first:
            self.load_rate = rate
            self.disk_full = reports[0].disk_bytes / instances
            self.put("loader: manifests/s into one node", f"{rate:,.0f}")
            self.put("loader: disk per instance, node holding all",
                     f"{self.disk_full:,.0f} B")
            self.put("loader: wall time, 3 nodes (1 loaded, 2 copied)", fmt_s(wall))
        else:
            self.disk_known = statistics.mean(r.disk_bytes for r in reports) / instances
            self.put("repair loader: manifests/s per node (2 processes at once)",
                     f"{rate:,.0f}")
            self.put("repair loader: wall time, 5 nodes (2 at a time)", fmt_s(wall))

    # ---- federation phases ----

    def federation(self) -> None:
        if not self.fits(4, "the federation phases"):
            return
        fed = Federation(self.workdir / "fed", FEDERATION, copies=3, dicom_port=free_port())
        joiner = CHICAGO
        counters: LoopbackCounters | None = None
        why_not = LoopbackCounters.unavailable()
        try:
            self.load(fed)
            joiner_node = fed.join(joiner)  # started only in the learn phase
            ports = {k: n.port for k, n in fed.nodes.items()}
            if why_not is None:
                counters = LoopbackCounters(ports)
                try:
                    counters.install()
                except subprocess.CalledProcessError as exc:  # e.g. no nf_tables in the kernel
                    why_not, counters = f"nft refused the rules: {exc.stderr.strip()}", None
            fed.start(self.args.timeout_s, only=[s.node_id for s in FEDERATION])
            addresses = [fed.nodes[s.node_id].address for s in FEDERATION]
            settled = wait_until(lambda: all_alive(fed) and all_safe(
                addresses, self.corpus.studies), self.args.timeout_s)
            self.put("settle: start until every study is safe on every node",
                     fmt_s(settled.seconds) if settled.ok else
                     f"not within {fmt_s(settled.seconds)}")
            # at rest means no verdict still queued: a first start judges every study
            # (a bulk load marks them all) before the node is idle
            drained = wait_until(lambda: all_judged(addresses), self.args.timeout_s)
            self.put("settle: start until no safety verdict is queued on any node",
                     fmt_s(settled.seconds + drained.seconds) if drained.ok else
                     f"not within {fmt_s(settled.seconds + drained.seconds)}")
            time.sleep(QUIET_S)
            self.guarded("idle", lambda: self.idle(fed, counters, why_not))
            boston = fed.nodes[BOSTON.node_id]
            self.guarded("latency", lambda: self.latency(boston.address))
            self.guarded("cfind", lambda: self.cfind(fed.dicom_port))
            self.guarded("safe", lambda: self.new_studies_safe(boston.address))
            self.guarded("ingest", lambda: self.ingest(boston.address))
            self.guarded("restart", lambda: self.restart(boston))
            self.guarded("learn", lambda: self.learn(boston, joiner_node))
        finally:
            fed.stop()
            if counters is not None:
                counters.remove()
            if not self.args.keep:
                shutil.rmtree(fed.workdir, ignore_errors=True)

    def idle(self, fed: Federation, counters: LoopbackCounters | None,
             why_not: str | None) -> None:
        nodes = fed.running()
        cpu0 = {n.node_id: cpu_seconds(n.proc.pid) for n in nodes if n.proc}
        net0 = counters.read() if counters else {}
        started = time.monotonic()
        time.sleep(self.args.idle_s)
        seconds = time.monotonic() - started
        cpu1 = {n.node_id: cpu_seconds(n.proc.pid) for n in nodes if n.proc}
        net1 = counters.read() if counters else {}
        ids = [n.node_id for n in nodes]
        self.put("idle CPU, % of one core (Boston / Denver / Seattle)", " / ".join(
            f"{(cpu1[k] - cpu0[k]) / seconds * 100:.1f}" for k in ids))
        rss = [rss_mib(n.proc.pid) for n in nodes if n.proc]
        self.put("RSS MiB per node (anonymous part)",
                 " / ".join(f"{r:.0f} ({a:.0f})" for r, a in rss))
        if counters is None:
            self.put("bytes/min between nodes at rest", f"not measured: {why_not}")
            return
        per_min = {k: (net1[k] - net0[k]) * 60 / seconds for k in ids}
        self.put("bytes/min between nodes at rest, total", human_bytes(sum(per_min.values())))
        self.put("bytes/min at rest on each node's port (B / D / S)",
                 " / ".join(human_bytes(per_min[k]) for k in ids))

    def latency(self, address: str) -> None:
        budget = self.args.latency_budget_s
        studies = [study_uid(self.rng.randrange(self.corpus.studies))
                   for _ in range(LATENCY_CALLS + 1)]
        request = node_pb2.ListStudiesRequest()
        paged = "limit" in request.DESCRIPTOR.fields_by_name
        if paged:
            limit_field = "limit"  # added by issue 8; absent before it
            setattr(request, limit_field, LS_PAGE)
        with api(address) as stub:
            st, n_st = median_timed(
                lambda i: stub.Status(node_pb2.StatusRequest(), timeout=RPC_TIMEOUT_S),
                LATENCY_CALLS, budget)
            self.put("Status RPC, median", f"{fmt_s(st)} (n={n_st})")
            loc, n_loc = median_timed(
                lambda i: stub.Locate(node_pb2.LocateRequest(study_uid=studies[i]),
                                      timeout=RPC_TIMEOUT_S), LATENCY_CALLS, budget)
            self.put("Locate RPC, median", f"{fmt_s(loc)} (n={n_loc})")
            what = f"first page of {LS_PAGE}" if paged else "full list (no paging yet)"
            try:
                ls, n_ls = median_timed(
                    lambda i: stub.ListStudies(request, timeout=RPC_TIMEOUT_S),
                    LATENCY_CALLS, budget)
                self.put("ListStudies RPC, median", f"{fmt_s(ls)} (n={n_ls}, {what})")
            except grpc.RpcError as exc:
                self.put("ListStudies RPC, median", f"fails: {exc.code().name} ({what})")
        ls_args = ["--limit", str(LS_PAGE)] if "--limit" in run_cli("ls", "--help")[2] else []
        walls = []
        for args in (["status"], ["locate", studies[0]], ["ls", *ls_args]):
            seconds, code, _ = run_cli(*args, "--json", "--node", address)
            walls.append(fmt_s(seconds) + ("" if code == 0 else f" (exit {code})"))
        self.put("CLI wall: status / locate / ls" + ("" if ls_args else " (full list)"),
                 " / ".join(walls))

    def cfind(self, port: int) -> None:
        from pydicom.dataset import Dataset
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = RPC_TIMEOUT_S
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        if not assoc.is_established:
            raise RuntimeError("association refused")
        # Nagle would add its delayed-ACK wait to every multi-PDU answer on our side
        wrapped = assoc.dul.socket
        if wrapped is not None and wrapped.socket is not None:
            wrapped.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        matches: list[int] = []
        patients = [patient_id(self.rng.randrange(self.corpus.studies))
                    for _ in range(CFIND_CALLS + 1)]

        def query(i: int) -> None:
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = patients[i]
            ds.StudyInstanceUID = ""
            ds.StudyDate = ""
            found = 0
            for status_ds, identifier in assoc.send_c_find(ds, STUDY_ROOT_FIND):
                if status_ds and status_ds.Status in (0xFF00, 0xFF01) and identifier:
                    found += 1
            matches.append(found)

        try:
            seconds, calls = median_timed(query, CFIND_CALLS, self.args.latency_budget_s)
        finally:
            assoc.release()
        self.put("C-FIND by PatientID (study level), median",
                 f"{fmt_s(seconds)} (n={calls}, {min(matches)}-{max(matches)} studies each; "
                 f"{STUDIES_PER_PATIENT} per patient)")

    def new_studies_safe(self, address: str) -> None:
        root = self.workdir / "dicom" / "new"
        uids = []
        for i in range(1, NEW_STUDIES + 1):
            spec = StudySpec(study_index=i, instances=2, rows=128, columns=128,
                             seed=NEW_STUDY_SEED, patient_id=f"NEW{i:04d}")
            write_study(root / str(i), spec)
            uids.append(sample_study_uid(spec))
        started = time.monotonic()
        seconds, code, out = run_cli("put", str(root), "--json", "--node", address)
        if code != 0:
            raise RuntimeError(f"put failed ({code}): {out[-300:]}")
        pending = set(uids)

        def all_safe_now() -> bool:
            with api(address) as stub:
                for uid in list(pending):
                    if stub.Locate(node_pb2.LocateRequest(study_uid=uid),
                                   timeout=RPC_TIMEOUT_S).safe:
                        pending.discard(uid)
            return not pending

        waited = wait_until(all_safe_now, self.args.timeout_s, 0.2)
        total = time.monotonic() - started
        self.put("10 new studies (20 instances): put until all safe",
                 f"{fmt_s(total)} (put {fmt_s(seconds)})" if waited.ok else
                 f"{len(pending)} of 10 still unsafe after {fmt_s(total)}")

    def ingest_batches(self) -> list[Path]:
        out = []
        for seed in INGEST_SEEDS:
            root = self.workdir / "dicom" / f"ingest-{seed}"
            if not root.exists():
                for i in range(1, INGEST_STUDIES + 1):
                    write_study(root / str(i), StudySpec(
                        study_index=i, instances=INGEST_PER_STUDY, rows=128, columns=128,
                        seed=seed, patient_id=f"ING{seed}"))
            out.append(root)
        return out

    def put_rate(self, address: str) -> float:
        """Best instances/s of the batches put at ``address`` (`put --json` seconds: the
        upload, not the process start); each batch replicates before the next goes."""
        best = 0.0
        for root in self.ingest_batches():
            _, code, out = run_cli("put", str(root), "--json", "--node", address)
            doc = json.loads(out) if out.strip() else {}
            if code != 0 or doc.get("stored") != INGEST_STUDIES * INGEST_PER_STUDY:
                raise RuntimeError(f"put failed ({code}): {out[-300:]}")
            best = max(best, doc["stored"] / doc["seconds"])
            seed = int(root.name.rsplit("-", 1)[1])
            uids = [sample_study_uid(StudySpec(study_index=i, seed=seed))
                    for i in range(1, INGEST_STUDIES + 1)]

            def replicated(uids: list[str] = uids) -> bool:
                with api(address) as stub:
                    return all(stub.Locate(node_pb2.LocateRequest(study_uid=u),
                                           timeout=RPC_TIMEOUT_S).safe for u in uids)

            wait_until(replicated, self.args.timeout_s)
        return best

    def ingest_empty(self) -> None:
        """The same batches into an empty federation of the same sites: the "at 0" row."""
        fed = Federation(self.workdir / "empty", FEDERATION, copies=3)
        try:
            fed.start(self.args.timeout_s)
            wait_until(lambda: all_alive(fed), self.args.timeout_s)
            self.ingest_empty_rate = self.put_rate(fed.nodes[BOSTON.node_id].address)
            self.say(f"ingest into the empty federation: {self.ingest_empty_rate:.0f} inst/s")
        finally:
            fed.stop()
            shutil.rmtree(fed.workdir, ignore_errors=True)

    def ingest(self, address: str) -> None:
        empty = self.ingest_empty_rate
        self.put("ingest 200 instances, empty federation (inst/s)",
                 f"{empty:.0f}" if empty else "not measured")
        rate = self.put_rate(address)
        self.put("ingest 200 instances, loaded federation (inst/s)", f"{rate:.0f}")
        if empty:
            self.put("ingest ratio loaded / empty", f"{rate / empty:.2f}")

    def restart(self, node: NodeProc) -> None:
        started = time.monotonic()
        code = node.terminate(self.args.timeout_s)
        stopping = time.monotonic() - started
        self.put("restart: SIGTERM to exit", fmt_s(stopping)
                 + ("" if code == 0 else f" (exit {code})"))
        if stopping > SLOW_STOP_S:  # show what it waited for
            self.say("its shutdown log:\n" + node.log().rsplit("signal received", 1)[-1])
        expected = self.corpus.studies
        node.start(wait=False)
        started = time.monotonic()
        answered: dict[str, float] = {}

        def up() -> bool:
            if "health" not in answered and serving(node):
                answered["health"] = time.monotonic() - started
            if "status" not in answered:
                status(node.address)
                answered["status"] = time.monotonic() - started
            return len(answered) == 2

        waited = wait_until(up, self.args.timeout_s, 0.05)
        if not waited.ok:
            raise RuntimeError(f"not serving within {fmt_s(waited.seconds)}: {waited.last}")
        self.put("restart: start to Status answering", fmt_s(answered["status"]))
        self.put("restart: start to health SERVING", fmt_s(answered["health"]))
        safe = wait_until(lambda: all_safe([node.address], expected), self.args.timeout_s)
        total = time.monotonic() - started
        self.put("restart: start until its status calls every study safe",
                 fmt_s(total) if safe.ok else f"not within {fmt_s(total)}")

    def learn(self, boston: NodeProc, joiner: NodeProc) -> None:
        want = status(boston.address).studies
        joiner.start(wait=False)
        started = time.monotonic()
        wait_serving(joiner, self.args.timeout_s)
        seen = [0]

        def learned() -> bool:
            seen[0] = status(joiner.address).studies
            return seen[0] >= want

        waited = wait_until(learned, self.args.timeout_s, 1.0)
        total = time.monotonic() - started
        self.put("empty 4th node (Chicago) joins: until it knows every study",
                 fmt_s(total) if waited.ok else
                 f"{seen[0]:,} of {want:,} studies after {fmt_s(total)}")

    # ---- repair ----

    def repair(self) -> None:
        if not self.fits(5, "the repair phase"):
            return
        fed = Federation(self.workdir / "repair", REPAIR_SITES, copies=2,
                         dead_after_s=REPAIR_DEAD_AFTER_S)
        try:
            self.load(fed)
            table = placement_table(REPAIR_SITES, PARTITIONS, 2, MIN_DISTANCE_MILES,
                                    CAPACITY_BYTES)
            held = sum(1 for n in range(self.corpus.studies)
                       if REPAIR_VICTIM.node_id in table.for_study(study_uid(n)).replicas)
            fed.start(self.args.timeout_s)
            watcher = fed.nodes[BOSTON.node_id].address
            settled = wait_until(lambda: all_alive(fed) and all_safe(
                [watcher], self.corpus.studies), self.args.timeout_s)
            if not settled.ok:
                self.put("repair: re-create the copies of 1 of 5 nodes",
                         f"not measured: the 5 nodes did not settle in {fmt_s(settled.seconds)}")
                return
            victim = fed.nodes[REPAIR_VICTIM.node_id]
            victim.kill()
            killed = time.monotonic()
            seen: dict[str, float] = {}
            last = [0]
            peak = [0]

            def healed() -> bool:
                # done only once the loss was seen (unsafe > 0), the victim is dead and
                # no verdict is still queued: "0 unsafe" before that is status lagging
                st = status(watcher)
                last[0] = st.unsafe_studies
                peak[0] = max(peak[0], st.unsafe_studies)
                state = next((m.state for m in st.nodes if m.id == REPAIR_VICTIM.node_id), "")
                now = time.monotonic() - killed
                if state == "dead":
                    seen.setdefault("dead", now)
                if st.unsafe_studies:
                    seen.setdefault("unsafe", now)
                return ("dead" in seen and "unsafe" in seen and st.repair.judging == 0
                        and st.unsafe_studies == 0)

            waited = wait_until(healed, self.args.timeout_s)
            total = time.monotonic() - killed
            dead = seen.get("dead")
            self.put("repair: SIGKILL 1 of 5 (copies 2, dead_after_s 10) until 0 unsafe",
                     (f"{fmt_s(total)} for {held:,} studies" if waited.ok else
                      f"{last[0]:,} of {held:,} studies still unsafe after {fmt_s(total)}")
                     + (f" (declared dead at {fmt_s(dead)}; status first showed the loss "
                        f"at {fmt_s(seen.get('unsafe', 0.0))}, at most {peak[0]:,} unsafe)"
                        if dead is not None else " (never declared dead)"))
        finally:
            fed.stop()
            if not self.args.keep:
                shutil.rmtree(fed.workdir, ignore_errors=True)

    # ---- the whole size ----

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            if self.enabled("ingest"):
                self.guarded("ingest", self.ingest_empty)
            if any(self.enabled(p) for p in PHASES if p != "repair"):
                self.attempt("federation", self.federation)
            self.guarded("repair", self.repair)
        finally:
            if not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.estimate()
            self.say(f"done in {fmt_s(time.monotonic() - started)}")
            self.save()

    def save(self) -> Path:
        """This size's figures, so sizes run apart can be tabled together (--collect)."""
        path = result_path(self.corpus)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "studies": self.corpus.studies, "instances": self.corpus.instances,
            "machine": machine_line(), "figures": self.figures, "notes": self.notes}, indent=1))
        return path

    def estimate(self) -> None:
        """What the top size (1M studies x 10) would take, from this size's figures."""
        top = 10_000_000
        if self.load_rate:
            self.put("estimate at 10M instances: one node's load",
                     f"{fmt_s(top / self.load_rate)} at this size's rate (it falls as the "
                     "index grows)")
        if self.disk_full:
            self.put("estimate at 10M instances: disk, federation (4 nodes)",
                     human_bytes(4 * top * self.disk_full))
        if self.disk_known:
            self.put("estimate at 10M instances: disk, repair (5 nodes)",
                     human_bytes(5 * top * self.disk_known))


# ---- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    studies: int
    instances: int
    figures: dict[str, str]
    notes: list[str]


def result_path(corpus: Corpus) -> Path:
    return OUT_DIR / "scale" / f"{corpus.studies}x{corpus.instances}.json"


def load_column(corpus: Corpus) -> Column:
    doc = json.loads(result_path(corpus).read_text())
    return Column(doc["studies"], doc["instances"], doc["figures"], doc["notes"])


def table(columns: list[Column]) -> str:
    keys: list[str] = []
    for c in columns:
        keys += [k for k in c.figures if k not in keys]
    head = "| | " + " | ".join(
        f"{c.studies:,} studies x {c.instances}" for c in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(c.figures.get(k, "") for c in columns) + " |")
    return "\n".join(lines)


METHOD = """\
Real `pacsmesh node` processes on loopback (bench/scale.py). Before they start,
bench/scale_load.py writes the archive into their data dirs through the Store
(`chunks.put`, `flush`) and the Catalog's own `add`, 32,768 manifests per
transaction: real manifests with valid UIDs, but no DICOM parsing, no upload, no
compression, and tiny chunks (a unique 256 B header chunk per instance, a 1 KB pixel
chunk shared by a study's instances). Federation: Boston, Denver, Seattle; copies 3;
D 250 miles; gossip 1.0 s; every node holds every study (one data dir loaded, two
copied). Repair: Boston, Dallas, Denver, Seattle, Chicago; copies 2; dead_after_s
10 s; Denver (2/5 of the studies) SIGKILLed. Idle: {idle:g} s, 10 s after every node's
status first calls every study safe; CPU = utime+stime from /proc/PID/stat; bytes =
nftables counters on each node's loopback port (IP bytes, headers included). RPCs:
in-process gRPC client to Boston, median; CLI walls include the process start
(compare `locate`). Ingest: best of 4 puts of 200 instances (10 studies of 20,
128x128). Scrubber off. A wait that ran out says so and shows what it reached."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, nargs="+", default=[10_000])
    ap.add_argument("--instances", type=int, nargs="+", default=[1],
                    help="instances per study: one value for every size, or one per size")
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound on every wait")
    ap.add_argument("--latency-budget-s", type=float, default=60.0,
                    help="time one latency figure may take (at least 3 calls)")
    ap.add_argument("--skip", type=lambda s: set(filter(None, s.split(","))), default=set(),
                    help=f"comma-separated phases to leave out: {','.join(PHASES)}")
    ap.add_argument("--workdir", type=Path, default=Path("/work/benchdata/scale"))
    ap.add_argument("--keep", action="store_true", help="keep the data dirs afterwards")
    ap.add_argument("--label", default="", help="added to the RESULTS.md section title")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: table the sizes' last saved figures (bench/out/scale/)")
    args = ap.parse_args(argv)
    if unknown := args.skip - set(PHASES):
        ap.error(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    if len(args.instances) not in (1, len(args.studies)):
        ap.error("--instances takes one value, or one per --studies value")
    per = args.instances * len(args.studies) if len(args.instances) == 1 else args.instances
    corpora = [Corpus(s, k) for s, k in zip(args.studies, per, strict=True)]
    print(machine_line(), flush=True)
    columns = []
    for corpus in corpora:
        if not args.collect:
            SizeRun(args, corpus, args.workdir / f"{corpus.studies}x{corpus.instances}").run()
        columns.append(load_column(corpus))
    text = METHOD.format(idle=args.idle_s) + "\n\n" + table(columns)
    notes = [f"- {c.studies:,} x {c.instances}: {n}" for c in columns for n in c.notes]
    if notes:
        text += "\n\nNotes:\n" + "\n".join(notes)
    print()
    print(text)
    if args.record:
        title = "Scale: a federation at N studies" + (f" ({args.label})" if args.label else "")
        append_results(title, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
