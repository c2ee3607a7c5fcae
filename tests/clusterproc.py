"""Several real `pacsmesh node` processes on loopback, federated by gossip, for tests.

Builds on tests/nodeproc.py: each member is a NodeProc at a real US city with
short cluster timings, so suspicion, death, healing and trimming all happen in
seconds. Helpers here poll with bounded deadlines (never a bare sleep) and read
a node's view straight over gRPC when a loop must be faster than a CLI process.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pydicom

from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.sample import StudySpec, study_uid, write_study
from tests.nodeproc import NodeProc

T = TypeVar("T")

# name -> (lat, lon)
CITIES: dict[str, tuple[float, float]] = {
    "Boston": (42.3601, -71.0589),
    "New York": (40.7128, -74.0060),  # ~190 miles from Boston: closer than 250
    "Chicago": (41.8781, -87.6298),
    "Denver": (39.7392, -104.9903),
    "Seattle": (47.6062, -122.3321),
    "Atlanta": (33.7490, -84.3880),
}

GOSSIP_INTERVAL_S = 0.2
SUSPECT_AFTER_S = 5 * GOSSIP_INTERVAL_S  # the default: five silent rounds
DEAD_AFTER_S = 4.0
PARTITIONS = 64
POLL_S = 0.2
API_TIMEOUT_S = 5.0


def cluster_settings(**overrides: Any) -> dict[str, Any]:
    """The [cluster] section every test member shares, with overrides."""
    settings: dict[str, Any] = {
        "gossip_interval_s": GOSSIP_INTERVAL_S,
        "dead_after_s": DEAD_AFTER_S,
        "partitions": PARTITIONS,
        "copies": 3,
        "min_distance_miles": 250.0,
    }
    settings.update(overrides)
    return settings


class Broken(Exception):
    """Raised by a polled check for what must never happen: ends the wait at once."""


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str,
             interval_s: float = POLL_S) -> T:
    """Polls ``check`` until it returns something truthy, at most ``timeout_s``.

    ``check`` may raise AssertionError while the condition does not hold yet;
    the last failure is reported on timeout."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            got = check()
        except (AssertionError, grpc.RpcError) as exc:
            got, last = None, exc
        else:
            last = got
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; "
                                 f"last: {last!r}")
        time.sleep(interval_s)


# ---- a node's view over gRPC (for tight polling loops) ----------------------------------


def api_status(address: str) -> node_pb2.StatusReply:
    with grpc.insecure_channel(address) as ch:
        reply: node_pb2.StatusReply = node_pb2_grpc.NodeApiStub(ch).Status(
            node_pb2.StatusRequest(), timeout=API_TIMEOUT_S)
        return reply


def api_locate(address: str, uid: str) -> node_pb2.LocateReply:
    with grpc.insecure_channel(address) as ch:
        reply: node_pb2.LocateReply = node_pb2_grpc.NodeApiStub(ch).Locate(
            node_pb2.LocateRequest(study_uid=uid), timeout=API_TIMEOUT_S)
        return reply


def api_locate_many(address: str, uids: list[str]) -> dict[str, node_pb2.LocateReply]:
    with grpc.insecure_channel(address) as ch:
        stub = node_pb2_grpc.NodeApiStub(ch)
        return {uid: stub.Locate(node_pb2.LocateRequest(study_uid=uid), timeout=API_TIMEOUT_S)
                for uid in uids}


def states(status: node_pb2.StatusReply | dict[str, Any]) -> dict[str, str]:
    """node id -> state, from a StatusReply or a `status --json` document."""
    if isinstance(status, dict):
        return {n["id"]: n["state"] for n in status["nodes"]}
    return {n.id: n.state for n in status.nodes}


def alert_codes(status: node_pb2.StatusReply | dict[str, Any]) -> list[str]:
    if isinstance(status, dict):
        return [a["code"] for a in status["alerts"]]
    return [a.code for a in status.alerts]


