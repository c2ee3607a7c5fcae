"""What watching a node costs it: recording a request for Prometheus, rendering
the status page, and building a scrape, each beside a figure of the same run.

- Recording: what a C-STORE adds (one DIMSE count and latency, one ingest count
  with bytes), beside hashing that instance once with BLAKE3 (the least work the
  node does per instance), one thread and two threads contending.
- The status page at the sizes of a large federation (500 members at 16 sites,
  200 alerts), beside its refresh interval: the share of a core one open page
  takes.
- A scrape of the telemetry after a million recorded requests: its size and time.

`python -m bench observability [--record]`.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Iterator

import blake3

from bench.common import append_results, machine_line
from pacsmesh.node import statuspage
from pacsmesh.node.telemetry import Telemetry
from pacsmesh.proto import node_pb2

INSTANCE_BYTES = 512 * 1024  # a 512x512 16-bit CT slice
RECORDS = 200_000


def _record_cstore(t: Telemetry, n: int) -> None:
    for i in range(n):
        t.dicom_requests.add(("C-STORE", "success"))
        t.dicom_seconds.observe(("C-STORE",), 0.002 + (i % 50) / 1000)
        t.ingested("c-store", "stored", INSTANCE_BYTES)


def recording() -> dict[str, float]:
    data = os.urandom(INSTANCE_BYTES)
    started = time.perf_counter()
    for _ in range(200):
        blake3.blake3(data).digest()
    hash_us = (time.perf_counter() - started) / 200 * 1e6

    t = Telemetry()
    started = time.perf_counter()
    _record_cstore(t, RECORDS)
    one_us = (time.perf_counter() - started) / RECORDS * 1e6

    t2 = Telemetry()
    threads = [threading.Thread(target=_record_cstore, args=(t2, RECORDS // 2))
               for _ in range(2)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    two_us = (time.perf_counter() - started) / RECORDS * 1e6
    assert t2.dicom_requests.value(("C-STORE", "success")) == RECORDS  # none lost
    return {"hash_us": hash_us, "one_us": one_us, "two_us": two_us}


def _big_status() -> node_pb2.StatusReply:
    st = node_pb2.StatusReply(copies=3, min_distance_miles=250, answered_by="n0",
                              studies=2_000_000, instances=400_000_000,
                              safe_studies=1_999_000, unsafe_studies=1_000,
                              oldest_unsafe_age_s=5400)
    for i in range(500):
        site = i % 16
        st.nodes.add(id=f"n{i}", site=f"Site {site}", lat=30 + site, lon=-120 + 3 * site,
                     state="dead" if i % 97 == 0 else "alive", used_bytes=40 << 40,
                     free_bytes=20 << 40, backlog_instances=i, backlog_bytes=i << 20,
                     days_until_full=200.0)
        st.links.add(peer=f"n{i}", sent_bytes=i << 30, sent_bytes_per_s=1e6)
    for i in range(200):
        st.alerts.add(severity="critical" if i % 3 == 0 else "warning", code="NODE_DEAD",
                      message=f"node n{i} is dead: re-protection under way; replace it")
    return st


def page() -> dict[str, float]:
    fig = statuspage.Figures(_big_status(), node_pb2.ScrubStatus(), time.time())
    statuspage.render(fig)  # warm
    started = time.perf_counter()
    for _ in range(20):
        html = statuspage.render(fig)
    ms = (time.perf_counter() - started) / 20 * 1000
    return {"render_ms": ms, "html_kb": len(html) / 1000,
            "core_share": ms / 1000 / statuspage.REFRESH_S}


def scrape() -> dict[str, float]:
    from prometheus_client import generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

    t = Telemetry()
    for service in ("C-STORE", "C-FIND", "C-GET", "C-MOVE", "C-ECHO", "N-ACTION"):
        for status in ("success", "failure"):
            t.dicom_requests.add((service, status), 1)
    for m in range(40):  # every gRPC method of both services, a few codes each
        for code in ("OK", "NOT_FOUND", "UNAVAILABLE"):
            t.grpc_requests.add(("pacsmesh.node.NodeApi", f"M{m}", code))
            t.grpc_seconds.observe(("pacsmesh.node.NodeApi", f"M{m}"), 0.01)
    _record_cstore(t, 1_000_000)

    class _Only(Collector):
        def collect(self) -> Iterator[Metric]:
            return t.collect()

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Only())
    started = time.perf_counter()
    for _ in range(20):
        text = generate_latest(reg)
    return {"scrape_ms": (time.perf_counter() - started) / 20 * 1000,
            "scrape_kb": len(text) / 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench observability")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    rec, pg, sc = recording(), page(), scrape()
    lines = [
        f"- recording one C-STORE (request count, latency, ingest count and bytes): "
        f"**{rec['one_us']:.2f} us** on one thread, {rec['two_us']:.2f} us a request with "
        f"two threads contending; hashing that 512 KiB instance once with BLAKE3 in the "
        f"same run: {rec['hash_us']:.0f} us, so recording is "
        f"**{rec['one_us'] / rec['hash_us']:.1%}** of the least per-instance work",
        f"- status page for 500 members at 16 sites, 500 links and 200 alerts: "
        f"**{pg['render_ms']:.1f} ms** a render ({pg['html_kb']:.0f} kB); refreshed every "
        f"{statuspage.REFRESH_S} s, one open page takes **{pg['core_share']:.2%}** of a core",
        f"- a scrape of the request telemetry after 1,000,000 C-STOREs and 40 gRPC methods: "
        f"{sc['scrape_ms']:.2f} ms, {sc['scrape_kb']:.0f} kB (series grow with label values, "
        "never with requests)",
    ]
    print(machine_line())
    print("\n".join(lines))
    if args.record:
        append_results("Observability: what watching a node costs it (bench.observability)",
                       "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
