"""Clock jumps for real node processes, without touching the node's code.

A tiny LD_PRELOAD shim (compiled here with the system C compiler, once per
machine) shifts CLOCK_REALTIME, gettimeofday() and time() by an offset that the
harness changes at any moment: the offset lives in an 8-byte file the shim maps
read-only, so a jump takes effect on the node's next clock read. Monotonic
clocks are left alone, as a real wall-clock step (NTP, an operator, a VM resume)
leaves them. libfaketime was tried first: in 0.9.10 its file-driven offsets need
FAKETIME_NO_CACHE, which also fakes CLOCK_MONOTONIC (asyncio then sees time go
backwards), and FAKETIME_DONT_FAKE_MONOTONIC makes Python's time.sleep() fail
with EINVAL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

ENV_FILE = "PACSMESH_TEST_CLOCK_OFFSET_FILE"  # read by the shim only, never by pacsmesh

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t *offset_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int (*real_gettimeofday)(struct timeval *, void *);

__attribute__((constructor)) static void init(void) {
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    real_gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
    const char *path = getenv("PACSMESH_TEST_CLOCK_OFFSET_FILE");
    if (!path) return;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    void *p = mmap(NULL, 8, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED) offset_ns = (volatile int64_t *)p;
}

static int64_t off(void) { return offset_ns ? *offset_ns : 0; }

static void shift(struct timespec *ts) {
    int64_t ns = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec + off();
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
    if (ts->tv_nsec < 0) { ts->tv_nsec += 1000000000LL; ts->tv_sec -= 1; }
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    int rc = real_clock_gettime(clk, ts);
    if (rc == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) shift(ts);
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    int rc = real_gettimeofday(tv, tz);
    if (rc == 0 && tv) {
        struct timespec ts = {tv->tv_sec, tv->tv_usec * 1000};
        shift(&ts);
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"""


def shim() -> Path | None:
    """The compiled shim, or None where there is no C compiler (clock faults then skip)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"pacsmesh-faultclock-{digest}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "faultclock.c"
        src.write_text(SOURCE)
        built = Path(tmp) / "faultclock.so"
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(src), "-ldl"],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            return None
        shutil.move(built, out.with_suffix(".tmp"))
        os.replace(out.with_suffix(".tmp"), out)  # atomic: parallel test runs share it
    return out


class Clock:
    """One node's wall-clock offset, changed while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_s = 0.0
        path.write_bytes(struct.pack("<q", 0))

    def env(self, lib: Path) -> dict[str, str]:
        return {"LD_PRELOAD": str(lib), ENV_FILE: str(self.path)}

    def set(self, offset_s: float) -> None:
        self.offset_s = offset_s
        with open(self.path, "r+b") as f:  # one aligned 8-byte write: readers never see half
            f.write(struct.pack("<q", int(offset_s * 1e9)))
