"""Time until a study of >= 1 GB has 3 safe copies on a local 3-site cluster, beside
rsync copying the same files to two destinations, in the same run.

    python -m bench.replication [--instances 2000] [--record]

pacsmesh: three real node processes (Boston, Chicago, Denver: pairwise >= 250
miles), `pacsmesh put DIR --wait-safe` at Boston; the clock stops when the CLI
returns, i.e. when every instance is durable at Boston and `locate` reports the
study safe (verified full copies at all three sites).
rsync: a real rsync daemon on loopback with two modules; `rsync -a` (and
`rsync -az`) of the same folder to both, one after the other, as a site
would script an off-site copy. rsync verifies nothing after the copy and
stores the files uncompressed; pacsmesh verifies every chunk at every hop.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT_DIR, append_results, machine_line, mb_s
from pacsmesh.sample import StudySpec, write_study
from tests.nodeproc import NodeProc, free_port

SITES = (("boston", "Boston", 42.3601, -71.0589), ("chicago", "Chicago", 41.8781, -87.6298),
         ("denver", "Denver", 39.7392, -104.9903))


def pacsmesh_run(study: Path, work: Path) -> float:
    nodes: list[NodeProc] = []
    try:
        seed = ""
        for node_id, site, lat, lon in SITES:
            node = NodeProc(work / "cluster", node_id=node_id, site=site, lat=lat, lon=lon)
            node.extra = {"cluster": {"seeds": [seed or node.address],
                                      "gossip_interval_s": 0.2, "dead_after_s": 30}}
            seed = seed or node.address
            nodes.append(node.start())
        time.sleep(2)  # let membership converge before the clock starts
        started = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "pacsmesh.cli", "put", str(study), "--wait-safe", "600",
             "--json", "--node", nodes[0].address], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if res.returncode != 0:
            raise RuntimeError(f"put --wait-safe failed: {res.stdout[-2000:]}\n{res.stderr}")
        return seconds
    finally:
        for node in nodes:
            node.stop()


def rsync_run(study: Path, work: Path, compress: bool) -> float:
    dests = [work / "dest1", work / "dest2"]
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    port = free_port()
    conf = work / "rsyncd.conf"
    conf.write_text("\n".join([
        "use chroot = no", "uid = 0", "gid = 0", f"pid file = {work / 'rsyncd.pid'}",
        *(f"[d{i}]\npath = {d}\nread only = false" for i, d in enumerate(dests)), ""]))
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                               f"--port={port}", "--address=127.0.0.1"])
    try:
        time.sleep(0.5)
        flags = "-az" if compress else "-a"
        started = time.perf_counter()
        for i in range(len(dests)):
            subprocess.run(["rsync", flags, f"{study}/", f"rsync://127.0.0.1:{port}/d{i}/"],
                           check=True)
        return time.perf_counter() - started
    finally:
        daemon.terminate()
        daemon.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("rsync") is None:
        print("rsync is not installed (Debian package rsync)", file=sys.stderr)
        return 1
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="repl-", dir=OUT_DIR))
    try:
        study = work / "study"
        paths = write_study(study, StudySpec(instances=args.instances, study_index=1, seed=11))
        total = sum(p.stat().st_size for p in paths)
        print(f"study: {len(paths)} instances, {total / 1e9:.2f} GB", flush=True)
        pm = pacsmesh_run(study, work)
        print(f"pacsmesh: {pm:.1f} s", flush=True)
        rs = rsync_run(study, work, compress=False)
        print(f"rsync -a to two destinations: {rs:.1f} s", flush=True)
        rz = rsync_run(study, work, compress=True)
        print(f"rsync -az to two destinations: {rz:.1f} s", flush=True)
        text = "\n".join([
            f"{len(paths)} CT instances, {total / 1e9:.2f} GB; three sites on loopback.",
            "",
            "| what | seconds | MB/s of study |",
            "|---|---|---|",
            f"| pacsmesh: put at Boston until 3 safe copies (verified at every site) | {pm:.1f} "
            f"| {mb_s(total, pm):.0f} |",
            f"| rsync -a to two rsync daemons, one after the other | {rs:.1f} | "
            f"{mb_s(total, rs):.0f} |",
            f"| rsync -az to two rsync daemons | {rz:.1f} | {mb_s(total, rz):.0f} |",
            "",
            f"pacsmesh vs rsync -a: {rs / pm:.2f}x; vs rsync -az: {rz / pm:.2f}x "
            "(> 1 means pacsmesh is faster).",
        ])
        print()
        print(machine_line())
        print(text)
        if args.record:
            append_results("Replication: 3 safe copies vs rsync", text)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
