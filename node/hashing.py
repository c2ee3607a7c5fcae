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
