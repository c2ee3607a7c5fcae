"""What trust costs: mutual TLS and the audit trail, beside plaintext, in one run.

    python -m bench.trust [--instances 300] [--runs 3] [--record]

- put and get of one CT study (512x512, 16-bit, realistic noise) through the real
  CLI into one real node: plaintext on loopback vs mutual TLS (operator cert);
- three real nodes (copies 3): put --wait-safe, time until the study is safe,
  plaintext vs TLS (replication and gossip over mutual TLS, proof challenges on);
- the audit trail alone: durable events per second from 1 and 8 threads (group
  commit), beside fsync'd sequential writes of the machine.
Best of `runs`, alternating the two variants, since the machine is shared.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, append_results, machine_line
from pacsmesh.node import pki
from pacsmesh.node.audit import AuditLog, Event
from pacsmesh.sample import StudySpec, study_uid, write_study
from tests.clusterproc import CITIES, cluster_settings
from tests.nodeproc import NodeProc

SITES = (("boston", "Boston"), ("seattle", "Seattle"), ("denver", "Denver"))


def _pki(work: Path) -> Path:
    d = work / "pki"
    if not d.exists():
        pki.init_ca(d)
        for name, _ in SITES:
            pki.issue(d, name, "node", ["127.0.0.1"])
        pki.issue(d, "alice", "operator")
    return d


def _nodes(work: Path, tls: bool, count: int) -> tuple[list[NodeProc], list[str]]:
    d = _pki(work)
    nodes: list[NodeProc] = []
    for name, city in SITES[:count]:
        lat, lon = CITIES[city]
        extra: dict[str, dict[str, Any]] = {"cluster": cluster_settings(
            seeds=[nodes[0].address] if nodes else [])}
        client = None
        if tls:
            extra["tls"] = {"ca_cert": str(d / "ca.pem"), "cert": str(d / f"{name}.pem"),
                            "key": str(d / f"{name}.key")}
            client = (d / "ca.pem", d / "alice.pem", d / "alice.key")
        nodes.append(NodeProc(work / ("tls" if tls else "plain"), node_id=name, site=city,
                              lat=lat, lon=lon, extra=extra, tls_client=client))
    args = (["--ca", str(d / "ca.pem"), "--cert", str(d / "alice.pem"), "--key",
             str(d / "alice.key")] if tls else [])
    return nodes, args


def _cli(args: list[str]) -> float:
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pacsmesh.cli", *args], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed: {res.stdout}\n{res.stderr}")
    return time.perf_counter() - started


def single_node(study: Path, uid: str, work: Path, tls: bool) -> tuple[float, float]:
    nodes, creds = _nodes(work, tls, 1)
    node = nodes[0]
    node.start()
    try:
        put_s = _cli(["put", str(study), "--node", node.address, *creds])
        out = work / "out"
        get_s = _cli(["get", uid, "--out", str(out), "--node", node.address, *creds])
        shutil.rmtree(out, ignore_errors=True)
        return put_s, get_s
    finally:
        node.stop()
        shutil.rmtree(node.workdir, ignore_errors=True)


def three_sites(study: Path, work: Path, tls: bool) -> float:
    nodes, creds = _nodes(work, tls, 3)
    try:
        for n in nodes:
            n.start(wait=False)
        for n in nodes:
            n.wait_ready()
        time.sleep(2)  # members meet: the timing starts from a formed cluster
        return _cli(["put", str(study), "--wait-safe", "300", "--node", nodes[0].address,
                     *creds])
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(nodes[0].workdir, ignore_errors=True)


def audit_rate(work: Path, threads: int, seconds: float = 2.0) -> float:
    log = AuditLog(work / f"audit{threads}")
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def writer(i: int) -> None:
        while time.monotonic() < stop:
            log.record(Event(time=time.time(), who="AE:CT1", role="dicom", address="x",
                             action="C-STORE", outcome="ok", study_uid="1.2.3", instances=1))
            counts[i] += 1
    ts = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log.close()
    return sum(counts) / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trust-", dir=OUT_DIR))
    try:
        spec = StudySpec(study_index=1, instances=args.instances, seed=42)
        write_study(work / "study", spec)
        mb = sum(p.stat().st_size for p in (work / "study").rglob("*.dcm")) / 1e6
        best: dict[str, float] = {}
        for _ in range(args.runs):
            for tls in (False, True):
                tag = "tls" if tls else "plain"
                put_s, get_s = single_node(work / "study", study_uid(spec), work, tls)
                safe_s = three_sites(work / "study", work, tls)
                for k, v in ((f"put_{tag}", put_s), (f"get_{tag}", get_s),
                             (f"safe_{tag}", safe_s)):
                    best[k] = min(best.get(k, float("inf")), v)
        a1, a8 = audit_rate(work, 1), audit_rate(work, 8)
        lines = [
            f"{args.instances} CT instances, {mb:.0f} MB; best of {args.runs}, same run",
            "| what | plaintext | mutual TLS | TLS / plaintext |",
            "|---|---|---|---|",
        ]
        for key, what in (("put", "put, one node"), ("get", "get, one node"),
                          ("safe", "put --wait-safe, 3 sites")):
            p, t = best[f"{key}_plain"], best[f"{key}_tls"]
            lines.append(f"| {what} | {p:.2f} s ({mb / p:.0f} MB/s) | {t:.2f} s "
                         f"({mb / t:.0f} MB/s) | {p / t:.2f}x throughput |")
        lines.append(f"\naudit trail, durable events/s: {a1:.0f} from 1 thread, {a8:.0f} from "
                     "8 threads (group commit: one fdatasync per batch)")
        text = "\n".join(lines)
        print(f"Machine: {machine_line()}\n{text}")
        if args.record:
            append_results("Trust: the cost of mutual TLS and the audit trail", text)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
