"""Errors of one node, and whose fault they are.

    PacsmeshError
    ├── ConfigError          the operator's config is wrong
    ├── DataDirLocked        another process owns the data dir
    ├── InvalidInstance      the sender's file is not an instance we can archive
    ├── LifecycleInvalid     a hold, release or deletion request is malformed
    ├── StoreFull            no room: disk or configured capacity
    ├── ChunkCorrupt         a stored chunk failed verification (never returned)
    ├── ChunkMissing         a chunk the index or a manifest names is not held
    └── ProtocolError        a client or peer broke the message protocol

The gRPC edge maps these to status codes; nothing below it knows about gRPC.
"""

from __future__ import annotations


class PacsmeshError(Exception):
    """Base of every error pacsmesh raises on purpose."""


class ConfigError(PacsmeshError):
    pass


class DataDirLocked(PacsmeshError):
    pass


class InvalidInstance(PacsmeshError):
    """The file cannot be archived; the message is the per-file reason."""


class Mismatch(PacsmeshError):
    """A received dataset is not the instance its request names (a DICOM C-STORE whose
    SOP Instance or Class UID differs from the command's): nothing is stored."""

    def __init__(self, which: str, why: str) -> None:
        super().__init__(why)
        self.which = which  # "SOP Instance UID" or "SOP Class UID"


class LifecycleInvalid(PacsmeshError):
    """A lifecycle record (node/lifecycle.py) is refused; the message says why."""


class StoreFull(PacsmeshError):
    pass


class ChunkCorrupt(PacsmeshError):
    """`location`: the record that failed (a chunkstore.ChunkLocation), when known: a
    damaged chunk is dropped only if the index still names that record."""

    def __init__(self, message: str, location: object = None) -> None:
        super().__init__(message)
        self.location = location


class ChunkMissing(PacsmeshError):
    pass


class ProtocolError(PacsmeshError):
    pass


class StudyDeleted(InvalidInstance):
    """A version of a study this node deleted when its retention expired."""
