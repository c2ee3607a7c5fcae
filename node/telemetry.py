"""What the node counts as it works: requests, their latency, ingest, replication.

`NodeCollector` (metrics.py) reads figures the node keeps anyway at scrape time;
events that leave no trace of their own (a gRPC call, a DIMSE request, an
association, an instance received) are counted here, as they happen, by the
code that handles them. One `Telemetry` per node, owned by the daemon and handed
to the gRPC server, the DICOM server, the client API and the replicator;
`NodeCollector` yields its families, so one registry serves everything.

Recording is a dict update under one lock per family (a histogram adds a
bisect): a few microseconds, cheap next to the C-STORE at hundreds a second it
counts, and the same whether or not `[metrics] listen` is set (nothing reads the
counts then; there is no second code path to go wrong).

Label values come from small fixed sets (service and method names, status codes,
outcomes): nothing a client chooses freely becomes a series of its own.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Request latency, seconds: a C-ECHO or Status takes ~1 ms, a C-STORE waits for its
# group commit (~10 ms), a study's C-GET or a drill takes seconds to minutes.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
Labels = tuple[str, ...]


class Counts:
    """A counter family with labels: label values -> running total."""

    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 initial: Sequence[Labels] = ()) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self._lock = threading.Lock()
        self._values: dict[Labels, float] = dict.fromkeys(initial, 0.0)

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: Labels) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            fam.add_metric(list(labels), value)
        return fam


class Timings:
    """A histogram family with labels: per label values, a count per bucket and a sum."""

    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = tuple(float(b) for b in buckets)
        assert list(self.bounds) == sorted(set(self.bounds)), "buckets must ascend"
        self._lock = threading.Lock()
        # label values -> [count in each bucket (not cumulative), then +Inf], and the sum
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, labels: Labels, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)  # bucket `le` is inclusive
        with self._lock:
            counts = self._counts.get(labels)
            if counts is None:
                counts = self._counts[labels] = [0] * (len(self.bounds) + 1)
                self._sums[labels] = 0.0
            counts[i] += 1
            self._sums[labels] += seconds

    def count(self, labels: Labels) -> int:
        with self._lock:
            return sum(self._counts.get(labels, ()))

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        for labels, counts, total in items:
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append((_le(bound), float(cumulative)))
            fam.add_metric(list(labels), buckets, total)
        return fam


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)  # as prometheus_client writes


class Level:
    """A gauge that goes up and down (associations open now)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n

    def family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.doc, value=self.value)


INGEST_VIA = ("put", "c-store")
INGEST_OUTCOMES = ("stored", "duplicate", "rejected")
ASSOCIATION_OUTCOMES = ("accepted", "rejected")
ASSOCIATION_ENDINGS = ("released", "aborted")


class Telemetry:
    """Every instrument the node records into as it works."""

    def __init__(self) -> None:
        self.grpc_requests = Counts(
            "pacsmesh_grpc_requests", "gRPC calls served, by service, method and status code.",
            ["service", "method", "code"])
        self.grpc_seconds = Timings(
            "pacsmesh_grpc_request_duration_seconds", "gRPC calls served: from the call "
            "arriving to its handler finishing (a stream: its last message).",
            ["service", "method"])
        self.dicom_requests = Counts(
            "pacsmesh_dicom_requests", "DIMSE requests answered, by service (C-STORE, "
            "C-FIND, ...) and final status: success, warning, failure, cancel, or aborted "
            "(the association ended first).", ["service", "status"])
        self.dicom_seconds = Timings(
            "pacsmesh_dicom_request_duration_seconds", "DIMSE requests: from the whole "
            "request received to the final response sent.", ["service"])
        self.associations_active = Level(
            "pacsmesh_dicom_associations_active", "DICOM associations established now.")
        self.associations = Counts(
            "pacsmesh_dicom_associations", "DICOM associations requested, by outcome of "
            "the negotiation: accepted or rejected.", ["outcome"],
            [(o,) for o in ASSOCIATION_OUTCOMES])
        self.associations_ended = Counts(
            "pacsmesh_dicom_associations_ended", "Established DICOM associations that "
            "ended, by how: released or aborted (by either side, or lost).", ["how"],
            [(h,) for h in ASSOCIATION_ENDINGS])
        self.ingest_instances = Counts(
            "pacsmesh_ingest_instances", "Instances received from clients (put, C-STORE), "
            "by outcome: stored (new here), duplicate (already held), rejected.",
            ["via", "outcome"], [(v, o) for v in INGEST_VIA for o in INGEST_OUTCOMES])
        self.ingest_bytes = Counts(
            "pacsmesh_ingest_bytes", "Part 10 bytes of the instances clients stored here "
            "(outcome stored).", ["via"], [(v,) for v in INGEST_VIA])
        self.replicated_instances = Counts(
            "pacsmesh_replication_received_instances", "Copies of instances received from "
            "peers and made durable here.", [], [()])
        self.replicated_bytes = Counts(
            "pacsmesh_replication_received_bytes", "Part 10 bytes of the copies received "
            "from peers (the wire bytes are pacsmesh_link_received_bytes_total).", [], [()])

    # ---- recording, from the code that does the work ---------------------------------

    def ingested(self, via: str, outcome: str, nbytes: int = 0) -> None:
        self.ingest_instances.add((via, outcome))
        if outcome == "stored":
            self.ingest_bytes.add((via,), nbytes)

    def replicated(self, instances: int, nbytes: int) -> None:
        if instances:
            self.replicated_instances.add((), instances)
            self.replicated_bytes.add((), nbytes)

    def collect(self) -> Iterator[Metric]:
        for instrument in (self.grpc_requests, self.grpc_seconds, self.dicom_requests,
                           self.dicom_seconds, self.associations_active, self.associations,
                           self.associations_ended, self.ingest_instances, self.ingest_bytes,
                           self.replicated_instances, self.replicated_bytes):
            yield instrument.family()
