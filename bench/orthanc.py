"""A reference archive to compare against: Debian's Orthanc, started for one benchmark.

``OrthancServer(workdir)`` runs ``/usr/sbin/Orthanc`` on loopback with a private JSON
config (storage and index in ``workdir``, free HTTP and DICOM ports, no plugins, no
authentication, any calling AE may store), and stops it (SIGTERM, then SIGKILL) on exit.

``orthanc_rest_ingest`` POSTs files to ``/instances`` over one keep-alive connection;
``orthanc_storescu_ingest`` sends them with dcmtk ``storescu`` over k concurrent
associations. Both return ``(seconds, bytes)`` and fail loudly unless every file became
a new instance, so run each on a fresh server.

DICOM and Nagle: Debian's dcmtk (used by Orthanc's DICOM server and by storescu) leaves
Nagle's algorithm on unless the environment variable ``TCP_NODELAY=1`` is set, and Nagle
plus delayed ACKs cap a C-STORE stream at ~20 instances/s even on loopback. Both the
server and the storescu client therefore get ``TCP_NODELAY=1`` by default
(``tcp_nodelay=False`` measures the untuned Debian default). Orthanc's own
"TcpNoDelay" key covers only its HTTP server.

Self-check: ``python -m bench.orthanc`` ingests 100 synthetic CT instances both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.common import append_results, machine_line, mb_s
from pacsmesh.sample import StudySpec, write_study

ORTHANC_BIN = "/usr/sbin/Orthanc"
STORESCU_BIN = "/usr/bin/storescu"  # dcmtk, not a venv's pynetdicom app
CALLING_AET = "PACSMESHBENCH"
LOOPBACK = "127.0.0.1"


class OrthancError(RuntimeError):
    """Orthanc did not start, or answered something a benchmark cannot accept."""


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def orthanc_config(
    workdir: Path, http_port: int, dicom_port: int, aet: str = "ORTHANC"
) -> dict[str, Any]:
    """The JSON config for a private, plugin-free Orthanc whose files all live in workdir."""
    return {
        "Name": f"pacsmesh-bench-{http_port}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "Plugins": [],  # never load /usr/share/orthanc/plugins
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP from loopback only
        "AuthenticationEnabled": False,
        "RegisteredUsers": {},
        "SslEnabled": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,  # accept C-STORE from any (unregistered) calling AE
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {},
        "OrthancPeers": {},
        "OverwriteInstances": False,
        "SaveJobs": False,
    }


class OrthancServer:
    """Context manager running a private Orthanc on loopback; see the module docstring."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "ORTHANC",
        binary: str = ORTHANC_BIN,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
        extra_config: dict[str, Any] | None = None,
        tcp_nodelay: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_config = dict(extra_config or {})
        self.tcp_nodelay = tcp_nodelay
        self.http_port = 0
        self.dicom_port = 0
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise OrthancError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        for _ in range(10):  # bounded: two free ports must differ
            if self.dicom_port != self.http_port:
                break
            self.dicom_port = free_port()
        config = orthanc_config(self.workdir, self.http_port, self.dicom_port, self.aet)
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, str(self.config_path)],
                env=_dcmtk_env(self.tcp_nodelay),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not Orthanc
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise OrthancError(f"Orthanc exited early ({code}): {self.log_tail()}")
            try:
                status, _ = self.request("GET", "/system", timeout_s=2.0)
                if status == 200:
                    return
                last_error = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as e:
                last_error = repr(e)
            time.sleep(0.05)
        raise OrthancError(
            f"Orthanc not ready after {self.startup_timeout_s:.0f} s ({last_error}): "
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=self.stop_timeout_s)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_tail(self, nbytes: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-nbytes:].decode("utf-8", errors="replace")

    # -- REST --------------------------------------------------------------------

    def connection(self, timeout_s: float = 60.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=timeout_s)

    def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout_s: float = 60.0
    ) -> tuple[int, bytes]:
        """One request on a fresh connection; returns (status, body)."""
        conn = self.connection(timeout_s)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise OrthancError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def count_instances(self) -> int:
        stats = self.get_json("/statistics")
        return int(stats["CountInstances"])


