"""The content hash. Its name is recorded in manifests and its id in pack records,
so a later change of algorithm can coexist with data written today."""

from __future__ import annotations

import blake3

HASH_ALGO = "blake3-256"
HASH_ALGO_ID = 1  # as stored in pack record headers
HASH_LEN = 32


def content_hash(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


class FileHasher:
    """Incremental whole-file hash."""

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest())


def possession_proof(nonce: bytes, asker: str, plain: bytes) -> bytes:
    """What a holder of a chunk's bytes answers to a challenge. Keyed by a fresh nonce,
    so it cannot be computed ahead of time or replayed without the bytes; and bound to
    the authenticated asker, so a member cannot pass a challenge on to an honest
    holder and return its answer as its own (the holder binds it to the relayer)."""
    asker_bytes = asker.encode()
    h = blake3.blake3(nonce)
    h.update(len(asker_bytes).to_bytes(2, "big") + asker_bytes)
    h.update(plain)
    return h.digest()
