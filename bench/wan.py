"""Time to 3 safe copies over shaped WAN links, beside rsync pushing to the same far sites.

    python -m bench wan [--rates 100,200] [--instances 300] [--record]

Three sites (Boston, Seattle, Denver), each in its own network namespace behind a
link shaped with `tc tbf` at the given rate in both directions (bench/netns.py).
Per rate, in one run:

- pacsmesh: a real node per site; `pacsmesh put DIR --wait-safe` runs in Boston's
  namespace against Boston's node. The clock runs from the start of the CLI to
  its return: every instance durable at Boston and `Locate` saying the study has
  3 safe copies (verified full copies at 3 sites >= 250 miles apart). The CLI
  polls Locate every 0.5 s, so up to 0.5 s of the figure is polling.
- rsync -a and rsync -az: rsync daemons in Seattle and Denver (rsync://), two
  rsync processes started together in Boston's namespace, one per far site; the
  clock stops when both have finished. rsync verifies nothing afterwards and
  stores files uncompressed; pacsmesh verifies every chunk at every hop.

The data: 300 CT slices 512x512x16 bit whose noise makes them compress like real
CT (~1.9x with zstd-1; the phantom of pacsmesh.sample compresses 3.3x, which
would flatter anything that compresses). The link-capacity bound is the time
the study's compressed bytes (the chunk bytes Boston's node stores) need to
cross Boston's uplink once: bytes * 8 / rate. Any scheme that sends each chunk
out of Boston once and lets the far sites exchange the rest can approach it;
one that sends two copies out of Boston needs at least twice that.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from bench.common import OUT_DIR, append_results, machine_line
from bench.netns import PYTHON, Counters, WanHarness, unavailable
from pacsmesh.sample import StudySpec, make_instance

STUDY_FORMAT = 1  # bump when realistic_slice changes, so cached studies are rebuilt
SIGMA_AIR_HU = 15.0  # noise of a routine CT (filtered back projection)
SIGMA_BODY_HU = 30.0
SAMPLE_S = 0.05  # wire counters sampled this often during the pacsmesh run


@functools.cache
def _grid(rows: int, cols: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    fov = ((yy - cy) / (rows / 2)) ** 2 + ((xx - cx) / (cols / 2)) ** 2 <= 1
    body = ((yy - cy) / (rows * 0.36)) ** 2 + ((xx - cx) / (cols * 0.44)) ** 2 <= 1
    inner = ((yy - cy) / (rows * 0.32)) ** 2 + ((xx - cx) / (cols * 0.40)) ** 2 <= 1
    return yy, xx, fov, body, inner


def realistic_slice(rows: int, cols: int, z: int, rng: np.random.Generator) -> np.ndarray:
    """A CT slice as a scanner stores it: a circular field of view (0 outside), air, a
    subcutaneous fat ring, soft tissue, lungs, a vertebra, and noise everywhere inside
    the field of view, slightly correlated between neighbours as filtered back
    projection leaves it (sigma ~15 HU in air, ~30 HU in the body). zstd-1 shrinks it
    ~1.9x, as it does real CT; the noise, not the anatomy, sets that figure."""
    yy, xx, fov, body, inner = _grid(rows, cols)
    cy, cx = rows / 2, cols / 2
    img = np.full((rows, cols), -1000.0, dtype=np.float32)
    img[body] = -100.0  # fat
    img[inner] = 40.0  # soft tissue
    shift = 8 * np.sin(z / 7.0)
    for oy, ox, ry, rx, hu in ((-0.05, -0.2, 0.16, 0.13, -850.0), (-0.05, 0.2, 0.16, 0.13, -850.0),
                               (0.02, 0.0, 0.08, 0.08, 50.0), (0.22, 0.0, 0.05, 0.05, 900.0)):
        organ = (((yy - cy - oy * rows - shift) / (ry * rows)) ** 2
                 + ((xx - cx - ox * cols) / (rx * cols)) ** 2 <= 1)
        img[organ] = hu
    white = rng.standard_normal(size=(rows, cols), dtype=np.float32)
    noise = (white + 0.5 * np.roll(white, 1, 0) + 0.5 * np.roll(white, 1, 1)
             + 0.25 * np.roll(white, (1, 1), (0, 1))) / 1.25
    img += noise * np.where(body, SIGMA_BODY_HU, SIGMA_AIR_HU).astype(np.float32)
    out = np.clip(img + 1024, 0, 4095).astype(np.uint16)
    out[~fov] = 0
    return out


def write_realistic_study(out_dir: Path, spec: StudySpec) -> list[Path]:
    """Like pacsmesh.sample.write_study (same UIDs and headers), with realistic_slice
    pixels; one series."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = dataclasses.replace(spec, rows=2, columns=2)  # headers only: pixels follow
    paths = []
    for n in range(1, spec.instances + 1):
        ds = make_instance(tiny, 1, n)
        rng = np.random.default_rng([spec.seed, spec.study_index, n, STUDY_FORMAT])
        ds.Rows, ds.Columns = spec.rows, spec.columns
        ds.PixelData = realistic_slice(spec.rows, spec.columns, n, rng).tobytes()
        path = out_dir / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cached_study(instances: int, seed: int = 10) -> tuple[Path, StudySpec]:
    """The benchmark study, made once and kept in bench/out (git-ignored)."""
    spec = StudySpec(instances=instances, study_index=1, seed=seed)
    folder = OUT_DIR / f"wan-study-v{STUDY_FORMAT}-{instances}-{seed}"
    done = folder.with_name(folder.name + ".complete")  # outside: put would read it
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_realistic_study(folder / "series1", spec)
        done.write_text("")
    return folder, spec


