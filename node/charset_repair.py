"""Re-decoding the text of instances stored before character sets were honoured.

Until then ingest read text as UTF-8 under ISO_IR 192 and as Latin-1 under any
other Specific Character Set: right for ISO_IR 100, UTF-8 and plain ASCII, but
Cyrillic, Greek, Japanese, Chinese... names became Latin-1 mojibake, which no
query in those scripts could match. The manifest does not record the set, and a
manifest never changes (its id is its hash), so this worker reads each suspect
instance's header again (from this node, else from a peer), decodes its text
with its own set, and records what differs beside the manifest (the catalog's
`text_fix`; the study record takes it too). C-FIND reads manifests through
those fixes (`Catalog.with_text_fixes`).

Suspects are queued once per data dir when it is opened and on every manifest
added since (a peer on an older version keeps making them): texts beyond
printable ASCII with nothing beyond Latin-1 (`charset.maybe_misdecoded`).
Latin-1 names (`Müller`) are suspects too; their check finds nothing to fix.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable

from pacsmesh.node.dicom_layout import TEXT_FIELDS, header_attrs
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing, InvalidInstance
from pacsmesh.node.store import Store
from pacsmesh.node.worker import Worker, WorkerState
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)
CHECK_BATCH = 64  # instances re-read per step: a header is one chunk, usually a few KB

# (chunk key, manifest) -> the chunk's verified plain bytes, from here or a peer
ReadChunk = Callable[[bytes, node_pb2.Manifest], bytes]


class _ChunkFile:
    """A forward-reading view of an instance's chunks, loading one chunk at a time: the
    header walk stops at the Pixel Data, so the body is never read."""

    def __init__(self, m: node_pb2.Manifest, read: ReadChunk) -> None:
        self._m, self._read = m, read
        self._starts: list[int] = []
        pos = 0
        for c in m.chunks:
            self._starts.append(pos)
            pos += c.size
        self.size, self._pos = pos, 0
        self._base, self._data = -1, b""

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0, /) -> int:
        self._pos = max(0, {0: 0, 1: self._pos, 2: self.size}[whence] + offset)
        return self._pos

    def read(self, n: int = -1, /) -> bytes:
        out = []
        n = self.size - self._pos if n < 0 else min(n, self.size - self._pos)
        while n > 0:
            if not self._base <= self._pos < self._base + len(self._data):
                i = bisect.bisect_right(self._starts, self._pos) - 1
                self._base = self._starts[i]
                self._data = self._read(self._m.chunks[i].hash, self._m)
            part = self._data[self._pos - self._base : self._pos - self._base + n]
            out.append(part)
            self._pos += len(part)
            n -= len(part)
        return b"".join(out)


def redecoded(m: node_pb2.Manifest, read: ReadChunk) -> dict[str, str]:
    """The text fields whose value, decoded with the instance's own character set,
    differs from the manifest's. Raises InvalidInstance for a header that does not
    walk or names another instance, ChunkMissing/ChunkCorrupt when unreadable."""
    f = _ChunkFile(m, read)
    attrs = header_attrs(f, f.size)
    if attrs.get("sop_instance_uid") != m.sop_instance_uid:
        raise InvalidInstance("the stored header names another instance")
    return {name: attrs[name] for name in TEXT_FIELDS
            if attrs.get(name) and attrs[name] != getattr(m, name)}


class CharsetRepair(Worker):
    name = "charset-repair"
    # new suspects come with ingest or replication, and unreadable ones are retried
    # after this: no hurry either way
    idle_s = 30.0

    def __init__(self, store: Store, read: ReadChunk) -> None:
        self.store, self.read = store, read
        self._after = b""  # past the instances that could not be read this round

    async def step(self) -> WorkerState:
        busy = await asyncio.get_running_loop().run_in_executor(None, self._batch)
        return WorkerState.BUSY if busy else WorkerState.IDLE

    def _batch(self) -> bool:
        """One batch of checks; False when nothing is left to try this round."""
        catalog = self.store.catalog
        batch = catalog.text_checks(self._after, CHECK_BATCH)
        if not batch:
            self._after = b""  # a new round retries the unreadable ones
            return False
        for mid, m in batch:
            try:
                fixes = redecoded(m, self.read)
            except (ChunkMissing, ChunkCorrupt) as exc:
                LOGGER.debug("instance %s: header unreadable for now: %s",
                             m.sop_instance_uid, exc)
                self._after = mid  # skipped until the next round
                continue
            except InvalidInstance as exc:  # never will decode: leave its text as it is
                LOGGER.warning("instance %s: text not re-decoded: %s", m.sop_instance_uid, exc,
                               extra={"instance": m.sop_instance_uid})
                fixes = {}
            catalog.text_checked(mid, fixes)
            if fixes:
                LOGGER.info("instance %s: text re-decoded with its character set (%s)",
                            m.sop_instance_uid, ", ".join(sorted(fixes)))
        return True
