"""The audit trail: who did what to which study, append-only and durable.

One JSON object per line in data_dir/audit/YYYY-MM-DD.jsonl (UTC days), files
opened O_APPEND and never rewritten. `record()` returns once its event is on
disk (fdatasync): a writer thread commits whatever events are waiting in one
write and one sync (group commit), so concurrent callers share the cost. A
crash can leave a torn last line; readers skip it and the writer starts the
next event on a fresh line.

Events name studies and instances by UID and callers by certificate subject or
calling AE title; never patient names, IDs or birth dates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)
DETAIL_MAX = 500  # characters: a reason, not a document
QUEUE_MAX = 100_000  # events waiting for the writer; beyond, callers wait for room
READ_LIMIT_MAX = 10_000


@dataclass(frozen=True)
class Event:
    time: float  # unix seconds
    who: str  # "operator:alice", "node:boston", "AE:CT1", "anonymous"
    role: str  # node | operator | reader | dicom | "" (plaintext)
    address: str
    action: str  # put, get, ls, locate, scrub, drill, audit, C-STORE, C-FIND, ...
    outcome: str  # ok | refused | failed | partial
    study_uid: str = ""
    instances: int = 0
    detail: str = ""


@dataclass
class AuditSlot:
    """An audit event to be written by the store's group commit with the instance it
    is about (durable together, before the caller answers); `written` once it was,
    `error` when it could not be (the instance is stored all the same)."""

    event: Event | None = None
    written: bool = False
    error: str = ""


class AuditLog:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "audit"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._queue: list[tuple[Event, Future[None]]] = []
        self._closed = False
        self._write_lock = threading.Lock()  # the writer thread and record_now
        self._day = ""
        self._fd = -1
        self._thread = threading.Thread(target=self._writer, name="audit", daemon=True)
        self._thread.start()

    def record(self, event: Event, wait: bool = True) -> None:
        """Appends one event; with `wait`, returns once it is durable."""
        event = _trimmed(event)
        fut: Future[None] = Future()
        with self._cond:
            if self._closed:
                LOGGER.error("audit log closed; event lost: %s %s", event.action, event.outcome)
                return
            while len(self._queue) >= QUEUE_MAX:
                self._cond.wait()
            self._queue.append((event, fut))
            self._cond.notify_all()
        if wait:
            fut.result()

    def record_now(self, events: list[Event]) -> None:
        """Write `events` durably in this thread (a group committer that already has
        them batched); raises OSError if they cannot be."""
        self._write([(_trimmed(e), None) for e in events])

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self, day: str) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.dir / f"{day}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        if size:  # after a crash the last line may be torn: never glue onto it
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")
        self._day = day
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name survives a crash too
        finally:
            os.close(dir_fd)

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                self._cond.notify_all()
                closing = self._closed
            if batch:
                try:
                    self._write(batch)
                except OSError as exc:  # a full disk: callers learn it, nothing silently lost
                    LOGGER.error("cannot write the audit log: %s", exc)
                    for _, fut in batch:
                        fut.set_exception(exc)
                else:
                    for _, fut in batch:
                        fut.set_result(None)
            if closing and not batch:
                return

    def _write(self, batch: Sequence[tuple[Event, Future[None] | None]]) -> None:
        with self._write_lock:
            self._write_locked(batch)

    def _write_locked(self, batch: Sequence[tuple[Event, Future[None] | None]]) -> None:
        lines: dict[str, list[bytes]] = {}
        for event, _ in batch:
            day = time.strftime("%Y-%m-%d", time.gmtime(event.time))
            doc = json.dumps(asdict(event), separators=(",", ":"))
            lines.setdefault(day, []).append(doc.encode() + b"\n")
        for day, chunk in lines.items():
            if day != self._day:
                self._open(day)
            data = b"".join(chunk)
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
            os.fdatasync(self._fd)

    # ---- reading -----------------------------------------------------------------------

    def read(self, since: float = 0.0, study_uid: str = "", limit: int = 1000,
             after: str = "") -> tuple[list[Event], str]:
        """Events at or after `since`, oldest first, at most `limit`; and the cursor to
        pass as `after` for the next page ("" when there is none). A cursor is
        "DAY:LINE", a position in the append-only files, so pages never skip or repeat."""
        limit = max(1, min(limit, READ_LIMIT_MAX))
        first_day = time.strftime("%Y-%m-%d", time.gmtime(since)) if since > 0 else ""
        after_day, _, after_line = after.partition(":")
        skip = int(after_line) if after_line.isdigit() else -1
        out: list[Event] = []
        for path in sorted(self.dir.glob("*.jsonl")):
            day = path.stem
            if day < first_day or (after_day and day < after_day):
                continue
            for index, event in _events(path):
                if day == after_day and index <= skip:
                    continue
                if event.time < since or (study_uid and event.study_uid != study_uid):
                    continue
                out.append(event)
                if len(out) >= limit:
                    return out, f"{day}:{index}"
        return out, ""


def _trimmed(event: Event) -> Event:
    if len(event.detail) > DETAIL_MAX:
        return Event(**{**asdict(event), "detail": event.detail[:DETAIL_MAX] + "..."})
    return event


def _events(path: Path) -> Iterator[tuple[int, Event]]:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for index, line in enumerate(f):
            try:
                yield index, Event(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn line from a crash
