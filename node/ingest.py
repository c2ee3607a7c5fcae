"""One ingest stream: verify every chunk, rebuild the file's identity, prepare its manifest.

The client did the chunking, hashing and compression (the work is spread over
both processes, as restic does), but nothing it says is trusted: each chunk is
decompressed and hashed before it is written, the whole-file hash is recomputed
over the chunks in order, and the DICOM structure and UIDs are validated here
again from the stored bytes. A session is driven by one stream, one message at
a time, from a worker thread; it never holds more than one chunk and the
instance's header in memory.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from pacsmesh.node import codec
from pacsmesh.node import manifest as mf
from pacsmesh.node.chunking import CHUNK_PLAIN_MAX, CHUNK_SIZE, chunk_spans
from pacsmesh.node.dicom_layout import Layout, scan
from pacsmesh.node.errors import (
    ChunkCorrupt,
    ChunkMissing,
    InvalidInstance,
    PacsmeshError,
    StoreFull,
)
from pacsmesh.node.hashing import HASH_LEN, FileHasher, content_hash
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.packs import FLAG_ZSTD
from pacsmesh.node.store import Store
from pacsmesh.proto import node_pb2

Outcome = node_pb2.IngestResult.Outcome
CHUNKS_PER_INSTANCE_MAX = 1 << 20  # 1 TiB at 1 MiB chunks: far past any real instance
HEADER_CACHE_MAX = 8 << 20  # header chunks kept in memory for the structure walk


@dataclass
class Prepared:
    """An instance that passed every check and waits for the group commit."""

    client_ref: str
    manifest_id: bytes
    raw: bytes
    manifest: node_pb2.Manifest
    bytes_written: int


@dataclass
class _Instance:
    begin: node_pb2.IngestBegin
    hasher: FileHasher = field(default_factory=FileHasher)
    chunks: list[tuple[bytes, int]] = field(default_factory=list)
    received: int = 0
    bytes_written: int = 0
    cache: dict[bytes, bytes] = field(default_factory=dict)
    cached: int = 0
    failure: str = ""  # set once: the rest of the instance is drained, not stored


class ChunkReader:
    """A seekable read-only view of an instance's chunk list, for the structure walk.

    Plain object rather than an io class: the walk makes tens of thousands of
    small reads per instance, and io's machinery would dominate them."""

    def __init__(self, store: Store, chunks: list[tuple[bytes, int]], cache: dict[bytes, bytes]):
        self._store, self._chunks, self._cache = store, chunks, cache
        self._starts: list[int] = []
        pos = 0
        for _, size in chunks:
            self._starts.append(pos)
            pos += size
        self._size, self._pos = pos, 0
        self._base, self._data = -1, b""  # the chunk under the cursor

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _load(self, pos: int) -> None:
        i = bisect.bisect_right(self._starts, pos) - 1
        key = self._chunks[i][0]
        data = self._cache.get(key)
        self._base, self._data = self._starts[i], data if data is not None else (
            self._store.chunks.read(key))

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._size - self._pos
        out = b""
        while n > 0 and self._pos < self._size:
            off = self._pos - self._base
            if self._base < 0 or not 0 <= off < len(self._data):
                self._load(self._pos)
                off = self._pos - self._base
            piece = self._data[off : off + n]
            out = piece if not out else out + piece
            self._pos += len(piece)
            n -= len(piece)
        return out


