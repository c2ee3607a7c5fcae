"""Client side of `put`: chunk, hash and compress here, send only what the node lacks.

Like restic: the client cuts each file at the same DICOM-aware boundaries the
node uses, hashes every chunk, asks the node which whole files and chunks it
already holds, and streams only the rest, zstd-compressed. Files are planned
in a thread pool a batch ahead of the sender, so reading, hashing and
compressing here overlap with verifying and writing on the node. Memory stays
bounded: small files are kept between the two passes, large ones are read twice.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pacsmesh.node import codec
from pacsmesh.node.chunking import CHUNK_SIZE, chunk_spans
from pacsmesh.node.dicom_layout import scan
from pacsmesh.node.errors import InvalidInstance
from pacsmesh.node.hashing import FileHasher, content_hash
from pacsmesh.node.packs import FLAG_ZSTD
from pacsmesh.proto import node_pb2, node_pb2_grpc

Outcome = node_pb2.IngestResult.Outcome
BATCH_FILES_MAX = 16  # files per precheck round trip: small, so the node starts early
PLAN_AHEAD_FILES = 64  # files planned ahead of the sender
BATCH_BYTES_MAX = 64 << 20  # plain bytes kept in memory per batch
KEEP_PLAIN_MAX = 8 << 20  # files up to this size are read once, not twice
PLAN_THREADS = 2
COMPRESS_THREADS = 2
STREAMS = 2  # concurrent Ingest streams per put


@dataclass
class FilePlan:
    ref: int
    path: Path
    size: int
    header_len: int
    spans: list[tuple[int, int]]
    hashes: list[bytes]
    file_hash: bytes
    plain: list[bytes] | None  # kept for small files
    transfer_syntax: str = ""  # native syntaxes get their pixel chunks shuffled (codec.py)


@dataclass
class PutReport:
    stored: int = 0
    duplicates: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    bytes_in: int = 0
    bytes_written: int = 0
    studies: set[str] = field(default_factory=set)
    sent_bytes: int = 0  # on the wire, compressed

    def as_json(self) -> dict[str, Any]:
        return {"stored": self.stored, "duplicates": self.duplicates, "rejected": self.rejected,
                "bytes_in": self.bytes_in, "bytes_written": self.bytes_written,
                "studies": sorted(self.studies)}


def expand(paths: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named or found under folders (sorted, so runs are repeatable)."""
    files: list[Path] = []
    problems: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files.extend(Path(root) / n for n in sorted(names))
        elif p.is_file():
            files.append(p)
        elif p.exists():
            problems.append({"path": raw, "reason": "not a regular file"})
        else:
            problems.append({"path": raw, "reason": "no such file or directory"})
    return files, problems


def plan_file(ref: int, path: Path) -> FilePlan:
    """Validate and hash one file. Raises InvalidInstance or OSError with the reason."""
    with open(path, "rb", buffering=0) as raw:
        size = os.fstat(raw.fileno()).st_size
        if size <= KEEP_PLAIN_MAX:  # one read; everything after works on memory
            whole = raw.read()
            if len(whole) != size:
                raise InvalidInstance("file changed while it was being read")
            layout = scan(io.BytesIO(whole), size)
            spans = chunk_spans(size, layout.header_len, CHUNK_SIZE)
            view = memoryview(whole)
            plain = [bytes(view[o : o + n]) for o, n in spans] if len(spans) > 1 else [whole]
            return FilePlan(ref, path, size, layout.header_len, spans,
                            [content_hash(p) for p in plain], content_hash(whole), plain,
                            layout.transfer_syntax_uid)
        with open(raw.fileno(), "rb", buffering=1 << 16, closefd=False) as f:
            layout = scan(f, size)
        spans = chunk_spans(size, layout.header_len, CHUNK_SIZE)
        hasher = FileHasher()
        hashes: list[bytes] = []
        for offset, length in spans:
            data = os.pread(raw.fileno(), length, offset)
            if len(data) != length:
                raise InvalidInstance("file changed while it was being read")
            hashes.append(content_hash(data))
            hasher.update(data)
    return FilePlan(ref, path, size, layout.header_len, spans, hashes, hasher.digest(), None,
                    layout.transfer_syntax_uid)


