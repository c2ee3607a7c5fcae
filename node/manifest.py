"""Manifests: the immutable description of one stored instance version.

A manifest's id is the hash of its deterministic protobuf encoding, and those
exact bytes are what is stored and replicated, so any holder can check that a
manifest is the one named (never re-encode a received manifest)."""

from __future__ import annotations

from collections.abc import Sequence

from pacsmesh.node import hlc
from pacsmesh.node.chunking import CHUNK_SIZE
from pacsmesh.node.dicom_layout import Layout
from pacsmesh.node.hashing import HASH_ALGO, content_hash
from pacsmesh.proto import node_pb2

MANIFEST_FORMAT = 1
# No real clock is past the year 9999; a node's clock moves past every stamp it accepts,
# and below this it still has ~2**60 steps left before a stamp outgrows uint64.
RECEIVED_HLC_MAX = hlc.encode(253_402_300_800_000, hlc.LOGICAL_MAX)


def build(
    layout: Layout,
    file_hash: bytes,
    chunks: Sequence[tuple[bytes, int]],
    origin_node: str,
    received_hlc: int,
    chunk_size: int = CHUNK_SIZE,
) -> node_pb2.Manifest:
    m = node_pb2.Manifest(
        format=MANIFEST_FORMAT,
        hash_algo=HASH_ALGO,
        chunk_size=chunk_size,
        transfer_syntax_uid=layout.transfer_syntax_uid,
        size=layout.size,
        file_hash=file_hash,
        header_len=layout.header_len,
        origin_node=origin_node,
        received_hlc=received_hlc,
    )
    for name, value in layout.attrs.items():
        setattr(m, name, value)
    m.chunks.extend(node_pb2.ChunkRef(hash=h, size=n) for h, n in chunks)
    return m


def encode(m: node_pb2.Manifest) -> tuple[bytes, bytes]:
    """(manifest id, canonical bytes)."""
    raw = m.SerializeToString(deterministic=True)
    return content_hash(raw), raw


def decode(raw: bytes) -> node_pb2.Manifest:
    m = node_pb2.Manifest()
    m.ParseFromString(raw)
    return m


def version_key(m: node_pb2.Manifest, manifest_id: bytes) -> tuple[int, bytes]:
    """The current version of an instance is the greatest key: newest HLC, then id."""
    return (m.received_hlc, manifest_id)


def problem(m: node_pb2.Manifest) -> str | None:
    """Why a manifest received from a peer must not be accepted, or None."""
    from pacsmesh.node.chunking import CHUNK_PLAIN_MAX
    from pacsmesh.node.uids import uid_problem

    if m.format != MANIFEST_FORMAT or m.hash_algo != HASH_ALGO:
        return f"unknown manifest format {m.format} / hash {m.hash_algo!r}"
    for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        if why := uid_problem(getattr(m, name)):
            return f"{name} {why}"
    if len(m.file_hash) != 32 or any(len(c.hash) != 32 for c in m.chunks):
        return "hash of the wrong length"
    if any(c.size == 0 or c.size > CHUNK_PLAIN_MAX for c in m.chunks):
        return "chunk of impossible size"
    if sum(c.size for c in m.chunks) != m.size:
        return f"chunks add up to {sum(c.size for c in m.chunks)} bytes, not {m.size}"
    # A uint64 on the wire, so never out of the clock's encoding; how far ahead of our
    # clock it may be is the receiver's check (HybridClock.too_far_ahead).
    if m.received_hlc == 0:
        return "received_hlc 0: never stamped by a clock"
    if m.received_hlc > RECEIVED_HLC_MAX:
        return f"received_hlc {m.received_hlc} is past the year 9999"
    return None
