"""The seam between the DICOM services and the node, and the verified read path.

The services need five things of a node: ingest a whole Part 10 file, judge an
instance's safety, query its catalog, read an instance's chunks, and record what
they did in its audit trail. `Archive`
names exactly those, so the services never depend on the daemon itself (and
tests could plug in something smaller).

Reading: every chunk is verified against its hash on the way out; a chunk this
node lacks or holds damaged is read from a peer through `remote` (set by the
cluster), so a node serves studies it does not hold. The instance is spooled to
a file descriptor because pynetdicom sends a dataset without re-encoding it only
from a file (see retrieve.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from pacsmesh.node.audit import AuditLog, AuditSlot
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing
from pacsmesh.node.ingest import LayoutCheck
from pacsmesh.node.service import RemoteChunks
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)
# Instances up to this size are spooled in memory (memfd); larger ones go to a
# temporary file under the data dir, so a multi-GB instance never sits in RAM.
SPOOL_MEMORY_BYTES_MAX = 64 << 20


class Archive(Protocol):
    """What the DICOM services need of a node (NodeDaemon provides it)."""

    node_id: str
    store: Store
    remote: RemoteChunks | None
    audit: AuditLog

    def ingest_bytes(self, data: bytes, client_ref: str = "", check: LayoutCheck | None = None,
                     file_hash: bytes | None = None, audit: AuditSlot | None = None
                     ) -> node_pb2.IngestResult: ...

    def ingest_file(self, path: str, client_ref: str = "", check: LayoutCheck | None = None,
                    file_hash: bytes | None = None, audit: AuditSlot | None = None
                    ) -> node_pb2.IngestResult: ...

    def instance_safety(self, sop_instance_uid: str) -> tuple[bool, str]: ...


def read_chunk(archive: Archive, key: bytes, m: node_pb2.Manifest) -> bytes:
    """A verified chunk: from this node, else (missing or damaged here) from a peer."""
    try:
        return archive.store.chunks.read(key)
    except ChunkCorrupt as exc:
        if archive.remote is None:
            raise
        LOGGER.warning("instance %s: %s; reading it from a peer", m.sop_instance_uid, exc,
                       extra={"study": m.study_instance_uid, "instance": m.sop_instance_uid})
    except ChunkMissing:
        if archive.remote is None:
            raise
    return archive.remote(key, m)


class Spooled:
    """One instance's Part 10 bytes, exactly as stored, in a file pynetdicom can open."""

    def __init__(self, fd: int, path: str, unlink: bool) -> None:
        self.fd, self.path, self._unlink = fd, path, unlink

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _new_spool(label: str, size: int, tmp_dir: Path) -> Spooled:
    if hasattr(os, "memfd_create") and size <= SPOOL_MEMORY_BYTES_MAX:
        fd = os.memfd_create(f"pacsmesh-{label}", os.MFD_CLOEXEC)
        return Spooled(fd, f"/proc/self/fd/{fd}", unlink=False)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="instance-", suffix=".dcm", dir=tmp_dir)
    return Spooled(fd, path, unlink=True)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def spool_bytes(data: bytes, label: str, tmp_dir: Path) -> Spooled:
    """`data` (e.g. an instance converted for sending) in a fresh file; the caller
    closes it."""
    out = _new_spool(label, len(data), tmp_dir)
    try:
        write_all(out.fd, data)
    except BaseException:
        out.close()
        raise
    return out


def spool(archive: Archive, m: node_pb2.Manifest, tmp_dir: Path) -> Spooled:
    """Read every chunk of an instance (verified) into a fresh file; the caller closes it.
    Raises ChunkMissing / ChunkCorrupt when no reachable node has a good copy."""
    out = _new_spool(m.sop_instance_uid, m.size, tmp_dir)
    fd = out.fd
    try:
        written = 0
        for ref in m.chunks:
            data = read_chunk(archive, ref.hash, m)
            write_all(fd, data)
            written += len(data)
        if written != m.size:
            raise ChunkCorrupt(f"instance {m.sop_instance_uid}: read {written} bytes, "
                               f"the manifest says {m.size}")
    except BaseException:
        out.close()
        raise
    return out
