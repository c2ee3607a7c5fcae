"""`pacsmesh demo`: real node processes on loopback, sample studies, the CLI at work.

Every step runs the same `pacsmesh` commands an operator would type, and prints
them, so the demo doubles as a walkthrough.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pacsmesh.sample import StudySpec, study_uid, write_study

READY_TIMEOUT_S = 30.0
GOSSIP_INTERVAL_S = 0.3
DEAD_AFTER_S = 6  # production default is 600 s; short so the demo shows healing
SAFE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoSite:
    node_id: str
    site: str
    lat: float
    lon: float


# Real US coordinates. Boston and New York are ~190 miles apart: closer than the
# 250-mile rule, so they never count as two safe copies of one study.
SITES = (
    DemoSite("boston-1", "Boston", 42.3601, -71.0589),
    DemoSite("newyork-1", "New York", 40.7128, -74.0060),
    DemoSite("chicago-1", "Chicago", 41.8781, -87.6298),
    DemoSite("denver-1", "Denver", 39.7392, -104.9903),
    DemoSite("seattle-1", "Seattle", 47.6062, -122.3321),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ pacsmesh {shown}", flush=True)
    res = subprocess.run([sys.executable, "-m", "pacsmesh.cli", *args], text=True,
                         capture_output=True, check=False)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        print(out, flush=True)
    return res


class Cluster:
    def __init__(self, workdir: Path, sites: tuple[DemoSite, ...]) -> None:
        self.workdir = workdir
        self.sites = sites
        self.ports = {s.node_id: _free_port() for s in sites}
        self.web_ports = {s.node_id: _free_port() for s in sites}  # status page, /metrics
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, node_id: str) -> str:
        return f"127.0.0.1:{self.ports[node_id]}"

    def web(self, node_id: str) -> str:
        return f"127.0.0.1:{self.web_ports[node_id]}"

    def config(self, s: DemoSite) -> Path:
        seeds = [self.address(o.node_id) for o in self.sites if o is not s][:2]
        text = "\n".join([
            "[node]",
            f'id = "{s.node_id}"', f'site = "{s.site}"', f"lat = {s.lat}", f"lon = {s.lon}",
            f'data_dir = "{self.workdir / s.node_id}"',
            f'listen = "{self.address(s.node_id)}"',
            "", "[cluster]",
            "seeds = [" + ", ".join(f'"{x}"' for x in seeds) + "]",
            f"gossip_interval_s = {GOSSIP_INTERVAL_S}", f"dead_after_s = {DEAD_AFTER_S}", "",
            "[metrics]", f'listen = "{self.web(s.node_id)}"', "",
        ])
        path = self.workdir / f"{s.node_id}.toml"
        path.write_text(text)
        return path

    def start(self, s: DemoSite) -> None:
        log = open(self.workdir / f"{s.node_id}.log", "ab")  # noqa: SIM115 - child owns it
        self.procs[s.node_id] = subprocess.Popen(
            [sys.executable, "-m", "pacsmesh.cli", "node", "--config", str(self.config(s))],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def wait_ready(self) -> None:
        import grpc

        from pacsmesh.proto import node_pb2, node_pb2_grpc

        deadline = time.monotonic() + READY_TIMEOUT_S
        for node_id, proc in self.procs.items():
            while True:
                if proc.poll() is not None:
                    log = (self.workdir / f"{node_id}.log").read_text()[-2000:]
                    raise RuntimeError(f"{node_id} exited:\n{log}")
                try:
                    with grpc.insecure_channel(self.address(node_id)) as ch:
                        node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{node_id} did not start") from None
                    time.sleep(0.2)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _locate(address: str, uid: str) -> dict[str, object]:
    import json

    res = subprocess.run([sys.executable, "-m", "pacsmesh.cli", "locate", uid, "--json",
                          "--node", address], capture_output=True, text=True, check=False)
    doc: dict[str, object] = json.loads(res.stdout) if res.returncode == 0 else {}
    return doc


def _settled(address: str, timeout_s: float = 15.0) -> None:
    """Until `status` agrees no study is unsafe: its counts follow the holders' reports,
    which can trail what `locate` just saw by a gossip round or two."""
    import json

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        res = subprocess.run([sys.executable, "-m", "pacsmesh.cli", "status", "--json",
                              "--node", address], capture_output=True, text=True, check=False)
        if res.returncode == 0 and json.loads(res.stdout).get("unsafe_studies") == 0:
            return
        time.sleep(0.5)


def _wait_safe(address: str, uid: str, timeout_s: float = SAFE_TIMEOUT_S) -> bool:
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout_s:
        doc = _locate(address, uid)
        holders = doc.get("holders", [])
        assert isinstance(holders, list)
        line = (f"  {time.monotonic() - started:5.1f} s: {doc.get('safe_copies', 0)} of "
                f"{doc.get('required_copies', 3)} safe copies at "
                + (", ".join(str(h["site"]) for h in holders) or "-"))
        if line.split(": ", 1)[1] != last:
            print(line, flush=True)
            last = line.split(": ", 1)[1]
        if doc.get("safe"):
            return True
        time.sleep(0.3)
    return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(args: argparse.Namespace) -> int:
    # the nodes run in sessions of their own: SIGTERM (or SIGINT, even where a shell
    # started us with it ignored) must still reach the code that stops them
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    own_dir = not args.dir
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="pacsmesh-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sites = SITES
    cluster = Cluster(workdir, sites)
    ok = True
    interrupted = False
    try:
        _say(f"starting {len(sites)} sites, each a real node process, in {workdir}")
        for s in sites:
            cluster.start(s)
            print(f"  {s.node_id:<10} {s.site:<10} ({s.lat:.2f}, {s.lon:.2f}) on "
                  f"{cluster.address(s.node_id)}; status page http://{cluster.web(s.node_id)}/")
        print("  Boston and New York are ~190 miles apart: they never count as two of the "
              "3 copies, which must be >= 250 miles apart")
        cluster.wait_ready()
        boston = cluster.address("boston-1")
        time.sleep(3 * GOSSIP_INTERVAL_S * 4)  # let gossip spread the member table
        _run("status", "--node", boston)

        _say("a modality's study arrives at Boston")
        spec = StudySpec(instances=args.instances, study_index=1, seed=int(time.time()) % 10_000)
        study_dir = workdir / "incoming"
        paths = write_study(study_dir, spec)
        print(f"  {len(paths)} CT instances, {sum(p.stat().st_size for p in paths) / 1e6:.1f} MB")
        ok &= _run("put", str(study_dir), "--node", boston).returncode == 0
        uid = study_uid(spec)

        _say("watching it become safe: 3 copies at sites pairwise >= 250 miles apart")
        ok &= _wait_safe(boston, uid)
        _run("locate", uid, "--node", cluster.address("seattle-1"))

        found = _locate(boston, uid).get("holders", [])
        assert isinstance(found, list)
        holders = [str(h["node"]) for h in found if h["node"] != "boston-1"]
        victim = holders[0] if holders else "denver-1"
        _say(f"disaster: {victim} dies (kill -9); after {DEAD_AFTER_S} s the others declare it "
             "dead and re-create its copies elsewhere")
        cluster.procs[victim].kill()
        cluster.procs[victim].wait(10)
        time.sleep(DEAD_AFTER_S + 1)
        ok &= _wait_safe(boston, uid)
        _settled(boston)
        _run("status", "--node", boston)

        _say("restoring the study from Seattle and comparing every byte with the originals")
        restored = workdir / "restored"
        seattle = cluster.address("seattle-1")
        ok &= _run("get", uid, "--out", str(restored), "--node", seattle).returncode == 0
        same = _compare(paths, restored / uid)
        print(f"  {same} of {len(paths)} files byte-identical to what Boston received")
        ok &= same == len(paths)

        _say(f"{victim} comes back: extra copies are trimmed only once it holds verified "
             "copies again (make before break)")
        site = next(s for s in sites if s.node_id == victim)
        cluster.start(site)
        time.sleep(DEAD_AFTER_S)
        _run("locate", uid, "--node", boston)
        _run("ls", "--node", boston)
        if args.keep_running:
            _say("the cluster keeps running; press Ctrl-C to stop every node")
            print(f"  open http://{cluster.web('boston-1')}/ in a browser (every node has "
                  f"one), or run: pacsmesh status --watch --node {boston}")
            with contextlib.suppress(KeyboardInterrupt):
                while any(p.poll() is None for p in cluster.procs.values()):
                    time.sleep(1)
    except KeyboardInterrupt:
        interrupted = True  # (Ctrl-C in --keep-running's final wait ends it normally)
        print("\ninterrupted", flush=True)
    finally:
        _say("stopping every node")
        cluster.stop_all()
        if own_dir and not args.keep_running:
            shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        print("\ndemo interrupted before it finished", flush=True)
        return 130
    print("\ndemo " + ("succeeded" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


def _compare(originals: list[Path], restored_study: Path) -> int:
    import pydicom

    by_sop = {p.stem: p for p in restored_study.rglob("*.dcm")}
    same = 0
    for path in originals:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        other = by_sop.get(sop)
        if other is not None and filecmp.cmp(path, other, shallow=False):
            same += 1
    return same

