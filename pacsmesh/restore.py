"""Client side of `get`: write each instance as DIR/STUDY/SERIES/SOP.dcm, verified.

Every byte is checked here again against the manifest's whole-file hash and
size (the node checked every chunk): what lands on disk is what was stored.
A file appears under its final name only once complete, verified and fsync'd.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pacsmesh.node import manifest as mf
from pacsmesh.node.hashing import FileHasher, content_hash
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto import node_pb2, node_pb2_grpc


@dataclass
class GetReport:
    study_uid: str
    out_dir: str
    instances: int = 0
    bytes: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "out": self.out_dir, "instances": self.instances,
                "bytes": self.bytes, "failed": self.failed, "seconds": round(self.seconds, 3)}


class _Sink:
    def __init__(self, out: Path, raw: bytes, manifest_id: bytes) -> None:
        if content_hash(raw) != manifest_id:
            raise ValueError("manifest does not match its id")
        self.m = mf.decode(raw)
        for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            if problem := uid_problem(getattr(self.m, name)):
                raise ValueError(f"{name} {problem}")  # never let a UID pick the path
        folder = out / self.m.study_instance_uid / self.m.series_instance_uid
        folder.mkdir(parents=True, exist_ok=True)
        self.final = folder / f"{self.m.sop_instance_uid}.dcm"
        self.tmp = folder / f".{self.m.sop_instance_uid}.dcm.partial"
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.hasher = FileHasher()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        self.size += len(data)
        self.f.write(data)

    def finish(self) -> str | None:
        """None when verified and in place, else why not."""
        if self.size != self.m.size or self.hasher.digest() != self.m.file_hash:
            self.abort()
            return "restored bytes do not match the manifest's size and hash"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.tmp.replace(self.final)
        return None

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def get_study(channel: grpc.Channel, study_uid: str, out: Path,
              on_instance: Callable[[int], None] | None = None) -> GetReport:
    """Restore every instance of a study into out/STUDY/SERIES/SOP.dcm, each verified
    against its manifest; `on_instance(bytes)` after each one is in place or failed."""
    stub = node_pb2_grpc.NodeApiStub(channel)
    report = GetReport(study_uid=study_uid, out_dir=str(out))
    started = time.monotonic()
    sink: _Sink | None = None
    try:
        for msg in stub.GetStudy(node_pb2.GetStudyRequest(study_uid=study_uid)):
            kind = msg.WhichOneof("kind")
            if kind == "start":
                try:
                    sink = _Sink(out, msg.start.manifest, msg.start.manifest_id)
                except ValueError as exc:
                    report.failed.append({"sop_instance_uid": "?", "reason": str(exc)})
                    sink = None
            elif kind == "data" and sink is not None:
                sink.write(msg.data.data)
            elif kind == "end" and sink is not None:
                if problem := sink.finish():
                    report.failed.append({"sop_instance_uid": sink.m.sop_instance_uid,
                                          "reason": problem})
                else:
                    report.instances += 1
                    report.bytes += sink.size
                if on_instance is not None:
                    on_instance(sink.size)
                sink = None
            elif kind == "error":
                if sink is not None:
                    sink.abort()
                    sink = None
                report.failed.append({"sop_instance_uid": msg.error.sop_instance_uid,
                                      "reason": msg.error.reason})
    finally:
        if sink is not None:
            sink.abort()
            report.failed.append({"sop_instance_uid": sink.m.sop_instance_uid,
                                  "reason": "the stream ended in the middle of this instance"})
    report.seconds = time.monotonic() - started
    return report
