"""How a chunk's plain bytes are stored: zstd, after a byte shuffle for pixel data.

Flags (a pack record's, and what travels with a chunk between nodes and from the
CLI): FLAG_ZSTD, the bytes are one zstd frame; FLAG_SHUFFLE2, the plain bytes
were byte-shuffled in 2-byte elements before compression (every first byte, then
every second byte; an odd last byte stays at the end), as HDF5's and Blosc's
shuffle filter does. 16-bit pixels put their smooth high bytes together and
their noisy low bytes together, and zstd-1 then compresses CT 1.4x better and
~3x faster (bench/RESULTS.md, "chunk encoding"). It is applied to the chunks
after the header of instances in a native (uncompressed) transfer syntax; for
8-bit data it merely separates even and odd pixels. Lossless either way: the
chunk's name is the hash of its plain bytes, checked after decoding.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import zstandard

from pacsmesh.node.errors import ChunkCorrupt
from pacsmesh.node.packs import FLAG_SHUFFLE2, FLAG_ZSTD

FLAGS_KNOWN = FLAG_ZSTD | FLAG_SHUFFLE2
# Transfer syntaxes whose pixel data is native (not encapsulated): worth shuffling.
NATIVE_TS = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
ZSTD_LEVEL = 1

_tls = threading.local()


def _dctx() -> Any:
    d = getattr(_tls, "dctx", None)
    if d is None:  # zstd contexts are not thread-safe; one per thread
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def decompress(data: bytes, plain_len: int) -> bytes:
    try:
        # the output is sized by the size a frame declares, max_output_size ignored then:
        # a few bytes from anyone could make us allocate a terabyte
        declared = zstandard.frame_content_size(data)
        if declared > plain_len:
            raise ChunkCorrupt(f"zstd frame declares {declared} bytes, not {plain_len}")
        return bytes(_dctx().decompress(data, max_output_size=plain_len))
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(f"does not decompress: {exc}") from exc




def shuffle2(plain: bytes | memoryview) -> np.ndarray:
    """The shuffled bytes (a uint8 array: zstd takes any buffer, no copy to bytes)."""
    size = len(plain)
    half = size // 2
    words = np.frombuffer(plain, dtype="<u2", count=half)
    out = np.empty(size, dtype=np.uint8)
    np.bitwise_and(words, 0xFF, out=out[:half], casting="unsafe")
    np.right_shift(words, 8, out=out[half:2 * half], casting="unsafe")
    if size % 2:
        out[-1] = plain[-1]
    return out


def unshuffle2(data: bytes | memoryview) -> bytes:
    size = len(data)
    half = size // 2
    a = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(size, dtype=np.uint8)
    pairs = out[:2 * half].reshape(-1, 2)  # copies into column views: numpy's fast path
    np.copyto(pairs[:, 0], a[:half])
    np.copyto(pairs[:, 1], a[half:2 * half])
    if size % 2:
        out[-1] = a[-1]
    return out.tobytes()


def _cctx() -> Any:
    c = getattr(_tls, "cctx", None)
    if c is None:  # zstd contexts are not thread-safe; one per thread
        c = _tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def encode(plain: bytes | memoryview, shuffle: bool) -> tuple[bytes, int]:
    """(stored bytes, flags) of a chunk: compressed when that makes it smaller (JPEG
    and other compressed pixels are stored as they are)."""
    packed = _cctx().compress(shuffle2(plain) if shuffle else plain)
    if len(packed) < len(plain):
        return packed, FLAG_ZSTD | (FLAG_SHUFFLE2 if shuffle else 0)
    return bytes(plain), 0


def decode(stored: bytes, flags: int, plain_len: int) -> bytes:
    """The plain bytes of a stored chunk (not yet verified against its name).
    ChunkCorrupt for flags we do not know or bytes that do not decode."""
    if flags & ~FLAGS_KNOWN:
        raise ChunkCorrupt(f"unknown chunk encoding flags 0x{flags:02x}")
    out = decompress(stored, plain_len) if flags & FLAG_ZSTD else stored
    return unshuffle2(out) if flags & FLAG_SHUFFLE2 else out


def shuffled(transfer_syntax: str, offset: int, header_len: int) -> bool:
    """Whether the chunk at `offset` of an instance is stored shuffled."""
    return offset >= header_len and transfer_syntax in NATIVE_TS