def plan_or_reason(ref: int, path: Path) -> FilePlan | str:
    try:
        return plan_file(ref, path)
    except InvalidInstance as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


def _parts(plan: FilePlan, send: set[bytes]
           ) -> list[node_pb2.IngestMessage] | Iterator[node_pb2.IngestMessage]:
    """The messages of one file: compressed chunks it must send, references elsewhere."""
    missing = set(send)

    def part(h: bytes, offset: int, length: int, data: bytes | None) -> node_pb2.IngestMessage:
        if data is None or h not in missing:
            return node_pb2.IngestMessage(part=node_pb2.IngestPart(hash=h, plain_len=length,
                                                                   have=True))
        missing.discard(h)  # a chunk repeated inside one file travels once too
        packed, flags = codec.encode(data, codec.shuffled(plan.transfer_syntax, offset,
                                                          plan.header_len))
        return node_pb2.IngestMessage(part=node_pb2.IngestPart(
            hash=h, plain_len=length, compressed=bool(flags & FLAG_ZSTD), flags=flags,
            data=packed))

    begin = node_pb2.IngestMessage(begin=node_pb2.IngestBegin(
        client_ref=str(plan.ref), size=plan.size, file_hash=plan.file_hash,
        header_len=plan.header_len, chunk_count=len(plan.spans)))
    end = node_pb2.IngestMessage(end=node_pb2.IngestEnd())
    if plan.plain is not None:
        return [begin, *(part(h, offset, len(d), d if h in missing else None)
                         for h, d, (offset, _) in zip(plan.hashes, plan.plain, plan.spans,
                                                      strict=True)), end]

    def stream() -> Iterator[node_pb2.IngestMessage]:
        yield begin
        with open(plan.path, "rb") as f:
            for h, (offset, length) in zip(plan.hashes, plan.spans, strict=True):
                if h not in missing:
                    yield part(h, offset, length, None)
                    continue
                data = os.pread(f.fileno(), length, offset)
                if content_hash(data) != h:
                    yield node_pb2.IngestMessage(abort=node_pb2.IngestAbort(
                        reason="file changed while it was being sent"))
                    return
                yield part(h, offset, length, data)
        yield end

    return stream()


