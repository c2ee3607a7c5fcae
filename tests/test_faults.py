"""The short fault profile (tests/soak.py): every kind of fault once, on real processes.

Five sites; SIGKILL and restart, SIGSTOP past dead_after_s, partitions (black hole
and resets), slow and lossy links (tests/faultproxy.py), a full disk, byte flips in
packs, a wiped node rejoining empty and clock jumps, in a fixed order that overlaps,
while studies are put at random live nodes. Then every fault is healed and every
acknowledged instance must restore byte-identical from a random node, and every
study must be safe. The long, random profile is `./dev soak --minutes 30`.

`PACSMESH_FAULT_SEED=N` replays another seed (printed on every run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests import faultclock
from tests.soak import KINDS, SHORT, run

SEED = int(os.environ.get("PACSMESH_FAULT_SEED", "20261130"))


def test_short_fault_profile(tmp_path: Path) -> None:
    t0 = time.monotonic()
    report, soak = run(tmp_path, SEED, SHORT)
    print(f"\n{report.summary()}\nfault proxy: {report.proxy}")
    if not report.ok:
        print("\n".join(report.log))
        print(soak.dump_logs())
    assert report.ok, f"seed {SEED}: replay with PACSMESH_FAULT_SEED={SEED}\n{report.summary()}"
    expected = set(KINDS)
    if soak.disk is None:
        expected.discard("diskfull")  # not root: no tmpfs of its own for one node
    if faultclock.shim() is None:
        expected.discard("clock")  # no C compiler for the clock shim
    assert expected <= set(report.faults), (sorted(report.faults), report.skipped)
    assert report.acknowledged >= 60, report.acknowledged
    assert report.scrub_corrupt >= 1 and report.scrub_repaired >= 1, report.summary()
    print(f"short fault profile: {time.monotonic() - t0:.1f} s")
