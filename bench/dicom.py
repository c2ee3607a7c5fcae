"""DICOM C-STORE ingest: dcmtk storescu into a pacsmesh node beside Orthanc, one run.

    python -m bench.dicom [--instances 500] [--associations 1 4] [--runs 1] [--record]

The same synthetic CT study (512x512, 16-bit, pacsmesh.sample) is sent by dcmtk
storescu over k concurrent associations (k processes, each one association for
its contiguous share of the files) to
- a fresh pacsmesh node process (one node, its DICOM listener on loopback), where
  each C-STORE is answered only once durable; checked afterwards with `pacsmesh ls`;
- a fresh Debian Orthanc (bench/orthanc.py), checked with its /statistics.
Both sides run dcmtk with TCP_NODELAY=1 (see bench/orthanc.py: Nagle caps a C-STORE
stream at ~20 instances/s otherwise). Times include storescu start-up. Best of
`runs` per row, since the machine is shared; the ratio column is what counts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import OUT_DIR, append_results, machine_line, mb_s
from bench.orthanc import OrthancServer, orthanc_storescu_ingest
from pacsmesh.sample import StudySpec, study_uid, write_study
from tests.nodeproc import NodeProc, cli_json, free_port

AE_TITLE = "PACSMESH"
CALLING_AET = "PACSMESHBENCH"
ARGV_BYTES_MAX = 512 * 1024  # past this, storescu reads a directory of links instead
STORESCU_TIMEOUT_S = 3600.0


def _groups(paths: list[Path], k: int) -> list[list[Path]]:
    """k contiguous groups of nearly equal size (empty ones dropped)."""
    bounds = [len(paths) * i // k for i in range(k + 1)]
    return [paths[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _storescu_argv(port: int, group: list[Path], linkdir: Path) -> list[str]:
    base = ["/usr/bin/storescu", "--quiet", "-aet", CALLING_AET, "-aec", AE_TITLE]
    files = [str(p) for p in group]
    if sum(len(f) + 1 for f in files) <= ARGV_BYTES_MAX:
        return [*base, "127.0.0.1", str(port), *files]
    linkdir.mkdir(parents=True)
    for i, p in enumerate(group):
        (linkdir / f"{i:08d}.dcm").symlink_to(p.resolve())
    return [*base, "+sd", "+r", "127.0.0.1", str(port), str(linkdir)]


def storescu_send(port: int, paths: list[Path], associations: int, work: Path) -> float:
    """Seconds for k concurrent storescu processes to send every file; raises on any
    failure (storescu exits non-zero when a C-STORE is refused)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    argvs = [_storescu_argv(port, g, work / f"links{i}")
             for i, g in enumerate(_groups(paths, associations))]
    started = time.perf_counter()
    procs = [subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for a in argvs]
    outputs = [p.communicate(timeout=STORESCU_TIMEOUT_S)[0] for p in procs]
    seconds = time.perf_counter() - started
    failed = [o.decode(errors="replace")[-400:] for p, o in zip(procs, outputs, strict=True)
              if p.returncode != 0]
    if failed:
        raise RuntimeError("storescu failed: " + " | ".join(failed))
    return seconds


def pacsmesh_row(paths: list[Path], uid: str, associations: int, work: Path) -> float:
    """A fresh node; returns the storescu seconds once every instance is acknowledged."""
    port = free_port()
    node = NodeProc(work, node_id="benchdicom", extra={"dicom": {
        "listen": f"127.0.0.1:{port}", "ae_title": AE_TITLE}})
    node.start()
    try:
        seconds = storescu_send(port, paths, associations, work)
        studies = cli_json("ls", node=node.address)["studies"]
        got = sum(s["instances"] for s in studies if s["study_uid"] == uid)
        if got != len(paths):
            raise RuntimeError(f"node holds {got} instances of {len(paths)} sent")
        return seconds
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


def orthanc_row(paths: list[Path], associations: int, work: Path) -> float:
    with OrthancServer(work) as srv:
        seconds, _ = orthanc_storescu_ingest(srv, paths, associations=associations)
    shutil.rmtree(work, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--noise", type=float, default=12.0,
                    help="HU of noise outside the body (12: compresses like real CT)")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)

    print(machine_line(), flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dicom-", dir=OUT_DIR))
    try:
        spec = StudySpec(instances=args.instances, study_index=1, seed=7,
                         air_noise=args.noise)
        paths = write_study(work / "study", spec)
        total = sum(p.stat().st_size for p in paths)
        print(f"study: {len(paths)} CT instances, {total / 1e6:.1f} MB", flush=True)
        rows: list[tuple[str, int, float]] = []
        for k in args.associations:
            best = {"pacsmesh": float("inf"), "Orthanc": float("inf")}
            for run in range(args.runs):
                pm = pacsmesh_row(paths, study_uid(spec), k, work / f"pm-{k}-{run}")
                oc = orthanc_row(paths, k, work / f"orthanc-{k}-{run}")
                best["pacsmesh"] = min(best["pacsmesh"], pm)
                best["Orthanc"] = min(best["Orthanc"], oc)
                print(f"{k} assoc, run {run}: pacsmesh {pm:.2f} s, Orthanc {oc:.2f} s",
                      flush=True)
            rows += [("pacsmesh", k, best["pacsmesh"]), ("Orthanc", k, best["Orthanc"])]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    orthanc = {k: s for name, k, s in rows if name == "Orthanc"}
    header = (f"{'receiver':<10} {'assoc':>5} {'seconds':>8} {'inst/s':>8} {'MB/s':>7} "
              f"{'x Orthanc':>9}")
    lines = [header, "-" * len(header)]
    for name, k, secs in rows:
        lines.append(f"{name:<10} {k:>5} {secs:>8.2f} {len(paths) / secs:>8.0f} "
                     f"{mb_s(total, secs):>7.1f} {orthanc[k] / secs:>9.2f}")
    table = "\n".join(lines)
    print(table)
    if args.record:
        text = (f"dcmtk storescu sending {len(paths)} synthetic CT instances "
                f"({total / 1e6:.1f} MB) over k concurrent associations, TCP_NODELAY=1; "
                "fresh receiver per row, best of "
                f"{args.runs}; pacsmesh answers each C-STORE only once durable.\n\n"
                f"```\n{table}\n```")
        print(f"appended to {append_results('DICOM C-STORE ingest vs Orthanc', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
