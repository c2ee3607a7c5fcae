"""The WAN benchmark harness (bench/netns.py): shaped links, byte counters, real nodes, cleanup.

Needs root and `ip netns`; skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from bench.netns import PYTHON, WanHarness, unavailable
from pacsmesh.sample import StudySpec, study_uid, write_study

WHY = unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"WAN harness: {WHY}")

RATE_MBIT = 40
PAYLOAD = 5_000_000  # 1 s at 40 Mbit/s

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while (b := c.recv(1 << 16)):
    n += len(b)
print(n, flush=True)
"""

CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 9000)); t = time.perf_counter()
c.sendall(bytes(int(sys.argv[2]))); c.shutdown(socket.SHUT_WR); c.recv(1)
print(time.perf_counter() - t)
"""


def test_links_are_shaped_counted_and_cleaned_up() -> None:
    h = WanHarness(RATE_MBIT, prefix="pmt", subnet="10.78.0")
    with h:
        server = h.popen("seattle", [PYTHON, "-c", SERVER, h.ip("seattle")],
                         stdout=subprocess.PIPE)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"ready"
        before = h.counters()
        res = h.run("boston", [PYTHON, "-c", CLIENT, h.ip("seattle"), str(PAYLOAD)], 30)
        assert res.returncode == 0, res.stderr
        seconds = float(res.stdout)
        assert int(server.stdout.readline()) == PAYLOAD
        used = h.counters() - before
        mbit = PAYLOAD * 8 / 1e6 / seconds
        # tbf lets one bucket (10 ms) through at once; TCP should get most of the rest
        assert 0.6 * RATE_MBIT <= mbit <= 1.1 * RATE_MBIT, (mbit, seconds)
        assert PAYLOAD <= used.up["boston"] < 1.1 * PAYLOAD
        assert PAYLOAD <= used.down["seattle"] < 1.1 * PAYLOAD
        assert used.up["denver"] < 50_000 and used.down["denver"] < 50_000
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                    check=True).stdout
        assert "pmt-boston" in namespaces
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert "pmt-" not in namespaces
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert "pmtbr0" not in links and "pmtv0" not in links
    assert server.poll() is not None


def test_real_nodes_reach_three_safe_copies_across_namespaces(tmp_path: Path) -> None:
    study = tmp_path / "study"
    spec = StudySpec(instances=3, rows=64, columns=64, study_index=1, seed=5)
    write_study(study, spec)
    with WanHarness(100, prefix="pmt", subnet="10.78.0") as h:
        nodes = h.start_nodes(tmp_path / "nodes")
        assert {n.address.split(":")[0] for n in nodes} == {h.ip(s.name) for s in h.sites}
        before = h.counters()
        t = time.monotonic()
        res = h.run("boston", [PYTHON, "-m", "pacsmesh.cli", "put", str(study),
                               "--wait-safe", "60", "--json", "--node", nodes[0].address], 90)
        assert res.returncode == 0, (res.stdout, res.stderr, nodes[0].log_tail())
        assert json.loads(res.stdout)["safe"] == {study_uid(spec): True}
        assert time.monotonic() - t < 60
        used = h.counters() - before
        # both far sites received the study through their own shaped links
        assert used.down["seattle"] > 3 * 64 * 64 and used.down["denver"] > 3 * 64 * 64
