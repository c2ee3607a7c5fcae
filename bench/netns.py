"""Sites in their own Linux network namespaces behind rate-limited links, for WAN benchmarks.

    with WanHarness(rate_mbit=200) as wan:
        nodes = wan.start_nodes(workdir)            # one `pacsmesh node` per site
        before = wan.counters()
        wan.run("boston", [PYTHON, "-m", "pacsmesh.cli", "put", ...])
        used = wan.counters() - before               # bytes on the wire per site

Topology: a bridge in the root namespace; each site is a namespace with one veth
pair, its outer end enslaved to the bridge, its inner end carrying the site's
address. A site's link is shaped with `tc tbf` on the egress of both veth ends:
the inner end limits what the site sends (its uplink), the outer end what it
receives (its downlink). Every byte between two sites crosses the sender's uplink
and the receiver's downlink, as on two leased lines meeting at an exchange.

What this does not model: propagation delay (netem is not available here, so
the RTT between namespaces is tens of microseconds, not Boston-Seattle's ~70 ms),
loss, and cross traffic. A protocol that needs many round trips looks better
here than on a real WAN.

The root namespace holds an address on the bridge so that a driver there can
reach the sites (status calls); that traffic is shaped like any other and is
counted in the per-site figures, so drivers should keep it small.

Everything is undone on exit, on an exception, on SIGTERM and at interpreter
exit: node processes (and anything else started in a site namespace), the
namespaces, the veth pairs and the bridge. A harness holds a lock file named
after its prefix while it is up, so two runs with the same names (a benchmark
and a test suite started by someone else) wait for each other instead of
tearing each other down; a harness left over from a killed run (same names, no
live lock holder) is removed before a new one is built.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import grpc

from pacsmesh.proto import node_pb2, node_pb2_grpc
from tests.nodeproc import write_config

PYTHON = sys.executable
NODE_PORT = 7400
RSYNC_PORT = 873
LOCK_DIR = Path("/run/lock")
LOCK_WAIT_S = 900.0  # a whole benchmark run may hold the names


@dataclass(frozen=True)
class Site:
    name: str  # short, lower case: namespace and interface names derive from it
    city: str
    lat: float
    lon: float


# Real coordinates; pairwise great-circle distances: Boston-Denver ~1,770 mi,
# Boston-Seattle ~2,490 mi, Denver-Seattle ~1,020 mi (all >= 250).
SITES: tuple[Site, ...] = (
    Site("boston", "Boston", 42.3601, -71.0589),
    Site("seattle", "Seattle", 47.6062, -122.3321),
    Site("denver", "Denver", 39.7392, -104.9903),
)


def unavailable() -> str:
    """Why the harness cannot run here ("" when it can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and tc need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package iproute2)"
    probe = "pmprobe" + str(os.getpid())
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        return f"`ip netns add` fails here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return ""


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}: {res.stderr.strip()}")
    return res


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf at `rate_mbit`: a bucket of 10 ms at the rate (>= 64 KiB so a GSO segment
    fits) and up to 100 ms of queue before tail drop."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(64 * 1024, int(rate_bytes * 0.010))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms"]


@dataclass
class Counters:
    """Bytes on the wire per site: up = sent by the site, down = received by it."""

    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)

    def __sub__(self, other: Counters) -> Counters:
        return Counters({k: v - other.up.get(k, 0) for k, v in self.up.items()},
                        {k: v - other.down.get(k, 0) for k, v in self.down.items()})

    def table(self, names: Sequence[str]) -> list[str]:
        rows = ["| site | sent (up), MB | received (down), MB |", "|---|---|---|"]
        rows += [f"| {n} | {self.up.get(n, 0) / 1e6:.1f} | {self.down.get(n, 0) / 1e6:.1f} |"
                 for n in names]
        return rows


