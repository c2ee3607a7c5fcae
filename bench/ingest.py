"""`pacsmesh put` ingest throughput beside the machine's limits and Orthanc, in one run.

    python -m bench.ingest [--instances 500] [--runs 3] [--record]

What it measures, on the same synthetic CT study (512x512, 16-bit):
- pacsmesh: a real node process and the real CLI (`pacsmesh put DIR --json`),
  wall time of the whole command (process start included), fresh data dir each run;
- the machine: blake3 (one thread), zstd-1 compress, fsync'd sequential write;
- Orthanc (Debian's package) ingesting the same files over REST on one
  keep-alive connection, a fresh server each run.
Best of `runs` for each, since the machine is shared: ratios are what count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT_DIR, append_results, machine_line, mb_s
from bench.limits import blake3_mb_s, fsync_write_mb_s, zstd_compress_mb_s
from bench.orthanc import OrthancServer, orthanc_rest_ingest
from pacsmesh.sample import StudySpec, write_study
from tests.nodeproc import NodeProc


def pacsmesh_put(paths_dir: Path, work: Path, run: int) -> tuple[float, dict[str, object]]:
    node = NodeProc(work / f"run{run}", node_id=f"bench{run}")
    node.start()
    try:
        started = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "pacsmesh.cli", "put", str(paths_dir), "--json",
             "--node", node.address], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if res.returncode != 0:
            raise RuntimeError(f"put failed: {res.stdout}\n{res.stderr}")
        doc: dict[str, object] = json.loads(res.stdout)
        return seconds, doc
    finally:
        node.stop()
        shutil.rmtree(node.workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--noise", type=float, default=12.0,
                    help="HU of noise outside the body (12: compresses like real CT)")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=OUT_DIR))
    try:
        study = work / "study"
        paths = write_study(study, StudySpec(instances=args.instances, study_index=1, seed=7,
                                             air_noise=args.noise))
        total = sum(p.stat().st_size for p in paths)
        sample = b"".join(p.read_bytes() for p in paths[:128])
        print(f"study: {len(paths)} instances, {total / 1e6:.1f} MB", flush=True)

        limits = {
            "blake3 (1 thread)": blake3_mb_s(sample),
            "zstd-1 compress (1 thread)": zstd_compress_mb_s(sample, 1),
            "fsync'd sequential write": fsync_write_mb_s(work, 256 << 20),
        }
        pm_best = float("inf")
        written = 0
        for run in range(args.runs):
            seconds, doc = pacsmesh_put(study, work, run)
            assert doc["stored"] == len(paths), doc
            written = int(str(doc["bytes_written"]))
            pm_best = min(pm_best, seconds)
            print(f"pacsmesh put run {run}: {seconds:.2f} s, {mb_s(total, seconds):.0f} MB/s",
                  flush=True)
        orthanc_best = float("inf")
        for run in range(args.runs):
            with OrthancServer(work / f"orthanc{run}") as server:
                seconds, _ = orthanc_rest_ingest(server, paths)
            shutil.rmtree(work / f"orthanc{run}", ignore_errors=True)
            orthanc_best = min(orthanc_best, seconds)
            print(f"orthanc REST run {run}: {seconds:.2f} s, {mb_s(total, seconds):.0f} MB/s",
                  flush=True)

        n = len(paths)
        rows = [
            "| what | MB/s | instances/s |",
            "|---|---|---|",
            f"| pacsmesh put (CLI + node, end to end) | {mb_s(total, pm_best):.0f} | "
            f"{n / pm_best:.0f} |",
            f"| Orthanc REST, one keep-alive connection | {mb_s(total, orthanc_best):.0f} | "
            f"{n / orthanc_best:.0f} |",
            *(f"| machine: {k} | {v:.0f} | |" for k, v in limits.items()),
        ]
        ratio = orthanc_best / pm_best
        text = "\n".join([
            f"{n} CT instances (512x512x16 bit), {total / 1e6:.1f} MB; best of {args.runs} runs "
            f"each; noise outside the body {args.noise:g} HU; on disk (shuffle + zstd-1): "
            f"{written / 1e6:.1f} MB "
            f"({total / max(written, 1):.2f}x).",
            "",
            *rows,
            "",
            f"pacsmesh / Orthanc: {ratio:.2f}x.",
        ])
        print()
        print(machine_line())
        print(text)
        if args.record:
            append_results("Ingest: pacsmesh put vs Orthanc REST", text)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
