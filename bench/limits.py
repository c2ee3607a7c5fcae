"""This machine's own limits, measured in-process on given bytes; every figure is MB/s.

Each function repeats its operation enough times for one trial to take about
``target_s`` seconds (0.5 s by default), runs three trials and returns the best
(1 MB = 10**6 bytes). Hashing and compression are single-threaded.

Self-check: ``python -m bench.limits`` measures 64 MiB of synthetic CT data.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import zstandard

from bench.common import OUT_DIR, append_results, machine_line, mb_s, synthetic_ct_bytes

TRIALS = 3
TARGET_S = 0.5
MAX_REPEATS = 100_000
WRITE_BLOCK = 1 << 20  # 1 MiB sequential writes
FSYNC_EVERY = 64 << 20  # fsync every 64 MiB (and at the end)


def _best_mb_s(op: Callable[[], object], nbytes: int, target_s: float = TARGET_S) -> float:
    """Best MB/s over TRIALS trials of ``op`` (which processes ``nbytes``) repeated ~target_s."""
    t0 = time.perf_counter()
    op()  # warm-up, also calibrates the repeat count
    once = max(time.perf_counter() - t0, 1e-9)
    repeats = max(1, min(MAX_REPEATS, math.ceil(target_s / once)))
    best = 0.0
    for _ in range(TRIALS):
        t0 = time.perf_counter()
        for _ in range(repeats):
            op()
        best = max(best, mb_s(nbytes * repeats, time.perf_counter() - t0))
    return best


def blake3_mb_s(data: bytes, *, target_s: float = TARGET_S) -> float:
    """BLAKE3-256 of ``data``, one thread (package ``blake3``)."""
    return _best_mb_s(lambda: blake3.blake3(data, max_threads=1).digest(), len(data), target_s)


def sha256_mb_s(data: bytes, *, target_s: float = TARGET_S) -> float:
    """SHA-256 of ``data`` (hashlib / OpenSSL)."""
    return _best_mb_s(lambda: hashlib.sha256(data).digest(), len(data), target_s)


def zstd_compress_mb_s(data: bytes, level: int = 1, *, target_s: float = TARGET_S) -> float:
    """zstd one-shot compression at ``level``, one thread; MB/s of input."""
    cctx = zstandard.ZstdCompressor(level=level, threads=0)
    return _best_mb_s(lambda: cctx.compress(data), len(data), target_s)


def zstd_decompress_mb_s(data: bytes, level: int = 1, *, target_s: float = TARGET_S) -> float:
    """zstd one-shot decompression of ``data`` compressed at ``level``; MB/s of output."""
    frame = zstandard.ZstdCompressor(level=level, threads=0).compress(data)
    dctx = zstandard.ZstdDecompressor()
    return _best_mb_s(lambda: dctx.decompress(frame), len(data), target_s)


def zstd_ratio(data: bytes, level: int = 1) -> float:
    """Compression ratio (input size / compressed size) of ``data`` at ``level``."""
    if not data:
        return 1.0
    return len(data) / len(zstandard.ZstdCompressor(level=level, threads=0).compress(data))


def _write_file_once(directory: Path, total_bytes: int, block: bytes) -> float:
    """Write total_bytes sequentially to a new file in directory; return seconds."""
    fd, name = tempfile.mkstemp(prefix=".pacsmesh-fsync-", dir=directory)
    try:
        t0 = time.perf_counter()
        written = 0
        since_sync = 0
        while written < total_bytes:  # bounded: each pass writes >= 1 byte or raises
            n = os.write(fd, block[: min(len(block), total_bytes - written)])
            if n <= 0:
                raise OSError(f"short write to {name}")
            written += n
            since_sync += n
            if since_sync >= FSYNC_EVERY:
                os.fsync(fd)
                since_sync = 0
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(name)


def fsync_write_mb_s(directory: str | os.PathLike[str], total_bytes: int) -> float:
    """Sequential 1 MiB writes of ``total_bytes`` to a file in ``directory``.

    fsync every 64 MiB and at the end (included in the time); the file is deleted
    afterwards. Best of three runs. The data is incompressible, so a compressing
    filesystem does not flatter the figure.
    """
    if total_bytes <= 0:
        raise ValueError("total_bytes must be positive")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(WRITE_BLOCK)
    return max(mb_s(total_bytes, _write_file_once(d, total_bytes, block)) for _ in range(TRIALS))


def measure_all(
    data: bytes, fsync_dir: Path, fsync_bytes: int, levels: tuple[int, ...] = (1, 3)
) -> dict[str, float]:
    """All limits on ``data`` (and a disk write test in ``fsync_dir``), keyed by name."""
    out: dict[str, float] = {
        "blake3": blake3_mb_s(data),
        "sha256": sha256_mb_s(data),
    }
    for level in levels:
        out[f"zstd-{level} compress"] = zstd_compress_mb_s(data, level)
        out[f"zstd-{level} decompress"] = zstd_decompress_mb_s(data, level)
        out[f"zstd-{level} ratio"] = zstd_ratio(data, level)
    out["fsync write"] = fsync_write_mb_s(fsync_dir, fsync_bytes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    ap.add_argument("--mib", type=int, default=64, help="synthetic CT data size (MiB)")
    ap.add_argument("--fsync-mib", type=int, default=256, help="bytes written by the fsync test")
    ap.add_argument("--dir", type=Path, default=OUT_DIR, help="directory for the fsync test")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)

    print(machine_line())
    data = synthetic_ct_bytes(args.mib << 20)
    print(f"data: {len(data) / 2**20:.0f} MiB of synthetic CT (Part 10, 512x512x16 bit)")
    results = measure_all(data, args.dir, args.fsync_mib << 20)
    rows = []
    for name, value in results.items():
        unit = "x" if name.endswith("ratio") else "MB/s"
        print(f"  {name:<20} {value:10.2f} {unit}")
        rows.append(f"| {name} | {value:.2f} {unit} |")
    if args.record:
        text = (
            f"{args.mib} MiB synthetic CT in memory; fsync test {args.fsync_mib} MiB in "
            f"`{args.dir}`. Best of {TRIALS}, single thread.\n\n"
            "| measure | value |\n|---|---|\n" + "\n".join(rows)
        )
        print(f"appended to {append_results('Machine limits', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
