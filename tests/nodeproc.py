"""Real node processes and the real CLI for tests: no mocks, loopback only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pacsmesh.proto import node_pb2, node_pb2_grpc

PYTHON = sys.executable
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for k, v in values.items():
            if not isinstance(v, dict):
                lines.append(f"{k} = {toml_value(v)}")
        for sub, d in nested.items():
            lines.append(f"[{name}.{sub}]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in d.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class NodeProc:
    """One `pacsmesh node` process with its own config and data dir."""

    workdir: Path
    node_id: str = "n1"
    site: str = "Boston"
    lat: float = 42.3601
    lon: float = -71.0589
    port: int = field(default_factory=free_port)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    tls_client: tuple[Path, Path, Path] | None = None  # (ca, cert, key) to reach a TLS node

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"{self.node_id}-data"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.node_id}.log"

    def config(self) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "node": {"id": self.node_id, "site": self.site, "lat": self.lat, "lon": self.lon,
                     "data_dir": str(self.data_dir), "listen": self.address},
        }
        for name, values in self.extra.items():
            sections.setdefault(name, {}).update(values)
        return write_config(self.workdir / f"{self.node_id}.toml", sections)

    def start(self, wait: bool = True) -> NodeProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "pacsmesh.cli", "node", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self.channel() as ch:
                    node_pb2_grpc.NodeApiStub(ch).Status(node_pb2.StatusRequest(), timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.1)
        raise TimeoutError(f"node {self.node_id} not ready:\n{self.log()}")

    def channel(self) -> grpc.Channel:
        if self.tls_client is None:
            return grpc.insecure_channel(self.address)
        ca, cert, key = (p.read_bytes() for p in self.tls_client)
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        return grpc.secure_channel(self.address, creds)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM: the clean shutdown case. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return int(self.proc.returncode)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.terminate(15)
        self.kill()


def cli(*args: str, node: str | None = None, timeout_s: float = 600,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [PYTHON, "-m", "pacsmesh.cli", *args]
    if node is not None:
        cmd += ["--node", node]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def cli_json(*args: str, node: str, expect_code: int | None = 0, timeout_s: float = 600
             ) -> dict[str, Any]:
    res = cli(*args, "--json", node=node, timeout_s=timeout_s)
    if expect_code is not None:
        assert res.returncode == expect_code, (res.returncode, res.stdout, res.stderr)
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


@contextlib.contextmanager
def running(node: NodeProc) -> Iterator[NodeProc]:
    node.start()
    try:
        yield node
    finally:
        node.stop()
