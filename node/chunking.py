"""DICOM-aware chunk boundaries.

The header (preamble, file meta and every element before the Pixel Data value)
is cut apart from the body, and the body is cut at fixed offsets from the start
of the Pixel Data value. A corrected patient name then changes only the header
chunk, and identical pixels dedup whatever the header length is.
"""

from __future__ import annotations

CHUNK_SIZE = 1 << 20  # 1 MiB: big enough for streaming efficiency, small enough to repair
CHUNK_PLAIN_MAX = 4 << 20  # what a node accepts from anyone (room for a future larger cut)


def chunk_spans(size: int, header_len: int, chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int]]:
    """(offset, length) of each chunk, in file order, covering [0, size) exactly."""
    assert 0 <= header_len <= size, (header_len, size)
    assert chunk_size > 0
    spans: list[tuple[int, int]] = []
    for start, end in ((0, header_len), (header_len, size)):
        offset = start
        while offset < end:
            length = min(chunk_size, end - offset)
            spans.append((offset, length))
            offset += length
    return spans