def holder_ids(located: node_pb2.LocateReply | dict[str, Any]) -> frozenset[str]:
    if isinstance(located, dict):
        return frozenset(h["node"] for h in located["holders"])
    return frozenset(h.node for h in located.holders)


# ---- studies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    uid: str
    folder: Path
    instances: int
    by_sop: dict[str, bytes]  # SOP instance UID -> sha256 of the file as written

    def check_restored(self, out: Path) -> None:
        """``out`` holds exactly this study, byte for byte, as out/STUDY/SERIES/SOP.dcm."""
        files = sorted((out / self.uid).glob("*/*.dcm"))
        got = {f.stem: hashlib.sha256(f.read_bytes()).digest() for f in files}
        assert set(got) == set(self.by_sop), (sorted(got), sorted(self.by_sop))
        for sop, digest in self.by_sop.items():
            assert got[sop] == digest, f"instance {sop} differs from what was stored"
        for f in files:  # the layout is STUDY/SERIES/SOP.dcm
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                    str(ds.SOPInstanceUID)) == (self.uid, f.parent.name, f.stem)


def make_study(root: Path, index: int, instances: int = 4, seed: int = 77) -> Study:
    """A small synthetic CT study (128x128) in its own folder."""
    spec = StudySpec(study_index=index, instances=instances, rows=128, columns=128, seed=seed)
    folder = root / f"study-{seed}-{index}"
    paths = write_study(folder, spec)
    by_sop = {}
    for p in paths:
        sop = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        by_sop[sop] = hashlib.sha256(p.read_bytes()).digest()
    return Study(study_uid(spec), folder, instances, by_sop)


# ---- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """Members at named cities; the first one added is every later member's seed."""

    workdir: Path
    members: list[NodeProc] = field(default_factory=list)

    def add(self, node_id: str, city: str, *, seeds: list[str] | None = None,
            node: dict[str, Any] | None = None, **cluster: Any) -> NodeProc:
        lat, lon = CITIES[city]
        if seeds is None:
            seeds = [self.members[0].address] if self.members else []
        extra: dict[str, dict[str, Any]] = {
            "cluster": cluster_settings(seeds=seeds, **cluster)}
        if node:
            extra["node"] = node
        member = NodeProc(self.workdir, node_id=node_id, site=city, lat=lat, lon=lon,
                          extra=extra)
        self.members.append(member)
        return member

    def start(self) -> Cluster:
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_ready()
        return self

    def by_id(self, node_id: str) -> NodeProc:
        return next(m for m in self.members if m.node_id == node_id)

    def running(self) -> list[NodeProc]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None]

    def wait_converged(self, timeout_s: float = 20.0) -> None:
        """Every running member sees every running member alive."""
        want = len(self.running())

        def converged() -> bool:
            for m in self.running():
                seen = states(api_status(m.address))
                alive = [s for s in seen.values() if s == "alive"]
                assert len(alive) == want, (m.node_id, seen)
            return True

        wait_for(converged, timeout_s, f"{want} members to see each other alive")

    def stop(self) -> None:
        """SIGTERM to all at once, then wait; SIGKILL whatever does not go."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(20)
            except subprocess.TimeoutExpired:
                m.kill()

    def dump_logs(self) -> None:
        """Printed, so pytest shows them only when a test fails."""
        for m in self.members:
            print(f"===== {m.node_id} ({m.site}) {m.address} =====\n{m.log()}")


@contextlib.contextmanager
def started(c: Cluster) -> Iterator[Cluster]:
    """Starts the members; always stops them; shows their logs if the test failed."""
    failed = True
    try:
        c.start()
        yield c
        failed = False
    finally:
        c.stop()
        if failed:
            c.dump_logs()


@contextlib.contextmanager
def cluster_of(workdir: Path, *cities: tuple[str, str]) -> Iterator[Cluster]:
    """A started cluster of (node id, city) members; always stopped afterwards."""
    c = Cluster(workdir)
    for node_id, city in cities:
        c.add(node_id, city)
    with started(c):
        yield c
