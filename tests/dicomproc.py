"""Helpers for DICOM interoperability tests: nodes with a DICOM listener, dcmtk tools
run with bounded time, a dcmtk storescp as a C-MOVE destination, a pynetdicom
Storage Commitment SCU, and byte comparisons of datasets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset

from tests.conftest import SYSTEM_PATH
from tests.nodeproc import NodeProc, free_port

TOOL_TIMEOUT_S = 60.0
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REPLY_GRACE_S = 0.5


def dicom_node(workdir: Path, node_id: str = "n1", site: str = "Boston",
               lat: float = 42.3601, lon: float = -71.0589,
               cluster: dict[str, Any] | None = None, node: dict[str, Any] | None = None,
               **dicom: Any) -> tuple[NodeProc, int]:
    """A node (not started) with a DICOM listener on a free loopback port."""
    port = free_port()
    extra: dict[str, dict[str, Any]] = {"dicom": {"listen": f"127.0.0.1:{port}", **dicom}}
    if cluster:
        extra["cluster"] = cluster
    if node:
        extra["node"] = node
    return NodeProc(workdir, node_id=node_id, site=site, lat=lat, lon=lon, extra=extra), port


def dcmtk_env() -> dict[str, str]:
    """Nagle off for dcmtk, as bench/orthanc.py explains (else ~20 instances/s)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def tool(*args: str | Path, timeout_s: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (a bare name is looked up in the system's bin folders, never a
    venv's pynetdicom app of the same name); stdout and stderr together in `.stdout`."""
    name = str(args[0])
    if "/" not in name:
        name = shutil.which(name, path=SYSTEM_PATH) or name
    return subprocess.run([name, *(str(a) for a in args[1:])], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
                          env=dcmtk_env(), check=False)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group: the dataset itself."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def dataset_digests(files: list[Path]) -> dict[str, bytes]:
    """SOP Instance UID -> sha256 of the dataset bytes (file meta excluded)."""
    out = {}
    for f in files:
        sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        out[sop] = hashlib.sha256(dataset_bytes(f)).digest()
    return out


@contextlib.contextmanager
def storescp(out_dir: Path, aet: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """dcmtk storescp receiving into out_dir; stopped afterwards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", aet, "-od", str(out_dir), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_listening(port: int, timeout_s: float = 10.0) -> None:
    """Until a C-ECHO succeeds: the listener is bound *and* associates (a bare TCP
    connect would only show the first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tool("echoscu", "-aet", "ECHOSCU", "127.0.0.1", str(port), timeout_s=10).returncode == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no DICOM C-ECHO answer on port {port}")


def find(port: int, out_dir: Path, *keys: str, model: str = "-S",
         aet: str = "FINDSCU") -> list[Dataset]:
    """findscu with responses extracted to files; the response identifiers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args: list[str] = ["findscu", model, "-aet", aet, "-X", "-od", str(out_dir)]
    for k in keys:
        args += ["-k", k]
    res = tool(*args, "127.0.0.1", str(port))
    assert res.returncode == 0, res.stdout
    return [pydicom.dcmread(f) for f in sorted(out_dir.glob("rsp*.dcm"))]


# ---- Storage Commitment SCU (pynetdicom) -----------------------------------------------------


@dataclass
class CommitmentReport:
    event_type: int
    info: Dataset
    how: str  # "same association" or "new association"


@dataclass
class CommitmentScu:
    """A pynetdicom Storage Commitment SCU: asks over one association and takes the
    N-EVENT-REPORT either on it or on a listener of its own."""

    aet: str
    listen_port: int = 0  # 0: no listener, only the same association
    reports: list[CommitmentReport] = field(default_factory=list)
    _got: threading.Event = field(default_factory=threading.Event)
    _server: Any = None

    def _on_report(self, event: Any, how: str) -> tuple[int, None]:
        self.reports.append(CommitmentReport(event.event_type, event.event_information, how))
        self._got.set()
        return 0x0000, None

    def __enter__(self) -> CommitmentScu:
        if self.listen_port:
            ae = AE(ae_title=self.aet)
            # accept the archive taking the SCP role on the association it requests
            ae.add_supported_context(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
            self._server = ae.start_server(
                ("127.0.0.1", self.listen_port), block=False,
                evt_handlers=[(evt.EVT_N_EVENT_REPORT,
                               lambda e: self._on_report(e, "new association"))])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    def request(self, port: int, refs: list[tuple[str, str]], transaction_uid: str,
                keep_open_s: float = 0.0) -> int:
        """Send the N-ACTION; returns its status. With keep_open_s, keep the
        association open up to that long waiting for the report on it."""
        ae = AE(ae_title=self.aet)
        ae.add_requested_context(STORAGE_COMMITMENT)
        assoc = ae.associate(
            "127.0.0.1", port, ae_title="PACSMESH",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT,
                           lambda e: self._on_report(e, "same association"))])
        assert assoc.is_established, "commitment association not established"
        try:
            ds = Dataset()
            ds.TransactionUID = transaction_uid
            items = []
            for cls, sop in refs:
                item = Dataset()
                item.ReferencedSOPClassUID = cls
                item.ReferencedSOPInstanceUID = sop
                items.append(item)
            ds.ReferencedSOPSequence = items
            status, _ = assoc.send_n_action(ds, 1, STORAGE_COMMITMENT,
                                            STORAGE_COMMITMENT_INSTANCE)
            code = int(status.Status)
            if keep_open_s and self._got.wait(keep_open_s):
                time.sleep(REPLY_GRACE_S)  # our answer to the report goes out before release
            return code
        finally:
            assoc.release()

    def wait(self, timeout_s: float) -> CommitmentReport:
        assert self._got.wait(timeout_s), f"no N-EVENT-REPORT within {timeout_s} s"
        return self.reports[-1]

    def wait_for(self, count: int, timeout_s: float) -> dict[str, CommitmentReport]:
        """Transaction UID -> its last report, once reports for `count` transactions
        have come."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = {str(r.info.TransactionUID): r for r in list(self.reports)}
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, (
                f"reports for {len(got)} of {count} transactions within {timeout_s} s")
            time.sleep(0.05)


def private_reason(item: Dataset) -> str:
    """The words PACSMESH puts in a Failed SOP Sequence item, (0009,1010)."""
    block = item.private_block(0x0009, "PACSMESH")
    value = block[0x10].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# ---- a peer that drops the association mid-transfer ----------------------------------------


def send_partial_store(port: int, path: Path, fraction: float = 0.3) -> None:
    """Associate, send the C-STORE request and part of the dataset, then close the
    socket without a release or abort: a modality losing power mid-transfer."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSMESH")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    assoc_socket = assoc.dul.socket
    assert context_id is not None and assoc_socket is not None
    sock = assoc_socket.socket
    assert sock is not None
    command = _store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    data = dataset_bytes(path)
    part = data[: int(len(data) * fraction)]
    pdus = _pdata(context_id, command, 0x03)  # command, last fragment
    pdus += _pdata(context_id, part, 0x00)  # dataset, not the last fragment
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(pdus)
    time.sleep(0.2)
    assoc_socket.close()  # RST: the peer is gone
    assoc.kill()


def _pdata(context_id: int, value: bytes, control: int) -> bytes:
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _store_command(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1)."""

    def elem(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    def uid(v: str) -> bytes:
        raw = v.encode()
        return raw + b"\x00" * (len(raw) % 2)

    body = b"".join((
        elem(0x00000002, uid(sop_class)),
        elem(0x00000100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
        elem(0x00000110, struct.pack("<H", 7)),  # message id
        elem(0x00000700, struct.pack("<H", 0)),  # priority medium
        elem(0x00000800, struct.pack("<H", 0x0001)),  # a dataset follows
        elem(0x00001000, uid(sop_instance)),
    ))
    return elem(0x00000000, struct.pack("<I", len(body))) + body
