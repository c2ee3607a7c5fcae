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
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, node_id: str) -> str:
        return f"127.0.0.1:{self.ports[node_id]}"

    def config(self, s: DemoSite) -> Path:
        seeds = [self.address(o.node_id) for o in self.sites if o is not s][:2]
        text = "\n".join([
            "[node]",
            f'id = "{s.node_id}"', f'site = "{s.site}"', f"lat = {s.lat}", f"lon = {s.lon}",
            f'data_dir = "{self.workdir / s.node_id}"',
            f'listen = "{self.address(s.node_id)}"',
            "", "[cluster]",
            "seeds = [" + ", ".join(f'"{x}"' for x in seeds) + "]",
            "gossip_interval_s = 0.5", "dead_after_s = 20", "",
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

        from proto import node_pb2, node_pb2_grpc

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


def run_demo(args: argparse.Namespace) -> int:
    own_dir = not args.dir
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="pacsmesh-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sites = SITES[:1]
    cluster = Cluster(workdir, sites)
    ok = True
    try:
        _say(f"starting {len(sites)} node process(es) in {workdir}")
        for s in sites:
            cluster.start(s)
            print(f"  {s.node_id:<10} {s.site:<10} ({s.lat:.2f}, {s.lon:.2f}) on "
                  f"{cluster.address(s.node_id)}")
        cluster.wait_ready()
        first = cluster.address(sites[0].node_id)

        _say("a modality's study: generating sample CT studies")
        spec = StudySpec(instances=args.instances, study_index=1, seed=int(time.time()) % 10_000)
        study_dir = workdir / "incoming"
        paths = write_study(study_dir, spec)
        print(f"  {len(paths)} instances, {sum(p.stat().st_size for p in paths) / 1e6:.1f} MB")

        _say(f"storing it at {sites[0].site}")
        ok &= _run("put", str(study_dir), "--node", first).returncode == 0
        _say("storing it again: every file is a duplicate, no new bytes")
        _run("put", str(study_dir), "--node", first)

        uid = study_uid(spec)
        _say("what the node holds")
        _run("ls", "--node", first)
        _run("locate", uid, "--node", first)

        _say("restoring the study and comparing every byte with the originals")
        restored = workdir / "restored"
        ok &= _run("get", uid, "--out", str(restored), "--node", first).returncode == 0
        same = _compare(paths, restored / uid)
        print(f"  {same} of {len(paths)} files byte-identical to what was sent")
        ok &= same == len(paths)

        _say("status")
        _run("status", "--node", first)
        if args.keep_running:
            _say("the cluster keeps running; press Ctrl-C to stop every node")
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.poll() is None for p in cluster.procs.values()):
                    time.sleep(1)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    finally:
        _say("stopping every node")
        cluster.stop_all()
        if own_dir and not args.keep_running:
            shutil.rmtree(workdir, ignore_errors=True)
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