def zstd1_bytes(folder: Path) -> tuple[int, int]:
    """(plain, zstd-1 compressed) bytes of the .dcm files, 1 MiB at a time (what the
    store does, give or take the header chunk)."""
    cctx = zstandard.ZstdCompressor(level=1)
    plain = packed = 0
    for p in sorted(folder.rglob("*.dcm")):
        data = p.read_bytes()
        plain += len(data)
        packed += sum(len(cctx.compress(data[i:i + (1 << 20)]))
                      for i in range(0, len(data), 1 << 20))
    return plain, packed


@dataclasses.dataclass
class Run:
    seconds: float
    wire: Counters
    note: str = ""


def pacsmesh_run(h: WanHarness, study: Path, work: Path, timeout_s: float,
                 transfer: dict[str, Any] | None = None) -> tuple[Run, dict[str, Any]]:
    nodes = h.start_nodes(work, transfer=transfer)
    boston = nodes[0]
    time.sleep(1.0)  # let the first holdings and digest rounds pass before the clock
    cpu0 = {n.site.name: n.cpu_seconds() for n in nodes}
    c0 = h.counters()
    wall_start = dt.datetime.now(dt.UTC).strftime("%H:%M:%S.%f")[:-3]  # to read the logs by
    samples: list[tuple[float, Counters]] = []
    done = threading.Event()

    def sample() -> None:  # a few sysfs reads every 50 ms: negligible next to the nodes
        while not done.wait(SAMPLE_S):
            samples.append((time.perf_counter(), h.counters()))

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    res = h.run("boston", [PYTHON, "-m", "pacsmesh.cli", "put", str(study), "--wait-safe",
                           str(timeout_s), "--json", "--node", boston.address], timeout_s + 60)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    c1 = h.counters()
    cpu1 = {n.site.name: n.cpu_seconds() for n in nodes}
    if res.returncode != 0:
        raise RuntimeError(f"put --wait-safe failed ({res.returncode}): {res.stdout[-2000:]}\n"
                           f"{res.stderr[-2000:]}\n{boston.log_tail()}")
    doc = json.loads(res.stdout)
    time.sleep(5.0)  # what still crosses the links after the study is safe
    c2 = h.counters()
    statuses = {n.site.name: n.status() for n in nodes}
    chunk_bytes = {k: int(st.chunk_bytes) for k, st in statuses.items()}
    stolen = {k: int(st.transfer.relayed_chunks_stolen) for k, st in statuses.items()}
    h.stop_nodes()
    info = {"put_seconds": float(doc.get("seconds", 0.0)), "chunk_bytes": chunk_bytes,
            "stolen": stolen,
            "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0}, "after_safe": c2 - c1,
            "logs": str(work), "wall_start": wall_start,
            "phases": phases(samples, started, c0, c1, [s.name for s in h.sites])}
    return Run(seconds, c1 - c0), info


def phases(samples: list[tuple[float, Counters]], started: float, c0: Counters, c1: Counters,
           sites: list[str]) -> tuple[float, float]:
    """(when Boston had sent its first MB, when both far sites had received 99 % of
    what they received by the end), in seconds from the start of the put."""
    origin, far = sites[0], sites[1:]
    if os.environ.get("WAN_SERIES"):  # diagnosis: Boston's uplink and far downlinks per 0.5 s
        prev_t, prev = started, c0
        for t, c in samples:
            span = t - prev_t
            if span >= 0.5:
                mbit = {s: (c.down[s] - prev.down[s]) * 8 / 1e6 / span for s in far}
                up = (c.up[origin] - prev.up[origin]) * 8 / 1e6 / span
                print(f"  t={t - started:4.1f}s boston up {up:5.0f} Mbit/s; "
                      + " ".join(f"{s} down {v:4.0f}" for s, v in mbit.items()), flush=True)
                prev_t, prev = t, c
    first = last = math.nan
    for t, c in samples:
        if math.isnan(first) and c.up[origin] - c0.up[origin] >= 1_000_000:
            first = t - started
        if all(c.down[s] - c0.down[s] >= 0.99 * (c1.down[s] - c0.down[s]) for s in far):
            last = t - started
            break
    return first, last