class IngestSession:
    def __init__(self, store: Store, node_id: str, clock: HybridClock) -> None:
        self.store = store
        self.node_id = node_id
        self.clock = clock
        self._cur: _Instance | None = None

    def on_messages(self, msgs: list[node_pb2.IngestMessage]
                    ) -> list[Prepared | node_pb2.IngestResult]:
        """Several messages in one call: one thread hop per instance, not per chunk."""
        return [out for msg in msgs if (out := self.on_message(msg)) is not None]

    def on_message(self, msg: node_pb2.IngestMessage) -> Prepared | node_pb2.IngestResult | None:
        kind = msg.WhichOneof("kind")
        if kind == "begin":
            return self._begin(msg.begin)
        cur = self._cur
        if cur is None:
            return _rejected("", f"protocol error: '{kind}' outside an instance")
        if kind == "part":
            if not cur.failure:
                try:
                    self._part(cur, msg.part)
                except (InvalidInstance, ChunkCorrupt, ChunkMissing, StoreFull) as exc:
                    cur.failure = str(exc)
            return None
        self._cur = None
        if kind == "abort":
            return _rejected(cur.begin.client_ref, f"sender aborted: {msg.abort.reason}")
        if cur.failure:
            return _rejected(cur.begin.client_ref, cur.failure)
        try:
            return self._end(cur)
        except PacsmeshError as exc:
            return _rejected(cur.begin.client_ref, str(exc))

    def _begin(self, begin: node_pb2.IngestBegin) -> node_pb2.IngestResult | None:
        previous = self._cur
        self._cur = _Instance(begin=begin)
        if previous is not None:
            return _rejected(previous.begin.client_ref, "protocol error: instance never ended")
        if len(begin.file_hash) != HASH_LEN:
            self._cur.failure = "protocol error: file hash has the wrong length"
        elif begin.chunk_count > CHUNKS_PER_INSTANCE_MAX:
            self._cur.failure = f"too many chunks ({begin.chunk_count})"
        else:
            try:
                self.store.admit(begin.size)
            except StoreFull as exc:
                self._cur.failure = str(exc)
        return None

    def _part(self, cur: _Instance, part: node_pb2.IngestPart) -> None:
        if len(cur.chunks) >= cur.begin.chunk_count:
            raise InvalidInstance("protocol error: more chunks than announced")
        if len(part.hash) != HASH_LEN or part.plain_len > CHUNK_PLAIN_MAX:
            raise InvalidInstance("protocol error: bad chunk reference")
        if part.have:
            self.store.chunks.note_reuse([part.hash])  # GC leaves it while we name it
            plain = self.store.chunks.read(part.hash)  # verifies: never dedup onto a bad chunk
            if len(plain) != part.plain_len:
                raise InvalidInstance(
                    f"protocol error: chunk {len(cur.chunks)} is {len(plain)} bytes here, "
                    f"the sender says {part.plain_len}")
        else:
            data = part.data
            flags = part.flags or (FLAG_ZSTD if part.compressed else 0)
            try:
                plain = codec.decode(data, flags, part.plain_len)
            except ChunkCorrupt as exc:
                raise InvalidInstance(f"chunk {len(cur.chunks)}: {exc}") from exc
            if len(plain) != part.plain_len or content_hash(plain) != part.hash:
                raise InvalidInstance(
                    f"chunk {len(cur.chunks)} failed verification: the bytes sent do not "
                    "match their hash (corrupted in transit?)"
                )
            cur.bytes_written += self.store.chunks.put(part.hash, part.plain_len, data, flags)
        if cur.received < cur.begin.header_len + 64 and cur.cached + len(plain) <= HEADER_CACHE_MAX:
            cur.cache[part.hash] = plain
            cur.cached += len(plain)
        cur.hasher.update(plain)
        cur.chunks.append((part.hash, part.plain_len))
        cur.received += part.plain_len
        if cur.received > cur.begin.size:
            raise InvalidInstance("protocol error: more bytes than announced")

    def _end(self, cur: _Instance) -> Prepared | node_pb2.IngestResult:
        b = cur.begin
        if cur.received != b.size or len(cur.chunks) != b.chunk_count:
            raise InvalidInstance(
                f"incomplete: received {cur.received} of {b.size} bytes "
                f"in {len(cur.chunks)} of {b.chunk_count} chunks"
            )
        if cur.hasher.digest() != b.file_hash:
            raise InvalidInstance("whole-file hash does not match the bytes received")
        known = self.store.catalog.file_known(b.file_hash)
        if known is not None:
            return node_pb2.IngestResult(
                client_ref=b.client_ref, outcome=Outcome.DUPLICATE, manifest_id=known
            )
        layout = scan(ChunkReader(self.store, cur.chunks, cur.cache), b.size)
        return _prepared(self.store, self.node_id, self.clock, b.client_ref, layout,
                         b.file_hash, cur.chunks, cur.bytes_written)

    def close(self) -> node_pb2.IngestResult | None:
        """The stream ended; an instance still open was not stored."""
        cur, self._cur = self._cur, None
        if cur is None:
            return None
        return _rejected(cur.begin.client_ref, "stream ended before the instance was complete")