def _dcmtk_env(tcp_nodelay: bool) -> dict[str, str]:
    """The environment for a dcmtk-based process, Nagle off (TCP_NODELAY=1) or default."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def _total_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def orthanc_rest_ingest(
    server: OrthancServer, paths: Sequence[str | os.PathLike[str]]
) -> tuple[float, int]:
    """POST each file to /instances over one keep-alive connection; (seconds, bytes).

    Every answer must be 200 with Status "Success"; anything else (including
    "AlreadyStored": use a fresh server) raises OrthancError.
    """
    files = [Path(p) for p in paths]
    before = server.count_instances()
    conn = server.connection()
    nbytes = 0
    try:
        t0 = time.perf_counter()
        for path in files:
            body = path.read_bytes()
            conn.request(
                "POST",
                "/instances",
                body=body,
                headers={"Content-Type": "application/dicom", "Connection": "keep-alive"},
            )
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise OrthancError(f"POST {path}: HTTP {resp.status}: {answer[:200]!r}")
            status = json.loads(answer).get("Status")
            if status != "Success":
                raise OrthancError(f"POST {path}: Status {status!r} (use a fresh server)")
            nbytes += len(body)
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    after = server.count_instances()
    if after - before != len(files):
        raise OrthancError(f"expected {len(files)} new instances, Orthanc has {after - before}")
    return seconds, nbytes


def _split(paths: Sequence[Path], k: int) -> list[list[Path]]:
    """k contiguous groups of nearly equal size (empty groups dropped)."""
    n = len(paths)
    bounds = [n * i // k for i in range(k + 1)]
    return [list(paths[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


# Leave room under ARG_MAX for the environment; beyond this, storescu scans a link dir.
_MAX_ARGV_BYTES = 512 * 1024


def _storescu_argv(server: OrthancServer, group: list[Path], linkdir: Path) -> list[str]:
    base = [
        STORESCU_BIN,
        "--quiet",
        "-aet",
        CALLING_AET,
        "-aec",
        server.aet,
    ]
    files = [str(p) for p in group]
    if sum(len(f) + 1 for f in files) <= _MAX_ARGV_BYTES:
        return [*base, LOOPBACK, str(server.dicom_port), *files]
    # Too many for one command line: one association still, via a directory of links.
    linkdir.mkdir(parents=True)
    for i, p in enumerate(group):
        (linkdir / f"{i:08d}.dcm").symlink_to(p.resolve())
    return [*base, "+sd", "+r", LOOPBACK, str(server.dicom_port), str(linkdir)]


def orthanc_storescu_ingest(
    server: OrthancServer,
    paths: Sequence[str | os.PathLike[str]],
    associations: int = 1,
    *,
    tcp_nodelay: bool = True,
    timeout_s: float = 3600.0,
) -> tuple[float, int]:
    """Send the files with dcmtk storescu, k = ``associations`` concurrent processes.

    Each process opens one association and sends its contiguous share of the files.
    Afterwards /statistics must show exactly len(paths) new instances (so use a fresh
    server). Returns (seconds, bytes); the time includes storescu start-up.
    ``tcp_nodelay`` sets TCP_NODELAY=1 for storescu (see the module docstring).
    """
    if associations < 1:
        raise ValueError("associations must be >= 1")
    if shutil.which(STORESCU_BIN) is None:
        raise OrthancError("dcmtk storescu not found on PATH")
    files = [Path(p) for p in paths]
    nbytes = _total_size(files)
    groups = _split(files, associations)
    before = server.count_instances()
    env = _dcmtk_env(tcp_nodelay)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="storescu-", dir=server.workdir) as tmp:
        argvs = [_storescu_argv(server, g, Path(tmp) / f"g{i}") for i, g in enumerate(groups)]
        errs = [Path(tmp) / f"g{i}.err" for i in range(len(argvs))]
        try:
            t0 = time.perf_counter()
            for argv, err in zip(argvs, errs, strict=True):
                with open(err, "wb") as ef:
                    procs.append(
                        subprocess.Popen(
                            argv,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=ef,
                            stderr=subprocess.STDOUT,
                        )
                    )
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            seconds = time.perf_counter() - t0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
        failures = [
            f"storescu exit {p.returncode}: {e.read_text(errors='replace')[-500:]}"
            for p, e in zip(procs, errs, strict=True)
            if p.returncode != 0
        ]
    if failures:
        raise OrthancError("; ".join(failures))
    after = server.count_instances()
    if after - before != len(files):
        raise OrthancError(f"expected {len(files)} new instances, Orthanc has {after - before}")
    return seconds, nbytes


# -- self-check ----------------------------------------------------------------------


def _report(label: str, n: int, seconds: float, nbytes: int) -> str:
    line = (
        f"{label:<28} {n:5d} inst in {seconds:7.3f} s: {n / seconds:8.1f} inst/s, "
        f"{mb_s(nbytes, seconds):7.1f} MB/s"
    )
    print(line)
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.orthanc", description=__doc__)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument(
        "--associations", type=int, nargs="+", default=[1, 2], help="storescu runs to make"
    )
    ap.add_argument(
        "--skip-nagle", action="store_true", help="skip the untuned (Nagle on) storescu run"
    )
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temporary work dir")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)

    print(machine_line())
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-orthanc-", dir=args.dir) as tmp:
        root = Path(tmp)
        paths = write_study(root / "data", StudySpec(instances=args.instances, seed=args.seed))
        total = _total_size(paths)
        print(f"{len(paths)} CT instances, {total / 1e6:.1f} MB, in {root}")
        lines = []
        with OrthancServer(root / "rest") as srv:
            secs, nb = orthanc_rest_ingest(srv, paths)
            lines.append(_report("Orthanc REST (1 conn)", len(paths), secs, nb))
        for k in args.associations:
            with OrthancServer(root / f"storescu-{k}") as srv:
                secs, nb = orthanc_storescu_ingest(srv, paths, associations=k)
                lines.append(_report(f"Orthanc storescu ({k} assoc)", len(paths), secs, nb))
        if not args.skip_nagle:
            with OrthancServer(root / "storescu-nagle", tcp_nodelay=False) as srv:
                secs, nb = orthanc_storescu_ingest(srv, paths, tcp_nodelay=False)
                lines.append(_report("storescu (1 assoc, Nagle on)", len(paths), secs, nb))
    if args.record:
        text = (
            f"Orthanc 1.10 (Debian), fresh server per row, {len(paths)} synthetic CT "
            f"instances ({total / 1e6:.1f} MB), storage on the same disk; storescu rows "
            "with TCP_NODELAY=1 for dcmtk unless marked Nagle on.\n\n"
            "```\n" + "\n".join(lines) + "\n```"
        )
        print(f"appended to {append_results('Orthanc ingest', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