def rsync_run(h: WanHarness, study: Path, work: Path, flags: str) -> Run:
    far = [s.name for s in h.sites[1:]]
    urls = []
    for site in far:
        dest = work / f"rsync-{site}"
        shutil.rmtree(dest, ignore_errors=True)
        urls.append(h.start_rsyncd(site, dest, work))
    c0 = h.counters()
    started = time.perf_counter()
    procs = [subprocess.Popen(h.command("boston", ["rsync", flags, f"{study}/", url]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for url in urls]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - started
    c1 = h.counters()
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"rsync {flags} failed: {err.decode(errors='replace')}")
    for proc in h.procs:  # the daemons: a fresh pair (and fresh folders) for the next run
        proc.terminate()
        proc.wait(10)
    h.procs.clear()
    for site in far:
        shutil.rmtree(work / f"rsync-{site}", ignore_errors=True)
    return Run(seconds, c1 - c0)


def one_rate(rate: float, study: Path, work: Path, timeout_s: float,
             transfer: dict[str, Any] | None = None) -> dict[str, Any]:
    with WanHarness(rate) as h:
        pm, info = pacsmesh_run(h, study, work / f"nodes-{rate:g}", timeout_s, transfer)
        print(f"  pacsmesh: {pm.seconds:.1f} s", flush=True)
        ra = rsync_run(h, study, work, "-a")
        print(f"  rsync -a: {ra.seconds:.1f} s", flush=True)
        rz = rsync_run(h, study, work, "-az")
        print(f"  rsync -az: {rz.seconds:.1f} s", flush=True)
        sites = [s.name for s in h.sites]
    return {"rate": rate, "pacsmesh": pm, "rsync_a": ra, "rsync_az": rz, "info": info,
            "sites": sites, "load": os.getloadavg()[0]}


METHODS = ("pacsmesh", "rsync_a", "rsync_az")


def median_row(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repetitions: per method the run with the median time (the lower
    middle one for an even count), its wire bytes with it; every time kept in "all"."""
    row = dict(reps[0])
    for key in METHODS:
        ordered = sorted(reps, key=lambda r: r[key].seconds)
        pick = ordered[(len(ordered) - 1) // 2]
        row[key] = pick[key]
        if key == "pacsmesh":
            row["info"] = pick["info"]
    row["all"] = {key: [r[key].seconds for r in reps] for key in METHODS}
    row["loads"] = [r["load"] for r in reps]
    return row


def report(rows: list[dict[str, Any]], plain: int, instances: int, z1: int,
           wire_level: int = 0) -> str:
    lines = [
        f"[transfer] wire_zstd_level = {wire_level} on every node"
        + (" (chunks cross slow links compressed again at that level)." if wire_level
           else " (chunks cross the links as stored)."),
        f"{instances} CT slices 512x512, {plain / 1e6:.0f} MB; zstd-1 in 1 MiB pieces: "
        f"{z1 / 1e6:.0f} MB ({plain / z1:.2f}x). Three sites (Boston, Seattle, Denver) in "
        "network namespaces, each link shaped with tc tbf at the rate both ways; no added "
        "latency (netem is not available here), so round trips cost ~nothing. Plaintext "
        "gRPC and plaintext rsync daemons. pacsmesh: `put --wait-safe` at Boston until 3 "
        "safe copies (includes up to 0.5 s of the CLI's polling). rsync: two processes "
        "from Boston, one per far site, in parallel, until both finish. Wire bytes below "
        "are those of the median pacsmesh run.",
        "",
        "| link | pacsmesh s | rsync -a s | rsync -az s | pacsmesh / best rsync | "
        "bound s | pacsmesh / bound | compressed MB (Boston's chunks) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reps = len(rows[0]["all"]["pacsmesh"]) if rows else 0
    for r in rows:
        pm, ra, rz = r["pacsmesh"], r["rsync_a"], r["rsync_az"]
        chunk = r["info"]["chunk_bytes"]["boston"]
        bound = chunk * 8 / (r["rate"] * 1e6)
        best = min(ra.seconds, rz.seconds)
        lines.append(
            f"| {r['rate']:g} Mbit/s | {pm.seconds:.1f} | {ra.seconds:.1f} | {rz.seconds:.1f} | "
            f"{pm.seconds / best:.2f} | {bound:.1f} | {pm.seconds / bound:.2f} | "
            f"{chunk / 1e6:.0f} |")
    if reps > 1:
        lines += ["", f"Medians of {reps} runs, the three methods interleaved; every run, s:"]
        for r in rows:
            lines.append(f"- {r['rate']:g} Mbit/s: " + "; ".join(
                f"{k.replace('_', ' -')} " + ", ".join(f"{x:.1f}" for x in r["all"][k])
                for k in METHODS) + " (1-min load average at the start of each: "
                + ", ".join(f"{x:.1f}" for x in r["loads"]) + ")")
    else:
        lines += ["", "One run per rate; 1-min load average at its start: "
                  + ", ".join(f"{r['rate']:g} Mbit/s {r['loads'][0]:.1f}" for r in rows)
                  + " (other work on this machine shares its 2 cores)."]
    lines += ["", "Targets (issue 10): pacsmesh / best rsync <= 0.67 at 200 Mbit/s; "
              "pacsmesh / bound <= 1.20. Bound = Boston's compressed chunk bytes * 8 / rate: "
              "each chunk leaves Boston once (the far sites could pass it on to each other).",
              ""]
    for r in rows:
        sites = r["sites"]
        lines.append(f"Bytes on the wire at {r['rate']:g} Mbit/s, MB sent / received per site "
                     "(Ethernet frames, headers included):")
        lines.append("")
        lines.append("| site | pacsmesh up | pacsmesh down | rsync -a up | rsync -a down | "
                     "rsync -az up | rsync -az down |")
        lines.append("|---|---|---|---|---|---|---|")
        for s in sites:
            cells = []
            for key in ("pacsmesh", "rsync_a", "rsync_az"):
                w = r[key].wire
                cells += [f"{w.up[s] / 1e6:.1f}", f"{w.down[s] / 1e6:.1f}"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        info = r["info"]
        after = info["after_safe"]
        pm = r["pacsmesh"]
        boston_up = pm.wire.up[sites[0]]
        busy = boston_up * 8 / (r["rate"] * 1e6)
        lines += ["", f"Boston's uplink carried {boston_up / 1e6:.0f} MB for pacsmesh "
                  f"({boston_up / max(1, info['chunk_bytes'][sites[0]]):.2f}x the compressed "
                  f"study): {busy:.1f} s of the {pm.seconds:.1f} s at the full rate; the far "
                  "sites sent each other " + ", ".join(
                      f"{s} {pm.wire.up[s] / 1e6:.0f} MB" for s in sites[1:]) + "."]
        first, last = info["phases"]
        span = last - first if last > first else math.nan  # nan when a phase was not seen
        lines += [f"Timeline: Boston's first MB out at {first:.1f} s, 99 % of the far sites' "
                  f"bytes in by {last:.1f} s ({boston_up * 8 / 1e6 / span:.0f} Mbit/s "
                  f"out of Boston in between), safe reported at {pm.seconds:.1f} s (the "
                  "rest: the last chunks, commits, holdings reaching Boston, the CLI's poll)."]
        lines += [f"pacsmesh ingest at Boston (put without the wait): "
                  f"{info['put_seconds']:.1f} s; node CPU seconds until safe: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in info["cpu_s"].items())
                  + "; in the 5 s after safe, MB still sent: "
                  + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in after.up.items())
                  + "; a slow feeder's chunks taken from the source instead: "
                  + ", ".join(f"{k} {v}" for k, v in info.get("stolen", {}).items())
                  + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,200", help="Mbit/s per link, comma separated")
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for safe")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per rate (methods interleaved); the medians are reported")
    ap.add_argument("--wire-zstd-level", type=int, default=0,
                    help="[transfer] wire_zstd_level of every node (0: chunks as stored)")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    transfer = {"wire_zstd_level": args.wire_zstd_level}
    why = unavailable() or ("" if shutil.which("rsync") else "rsync is not installed")
    if why:
        print(f"bench wan skipped: {why}", file=sys.stderr)
        return 0
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    study, _ = cached_study(args.instances)
    plain, z1 = zstd1_bytes(study)
    print(f"study: {args.instances} instances, {plain / 1e6:.0f} MB, zstd-1 {plain / z1:.2f}x",
          flush=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    work = OUT_DIR / f"wan-{stamp}"
    rows = []
    for rate in rates:
        print(f"{rate:g} Mbit/s:", flush=True)
        reps = []
        for i in range(max(1, args.repeat)):
            try:
                reps.append(one_rate(rate, study, work / f"run{i + 1}", args.timeout,
                                     transfer))
            finally:
                for d in work.glob("run*/nodes-*/*-data"):  # keep the logs, drop the stores
                    shutil.rmtree(d, ignore_errors=True)
        rows.append(median_row(reps))
    text = report(rows, plain, args.instances, z1, args.wire_zstd_level)
    print()
    print(machine_line())
    print(text)
    print(f"node logs: {work} (put started at " + ", ".join(
        f"{r['rate']:g} Mbit/s {r['info']['wall_start']}" for r in rows) + " UTC)")
    if args.record:
        append_results("WAN: 3 safe copies over shaped links vs rsync (bench.wan)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
