"""Where C-STORE time goes: the same storescu run against receivers that do less and less.

    python -m bench.dicom_stages [--instances 600] [--associations 1 4] [--record]

Rows, all in one run on the same files (dcmtk storescu, TCP_NODELAY=1):
- pynetdicom, no-op handler: pynetdicom's own receive path with nothing behind it
  (the ceiling of any node built on it);
- pacsmesh receive only: a real node whose C-STORE handler answers Success without
  storing (bench/noop_site/sitecustomize.py patches it), so only the fast receive path runs;
- pacsmesh: the real node (durable, audited);
- Orthanc (Debian 1.10), for reference.
For the two pacsmesh rows the node process's user and system CPU per instance.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import OUT_DIR, append_results, machine_line
from bench.dicom import orthanc_row, storescu_send
from pacsmesh.sample import StudySpec, write_study
from tests.dicomproc import wait_listening
from tests.nodeproc import NodeProc, free_port

NOOP_SITE = Path(__file__).parent / "noop_site"
PYNETDICOM_NOOP = """
import logging, sys
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
_config.LOG_HANDLER_LEVEL = "none"
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
ae = AE(ae_title="PACSMESH")
ae.maximum_pdu_size = 1 << 20
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.add_supported_context("1.2.840.10008.1.1")
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
"""


def cpu_s(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def node_row(paths: list[Path], k: int, work: Path, noop: bool) -> tuple[float, float, float]:
    """(seconds, user CPU s, system CPU s) of a node for one storescu run."""
    port = free_port()
    node = NodeProc(work, node_id="stages", extra={"dicom": {
        "listen": f"127.0.0.1:{port}", "ae_title": "PACSMESH"}})
    before_path = os.environ.get("PYTHONPATH")
    if noop:  # bench/noop_site/sitecustomize.py replaces the store with a no-op
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOOP_SITE), before_path]))
    try:
        node.start()
    finally:
        if before_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before_path
    try:
        assert node.proc is not None
        before = cpu_s(node.proc.pid)
        seconds = storescu_send(port, paths, k, work / "links")
        after = cpu_s(node.proc.pid)
        return seconds, after[0] - before[0], after[1] - before[1]
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


def pynetdicom_row(paths: list[Path], k: int, work: Path) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", PYNETDICOM_NOOP, str(port)])
    try:
        wait_listening(port)
        return storescu_send(port, paths, k, work)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=600)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dicom-stages-", dir=OUT_DIR))
    lines = [f"{'receiver':<34} {'assoc':>5} {'inst/s':>7} {'user ms/inst':>13} "
             f"{'sys ms/inst':>12}"]
    try:
        paths = write_study(work / "study", StudySpec(instances=args.instances, seed=7,
                                                      air_noise=12.0))
        n = len(paths)
        for k in args.associations:
            rows = [("pynetdicom, no-op handler", pynetdicom_row(paths, k, work / "p"), None),
                    ("pacsmesh, receive only (no-op)", *_node(paths, k, work / "r", True)),
                    ("pacsmesh (durable, audited)", *_node(paths, k, work / "f", False)),
                    ("Orthanc", orthanc_row(paths, k, work / "o"), None)]
            for name, seconds, cpu in rows:
                cpu_text = (f"{cpu[0] / n * 1000:>13.2f} {cpu[1] / n * 1000:>12.2f}"
                            if cpu else f"{'':>13} {'':>12}")
                lines.append(f"{name:<34} {k:>5} {n / seconds:>7.0f} {cpu_text}")
                print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(lines)
    if args.record:
        append_results("DICOM C-STORE: where the time goes", (
            f"dcmtk storescu, {args.instances} CT instances (512x512, noise 12 HU outside "
            f"the body), TCP_NODELAY=1, one run.\n\n```\n{table}\n```"))
    return 0


def _node(paths: list[Path], k: int, work: Path, noop: bool) -> tuple[float, tuple[float, float]]:
    seconds, user, system = node_row(paths, k, work, noop)
    return seconds, (user, system)


if __name__ == "__main__":
    raise SystemExit(main())