class Uploader:
    def __init__(self, channel: grpc.Channel,
                 on_settled: Callable[[int], None] | None = None) -> None:
        self.stub = node_pb2_grpc.NodeApiStub(channel)
        self.on_settled = on_settled  # called with a file's ref once it has its outcome
        self.report = PutReport()
        self.paths: dict[str, Path] = {}
        self._settled: set[int] = set()  # refs with an outcome; each file gets exactly one
        self._lock = threading.Lock()

    def _reject(self, path: Path | str, reason: str) -> None:
        with self._lock:
            self.report.rejected.append({"path": str(path), "reason": reason})

    def _settle(self, ref: int) -> bool:
        """Claim the one outcome of a file; False if it already has one. (When a call
        fails, the request generator and the response loop race to report it.)"""
        with self._lock:
            if ref in self._settled:
                return False
            self._settled.add(ref)
        if self.on_settled is not None:
            self.on_settled(ref)
        return True

    def _requests(self, files: list[tuple[int, Path]], pool: ThreadPoolExecutor,
                  zpool: ThreadPoolExecutor) -> Iterator[node_pb2.IngestMessage]:
        futures: list[tuple[int, Path, Future[FilePlan | str]]] = [
            (i, p, pool.submit(plan_or_reason, i, p)) for i, p in files[:PLAN_AHEAD_FILES]]
        next_i = len(futures)
        while futures:
            batch: list[FilePlan] = []
            batch_bytes = 0
            while futures and len(batch) < BATCH_FILES_MAX and batch_bytes < BATCH_BYTES_MAX:
                ref, path, fut = futures.pop(0)
                if next_i < len(files):  # keep the planners ahead of the sender
                    later_ref, later = files[next_i]
                    futures.append((later_ref, later,
                                    pool.submit(plan_or_reason, later_ref, later)))
                    next_i += 1
                plan = fut.result()
                if isinstance(plan, str):
                    if self._settle(ref):
                        self._reject(path, plan)
                    continue
                batch.append(plan)
                batch_bytes += plan.size if plan.plain is not None else 0
            if not batch:
                continue
            try:
                reply = self.stub.Precheck(node_pb2.PrecheckRequest(
                    file_hashes=[p.file_hash for p in batch],
                    chunk_hashes=list({h for p in batch for h in p.hashes})))
            except grpc.RpcError as exc:
                # Stop sending but end the stream cleanly: instances already sent may still
                # be acknowledged (a stopping node finishes them); the rest get this reason.
                why = f"not sent: the node stopped answering ({exc.code().name})"
                for plan in batch:
                    if self._settle(plan.ref):
                        self._reject(plan.path, why)
                for ref, path, fut in futures:
                    fut.cancel()
                    if self._settle(ref):
                        self._reject(path, why)
                for ref, path in files[next_i:]:
                    if self._settle(ref):
                        self._reject(path, why)
                return
            known = set(reply.known_file_hashes)
            missing = set(reply.missing_chunk_hashes)
            todo = []
            for plan in batch:
                with self._lock:
                    self.report.bytes_in += plan.size
                if plan.file_hash in known:
                    if self._settle(plan.ref):
                        with self._lock:
                            self.report.duplicates += 1
                    continue
                with self._lock:
                    self.paths[str(plan.ref)] = plan.path
                todo.append(plan)
            # compress in the pool while earlier messages are on the wire
            # a chunk that several files of the batch share travels once, with the first
            sends: list[set[bytes]] = []
            for plan in todo:
                mine = {h for h in plan.hashes if h in missing}
                missing -= mine
                sends.append(mine)
            prepared = [zpool.submit(_parts, p, send) for p, send in zip(todo, sends, strict=True)]
            for msgs in prepared:
                for msg in msgs.result():
                    if msg.WhichOneof("kind") == "part":
                        with self._lock:
                            self.report.sent_bytes += len(msg.part.data)
                    yield msg

    def put(self, files: list[Path], streams: int = STREAMS) -> PutReport:
        """Send the files over `streams` concurrent Ingest streams (the node verifies each
        stream on its own worker thread, so two streams use both of its cores)."""
        numbered = list(enumerate(files))
        with ThreadPoolExecutor(PLAN_THREADS, thread_name_prefix="plan") as pool, \
                ThreadPoolExecutor(COMPRESS_THREADS, thread_name_prefix="zstd") as zpool:
            shares = [numbered[i::streams] for i in range(streams) if numbered[i::streams]]
            if len(shares) <= 1:
                self._stream(numbered, pool, zpool)
            else:
                with ThreadPoolExecutor(len(shares), thread_name_prefix="stream") as senders:
                    for fut in [senders.submit(self._stream, share, pool, zpool)
                                for share in shares]:
                        fut.result()
        return self.report

    def _stream(self, files: list[tuple[int, Path]], pool: ThreadPoolExecutor,
                zpool: ThreadPoolExecutor) -> None:
        try:
            for res in self.stub.Ingest(self._requests(files, pool, zpool)):
                if not res.client_ref.isdigit() or self._settle(int(res.client_ref)):
                    self._account(res)
        except grpc.RpcError as exc:
            # every file gets an outcome: what the node never acknowledged is a failure
            detail = f"{exc.code().name}: {exc.details()}"
            for ref, path in files:
                if self._settle(ref):
                    self._reject(path, f"not acknowledged by the node ({detail})")

    def _account(self, res: node_pb2.IngestResult) -> None:
        path = self.paths.get(res.client_ref, Path(f"#{res.client_ref}"))
        with self._lock:
            self._account_locked(res, path)

    def _account_locked(self, res: node_pb2.IngestResult, path: Path) -> None:
        if res.outcome == Outcome.STORED:
            self.report.stored += 1
            self.report.bytes_written += res.bytes_written
            self.report.studies.add(res.study_instance_uid)
        elif res.outcome == Outcome.DUPLICATE:
            self.report.duplicates += 1
        else:
            self.report.rejected.append({"path": str(path), "reason": res.reason})