def _rejected(client_ref: str, reason: str) -> node_pb2.IngestResult:
    return node_pb2.IngestResult(client_ref=client_ref, outcome=Outcome.REJECTED, reason=reason)


# Called with an instance's layout before anything of it is written (a C-STORE checks
# its UIDs against the request's here); raises to refuse it.
LayoutCheck = Callable[[Layout], None]
READ_BLOCK = 8 << 20  # hashing a spooled file this much at a time


def prepare_local(store: Store, node_id: str, clock: HybridClock, data: bytes,
                  client_ref: str, check: LayoutCheck | None = None,
                  file_hash: bytes | None = None) -> Prepared | node_pb2.IngestResult:
    """A whole file already in this process (a DICOM C-STORE): the same structure and
    UID checks as `pacsmesh put`, without re-verifying chunks we hash ourselves here.
    `file_hash`: its hash, if the caller computed it as the bytes arrived.
    Raises InvalidInstance or StoreFull with the reason."""
    view = memoryview(data)
    return _prepare_whole(store, node_id, clock, io.BytesIO(data), len(data),
                          lambda offset, length: view[offset:offset + length],
                          file_hash or content_hash(data), client_ref, check)


def prepare_file(store: Store, node_id: str, clock: HybridClock, path: str,
                 client_ref: str, check: LayoutCheck | None = None,
                 file_hash: bytes | None = None) -> Prepared | node_pb2.IngestResult:
    """As prepare_local, for a file on disk (an instance too big to hold in memory):
    read a chunk at a time, so memory stays bounded whatever its size."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        if file_hash is None:
            hasher = FileHasher()
            for offset in range(0, size, READ_BLOCK):
                hasher.update(os.pread(fd, READ_BLOCK, offset))
            file_hash = hasher.digest()
        return _prepare_whole(store, node_id, clock, f, size,
                              lambda offset, length: os.pread(fd, length, offset),
                              file_hash, client_ref, check)


def _prepare_whole(store: Store, node_id: str, clock: HybridClock, fp: BinaryIO, size: int,
                   span: Callable[[int, int], bytes | memoryview], file_hash: bytes,
                   client_ref: str, check: LayoutCheck | None
                   ) -> Prepared | node_pb2.IngestResult:
    layout = scan(fp, size)
    if check is not None:
        check(layout)
    known = store.catalog.file_known(file_hash)
    if known is not None:
        return node_pb2.IngestResult(client_ref=client_ref, outcome=Outcome.DUPLICATE,
                                     manifest_id=known)
    store.admit(size)
    ts = layout.transfer_syntax_uid
    chunks: list[tuple[bytes, int]] = []
    written = 0
    for offset, length in chunk_spans(size, layout.header_len, CHUNK_SIZE):
        plain = span(offset, length)
        if len(plain) != length:
            raise InvalidInstance(f"file shrank while being stored ({offset + len(plain)} "
                                  f"of {size} bytes)")
        key = content_hash(plain)
        if store.chunks.has(key):
            store.chunks.note_reuse([key])  # GC leaves it while we name it
            store.chunks.read(key)  # verifies: never dedup onto a damaged chunk
        else:
            stored, flags = codec.encode(plain, codec.shuffled(ts, offset, layout.header_len))
            written += store.chunks.put(key, length, stored, flags)
        chunks.append((key, length))
    return _prepared(store, node_id, clock, client_ref, layout, file_hash, chunks, written)


def _prepared(store: Store, node_id: str, clock: HybridClock, client_ref: str, layout: Layout,
              file_hash: bytes, chunks: list[tuple[bytes, int]], written: int) -> Prepared:
    """The manifest of a verified instance whose chunks are all here."""
    elsewhere = store.catalog.manifest_of_file(file_hash)
    if elsewhere is not None:  # known from a peer, chunks now here: hold that version
        return Prepared(client_ref, elsewhere[0], elsewhere[1], mf.decode(elsewhere[1]), written)
    m = mf.build(layout, file_hash, chunks, node_id, clock.now())
    manifest_id, raw = mf.encode(m)
    return Prepared(client_ref, manifest_id, raw, m, written)
