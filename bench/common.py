"""Shared helpers for the benchmarks: the machine line, MB/s, synthetic data, RESULTS.md.

Throughout ``bench``, 1 MB = 10**6 bytes and MB/s is bytes / 1e6 / seconds.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import platform
from pathlib import Path

from pacsmesh.sample import StudySpec, make_instance

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
OUT_DIR = BENCH_DIR / "out"  # git-ignored scratch space

RESULTS_HEADER = (
    "# pacsmesh benchmark results\n\n"
    "Appended by the scripts in `bench/`. 1 MB = 10^6 bytes. Each section names the\n"
    "machine it ran on; compare figures only within one machine.\n"
)


def mb_s(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10**6 bytes per second); +inf for a zero duration."""
    if seconds <= 0:
        return float("inf")
    return nbytes / 1e6 / seconds


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor() as a fallback)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def total_ram_bytes() -> int:
    """Total physical memory in bytes (0 when it cannot be determined)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def machine_line() -> str:
    """One line describing this machine and run, e.g. for the top of a results section."""
    ram_gib = total_ram_bytes() / 2**30
    py = f"{platform.python_implementation()} {platform.python_version()}"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{platform.platform()}; CPU: {cpu_model()}; nproc: {os.cpu_count() or 0}; "
        f"RAM: {ram_gib:.1f} GiB; Python: {py}; date: {now}"
    )


def append_results(
    section_title: str,
    markdown_text: str,
    *,
    path: Path = RESULTS_PATH,
    with_machine: bool = True,
) -> Path:
    """Append a ``## section_title`` section to RESULTS.md (created with a header if missing).

    The machine line is written under the title unless ``with_machine`` is false.
    Returns the path written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    if not path.exists() or path.stat().st_size == 0:
        parts.append(RESULTS_HEADER)
    parts.append(f"\n## {section_title.strip()}\n\n")
    if with_machine:
        parts.append(f"Machine: {machine_line()}\n\n")
    parts.append(markdown_text.strip("\n") + "\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(parts))
    return path


def synthetic_ct_bytes(total_bytes: int, *, seed: int = 0) -> bytes:
    """About ``total_bytes`` of concatenated Part 10 CT files from ``pacsmesh.sample``.

    Looks like real CT (a body phantom with noise), so hash and compression speeds
    measured on it mean something. The result is exactly ``total_bytes`` long
    (the last instance is truncated).
    """
    if total_bytes <= 0:
        return b""
    spec = StudySpec(instances=1, seed=seed)
    buf = io.BytesIO()
    # Each 512x512 instance is ~0.5 MiB; bound the loop by the count that must suffice.
    max_instances = total_bytes // (spec.rows * spec.columns * 2) + 2
    for n in range(1, max_instances + 1):
        make_instance(spec, 1, n).save_as(buf, enforce_file_format=True)
        if buf.tell() >= total_bytes:
            break
    return buf.getvalue()[:total_bytes]
