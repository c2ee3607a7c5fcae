"""Compaction throughput beside the machine's own limits, measured in the same run.

    python -m bench.gc [--instances 400] [--drop 0.5] [--record]

A store (real packs, real fsync, real LMDB) holds a CT study of `--instances`
512x512 16-bit instances with realistic noise (StudySpec.air_noise = 12 HU, ~2.6x
with shuffle + zstd-1), ingested through the same path as a C-STORE, in 32 MiB
packs. A fraction `--drop` of the instances stops being held (as after a trim),
and one unthrottled GC pass reclaims their chunks and rewrites every pack (each
live record read, decompressed, hashed, appended, fsync'd, committed; the old pack
unlinked). Beside it, in the same run on the same disk:
- fsync'd sequential write of as many bytes as compaction copied (one thread, 1 MiB
  writes, one fsync): the disk's own bound for the copying;
- rsync (Debian's) of the pack files as they were before the pass, to another
  directory: copying the data without reading a record or verifying a byte.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import OUT_DIR, append_results, machine_line, mb_s
from pacsmesh.node.config import GcSection
from pacsmesh.node.gc import Collector
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import Prepared, prepare_local
from pacsmesh.node.store import Store
from pacsmesh.node.worker import WorkerState
from pacsmesh.sample import StudySpec, make_instance

PACK_MB = 32


def _fill(store: Store, instances: int) -> list[bytes]:
    spec = StudySpec(instances=instances, seed=5, air_noise=12)
    clock = HybridClock()
    futures = []
    mids = []
    for n in range(1, instances + 1):
        buf = io.BytesIO()
        make_instance(spec, 1, n).save_as(buf, enforce_file_format=True)
        out = prepare_local(store, "bench", clock, buf.getvalue(), f"i{n}")
        assert isinstance(out, Prepared)
        futures.append(store.submit(out.manifest_id, out.raw, out.manifest))
        mids.append(out.manifest_id)
    for f in futures:
        f.result(120)
    return mids


def _seq_write_mb_s(path: Path, nbytes: int) -> float:
    block = os.urandom(1 << 20)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return mb_s(nbytes, seconds)


def _rsync_mb_s(src: Path, dst: Path) -> tuple[float, int]:
    total = sum(p.stat().st_size for p in src.glob("pack-*.dat"))
    started = time.perf_counter()
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    subprocess.run(["sync", "-f", str(dst)], check=True)
    return mb_s(total, time.perf_counter() - started), total


def run(instances: int, drop: float) -> dict[str, float]:
    work = OUT_DIR / "gc"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = Store(work / "data", pack_size_max=PACK_MB << 20)
    mids = _fill(store, instances)
    store.unhold(random.Random(1).sample(mids, int(len(mids) * drop)))
    packs_before = store.packs.bytes_total()
    rsync_rate, _ = _rsync_mb_s(store.packs.dir, work / "rsync-copy")
    shutil.rmtree(work / "rsync-copy")
    cfg = GcSection(rate_mb_s=1e6, interval_s=1e9, loose_grace_s=0.0, compact_below=0.99,
                    seal_min_dead_mb=0.0)
    collector = Collector(store, cfg, clock=lambda: time.time() + 1)
    collector.request_pass()

    async def drive() -> float:
        started = time.perf_counter()
        while True:
            if await collector.step() == WorkerState.IDLE and not collector.state.running:
                return time.perf_counter() - started
    seconds = asyncio.run(drive())
    st = collector.state
    moved = st.pass_bytes_moved
    packs_after = store.packs.bytes_total()
    store.close()
    write_rate = _seq_write_mb_s(work / "seq.bin", max(moved, 64 << 20))
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": seconds, "moved": moved, "packs_before": packs_before,
            "packs_after": packs_after, "moved_mb_s": mb_s(moved, seconds),
            "write_mb_s": write_rate, "rsync_mb_s": rsync_rate,
            "packs_compacted": st.packs_compacted, "reclaimed": st.reclaimed_bytes}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gc", description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--drop", type=float, default=0.5)
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    r = run(args.instances, args.drop)
    text = (
        f"{args.instances} CT instances (noise 12 HU) in {PACK_MB} MiB packs; "
        f"{args.drop:.0%} stop being held; one unthrottled GC pass.\n\n"
        "| figure | value |\n|---|---|\n"
        f"| pack bytes before / after | {r['packs_before'] / 1e6:.1f} MB / "
        f"{r['packs_after'] / 1e6:.1f} MB ({r['packs_compacted']} packs compacted, "
        f"{r['reclaimed'] / 1e6:.1f} MB freed) |\n"
        f"| pass time | {r['seconds']:.2f} s |\n"
        f"| live bytes copied (read, verified, written, fsync'd) | {r['moved'] / 1e6:.1f} MB at "
        f"{r['moved_mb_s']:.0f} MB/s |\n"
        f"| fsync'd sequential write, same bytes | {r['write_mb_s']:.0f} MB/s "
        f"(compaction at {r['moved_mb_s'] / r['write_mb_s']:.2f}x) |\n"
        f"| rsync of the packs before the pass | {r['rsync_mb_s']:.0f} MB/s "
        f"(compaction at {r['moved_mb_s'] / r['rsync_mb_s']:.2f}x) |\n")
    print(f"Machine: {machine_line()}\n\n{text}")
    if args.record:
        append_results("GC: compaction throughput", text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