@dataclass
class SiteNode:
    """One `pacsmesh node` process inside a site namespace."""

    site: Site
    ns: str
    ip: str
    workdir: Path
    extra: dict[str, dict[str, Any]]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def node_id(self) -> str:
        return f"{self.site.name}-1"

    @property
    def address(self) -> str:
        return f"{self.ip}:{NODE_PORT}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.node_id}.log"

    def config(self) -> Path:
        sections: dict[str, dict[str, Any]] = {"node": {
            "id": self.node_id, "site": self.site.city, "lat": self.site.lat,
            "lon": self.site.lon, "data_dir": str(self.workdir / f"{self.node_id}-data"),
            "listen": self.address}}
        for name, values in self.extra.items():
            sections.setdefault(name, {}).update(values)
        return write_config(self.workdir / f"{self.node_id}.toml", sections)

    def start(self) -> SiteNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, PYTHON, "-m", "pacsmesh.cli", "node",
                 "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                self.status(timeout_s=2)
                return
            except grpc.RpcError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.node_id} not ready:\n{self.log_tail()}")

    def status(self, timeout_s: float = 5.0) -> node_pb2.StatusReply:
        with grpc.insecure_channel(self.address) as ch:
            reply: node_pb2.StatusReply = node_pb2_grpc.NodeApiStub(ch).Status(
                node_pb2.StatusRequest(), timeout=timeout_s)
            return reply

    def cpu_seconds(self) -> float:
        """User + system CPU of the node process so far (0 when it is gone)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


_LIVE: list[WanHarness] = []


def _cleanup_all() -> None:
    for h in list(_LIVE):
        h.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `with WanHarness` and atexit


class WanHarness:
    """One namespace per site, a bridge between them, every link shaped by tbf."""

    def __init__(self, rate_mbit: float, sites: Sequence[Site] = SITES, *,
                 prefix: str = "pm", subnet: str = "10.77.0") -> None:
        if len(prefix) > 4:
            raise ValueError("prefix: at most 4 characters (interface names are short)")
        self.rate_mbit = rate_mbit
        self.sites = list(sites)
        self.prefix = prefix
        self.subnet = subnet
        self.bridge = f"{prefix}br0"
        self.root_ip = f"{subnet}.254"
        self.nodes: list[SiteNode] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._up = False
        self._lock: Any = None

    # ---- names ----------------------------------------------------------------------------

    def ns(self, site: str) -> str:
        return f"{self.prefix}-{site}"

    def ip(self, site: str) -> str:
        return f"{self.subnet}.{self._index(site) + 1}"

    def host_veth(self, site: str) -> str:
        return f"{self.prefix}v{self._index(site)}"  # in the root namespace

    def _index(self, site: str) -> int:
        return next(i for i, s in enumerate(self.sites) if s.name == site)

    # ---- building and tearing down --------------------------------------------------------

    def __enter__(self) -> WanHarness:
        self.open()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> WanHarness:
        why = unavailable()
        if why:
            raise RuntimeError(f"the WAN harness cannot run here: {why}")
        if not _LIVE:
            atexit.register(_cleanup_all)
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _on_sigterm)
        _LIVE.append(self)
        self._take_lock()
        self._teardown()  # leftovers of a killed run with the same names
        self._up = True
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for site in self.sites:
            ns, outer, inner = self.ns(site.name), self.host_veth(site.name), "wan0"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", f"{outer}i")
            _sh("ip", "link", "set", f"{outer}i", "netns", ns)
            _sh("ip", "-n", ns, "link", "set", f"{outer}i", "name", inner)
            _sh("ip", "link", "set", outer, "master", self.bridge)
            _sh("ip", "link", "set", outer, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip(site.name)}/24", "dev", inner)
            _sh("ip", "-n", ns, "link", "set", inner, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.set_rate(self.rate_mbit)
        return self

    def _take_lock(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        f = open(LOCK_DIR / f"pacsmesh-netns-{self.prefix}.lock", "w")  # noqa: SIM115
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.close()
                    raise TimeoutError(f"another WAN harness with prefix {self.prefix!r} "
                                       f"has been up for {LOCK_WAIT_S:g} s") from None
                time.sleep(0.5)
        self._lock = f

    def set_rate(self, rate_mbit: float) -> None:
        """(Re)shape every site's link at `rate_mbit`, both directions."""
        self.rate_mbit = rate_mbit
        for site in self.sites:
            _sh("tc", "qdisc", "replace", "dev", self.host_veth(site.name), "root",
                *tbf_args(rate_mbit))
            _sh("tc", "-n", self.ns(site.name), "qdisc", "replace", "dev", "wan0", "root",
                *tbf_args(rate_mbit))

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self.nodes, self.procs = [], []
        if self._up:
            self._teardown()
            self._up = False
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        if self in _LIVE:
            _LIVE.remove(self)

    def _teardown(self) -> None:
        for site in self.sites:
            ns = self.ns(site.name)
            if not Path(f"/run/netns/{ns}").exists():
                continue
            # whatever still runs in our namespace was started by a harness of ours
            pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", ns, check=False)  # takes its veth pair along
        for site in self.sites:
            _sh("ip", "link", "del", self.host_veth(site.name), check=False)
        _sh("ip", "link", "del", self.bridge, check=False)

    # ---- processes in a site ----------------------------------------------------------------

    def command(self, site: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(site), *argv]

    def popen(self, site: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start `argv` in the site's namespace; it is killed when the harness closes."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.command(site, argv), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def run(self, site: str, argv: Sequence[str], timeout_s: float = 1800,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(site, argv), capture_output=True, text=True,
                              timeout=timeout_s, check=False)

    def start_nodes(self, workdir: Path, cluster: dict[str, Any] | None = None,
                    timeout_s: float = 60.0, transfer: dict[str, Any] | None = None
                    ) -> list[SiteNode]:
        """A pacsmesh node per site, the first one every other's seed; returns once every
        node sees all of them alive."""
        seed = f"{self.ip(self.sites[0].name)}:{NODE_PORT}"
        settings = {"seeds": [seed], "copies": 3, "min_distance_miles": 250.0,
                    "gossip_interval_s": 0.2, "dead_after_s": 30, **(cluster or {})}
        # plaintext like the rsync daemons it is compared with (a namespace address is
        # not loopback, so the node wants TLS or this explicit waiver)
        nodes = [SiteNode(s, self.ns(s.name), self.ip(s.name), workdir,
                          {"cluster": dict(settings), "tls": {"insecure": True},
                           "transfer": dict(transfer or {})})
                 for s in self.sites]
        self.nodes.extend(nodes)
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_ready()
        deadline = time.monotonic() + timeout_s
        while True:
            views = [[m.state for m in n.status().nodes] for n in nodes]
            if all(len(v) == len(nodes) and all(s == "alive" for s in v) for v in views):
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"membership did not converge: {views}")
            time.sleep(0.2)

    def stop_nodes(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    # ---- the wire -----------------------------------------------------------------------------

    def counters(self) -> Counters:
        """Bytes through each site's link so far, read on the root-side veth end."""
        c = Counters()
        for site in self.sites:
            base = Path("/sys/class/net") / self.host_veth(site.name) / "statistics"
            # the root end receives what the site sends and transmits what it receives
            c.up[site.name] = int((base / "rx_bytes").read_text())
            c.down[site.name] = int((base / "tx_bytes").read_text())
        return c

    # ---- rsync daemons ----------------------------------------------------------------------

    def start_rsyncd(self, site: str, module_dir: Path, work: Path) -> str:
        """An rsync daemon in `site` serving `module_dir` writable as module `d`; returns
        the rsync:// URL of the module."""
        work.mkdir(parents=True, exist_ok=True)
        module_dir.mkdir(parents=True, exist_ok=True)
        conf = work / f"rsyncd-{site}.conf"
        conf.write_text("\n".join([
            "use chroot = no", "uid = 0", "gid = 0", f"pid file = {work / f'rsyncd-{site}.pid'}",
            f"[d]\npath = {module_dir}\nread only = false", ""]))
        self.popen(site, ["rsync", "--daemon", "--no-detach", f"--config={conf}",
                          f"--port={RSYNC_PORT}", f"--address={self.ip(site)}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"rsync://{self.ip(site)}:{RSYNC_PORT}/d/"
        deadline = time.monotonic() + 10
        while self.run(self.sites[0].name, ["rsync", url]).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsync daemon in {site} did not come up")
            time.sleep(0.1)
        return url


@contextlib.contextmanager
def harness(rate_mbit: float, **kw: Any) -> Iterator[WanHarness]:
    with WanHarness(rate_mbit, **kw) as h:
        yield h
