"""Prometheus metrics on `[metrics] listen`: what `status`, `scrub` and `gc` report,
as metric families an operator's Prometheus scrapes and alerts on.

Every figure is read at scrape time from the same counters the CLI's views use
(constant cost at any archive size), so the scrape and `pacsmesh status` never
disagree. Names follow Prometheus conventions: base units in the name, `_total`
for counters. The HTTP server is node/web.py's, which also serves the status page.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pacsmesh.node import statuspage
from pacsmesh.node.web import WebServer, WebTls

LOGGER = logging.getLogger(__name__)
STATES = ("alive", "suspect", "dead", "left")


class NodeCollector(Collector):
    """Builds every family from one NodeService at each scrape."""

    def __init__(self, api: Any) -> None:
        self.api = api  # node.service.NodeService (not imported: it imports us not)

    def collect(self) -> Iterator[Metric]:
        api = self.api
        st = api._status()
        me = api.node_id

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"pacsmesh_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"pacsmesh_{name}", doc, value=value)

        yield gauge("studies", "Studies in the catalog.", st.studies)
        yield gauge("instances", "Instances (current versions) in the catalog.", st.instances)
        yield gauge("safe_studies", "Studies with the required safe copies.", st.safe_studies)
        yield gauge("unsafe_studies", "Studies short of safe copies.", st.unsafe_studies)
        yield gauge("oldest_unsafe_age_seconds", "Age of the oldest unsafe study.",
                    st.oldest_unsafe_age_s)
        yield gauge("required_copies", "Copies every study must have (N).", st.copies)
        yield gauge("days_until_full", "Days until this node's storage is full at the "
                    "recent rate (-1: not growing).", st.days_until_full)
        yield gauge("chunk_bytes", "Bytes of this node's pack files.", st.chunk_bytes)
        yield counter("manifests_committed", "Manifests made durable by group commits "
                      "(ingest and replication).", api.store.committed_items)
        yield counter("group_commits", "Group commits (fsync pairs).", api.store.commits)

        state = GaugeMetricFamily("pacsmesh_node_state", "1 for each member's state as "
                                  "this node sees it.", labels=["node", "site", "state"])
        used = GaugeMetricFamily("pacsmesh_node_used_bytes", "Storage used per member.",
                                 labels=["node"])
        free = GaugeMetricFamily("pacsmesh_node_free_bytes", "Storage free per member.",
                                 labels=["node"])
        backlog = GaugeMetricFamily("pacsmesh_node_backlog_bytes", "Bytes a member still "
                                    "has to copy.", labels=["node"])
        backlog_n = GaugeMetricFamily("pacsmesh_node_backlog_instances", "Instances a member "
                                      "still has to copy.", labels=["node"])
        for n in st.nodes:
            for s in STATES:
                state.add_metric([n.id, n.site, s], 1.0 if n.state == s else 0.0)
            used.add_metric([n.id], n.used_bytes)
            free.add_metric([n.id], n.free_bytes)
            backlog.add_metric([n.id], n.backlog_bytes)
            backlog_n.add_metric([n.id], n.backlog_instances)
        yield from (state, used, free, backlog, backlog_n)

        sent = CounterMetricFamily("pacsmesh_link_sent_bytes", "Chunk bytes sent to a peer.",
                                   labels=["peer"])
        received = CounterMetricFamily("pacsmesh_link_received_bytes", "Chunk bytes "
                                       "received from a peer.", labels=["peer"])
        for link in st.links:
            sent.add_metric([link.peer], link.sent_bytes)
            received.add_metric([link.peer], link.received_bytes)
        yield from (sent, received)

        alerts = GaugeMetricFamily("pacsmesh_alerts", "Alerts in force, by severity and "
                                   "code (what status lists).", labels=["severity", "code"])
        counts: dict[tuple[str, str], int] = {}
        for a in st.alerts:
            counts[(a.severity, a.code)] = counts.get((a.severity, a.code), 0) + 1
        for (sev, code), n_alerts in sorted(counts.items()):
            alerts.add_metric([sev, code], n_alerts)
        yield alerts

        drill_ok = GaugeMetricFamily("pacsmesh_drill_last_ok", "1 if the last restore "
                                     "drill of a study succeeded.", labels=["study"])
        for d in st.last_drill:
            drill_ok.add_metric([d.study_uid], 1.0 if d.ok else 0.0)
        yield drill_ok

        if api.scrubber is not None:
            sc = api.scrub_status()
            yield counter("scrub_chunks_verified", "Chunks re-read and verified.",
                          sc.chunks_verified)
            yield counter("scrub_verified_bytes", "Bytes re-read and verified.",
                          sc.bytes_verified)
            yield counter("scrub_corrupt_chunks", "Damaged chunks found.", sc.corrupt_found)
            yield counter("scrub_repaired_chunks", "Damaged chunks repaired from peers.",
                          sc.repaired)
            yield gauge("scrub_unrepairable_chunks", "Damaged chunks no peer could repair.",
                        len(sc.unrepairable))
            yield gauge("scrub_last_pass_age_seconds", "Since the last full scrub pass "
                        "ended (-1: never).", sc.last_pass_completed_age_s)
            yield gauge("scrub_overdue", "1 if no full pass ended within the interval.",
                        1.0 if sc.overdue else 0.0)
        if api.gc is not None:
            g = api.gc_status()
            yield counter("gc_reclaimed_bytes", "Pack bytes freed by compaction.",
                          g.reclaimed_bytes)
            yield gauge("gc_reclaimable_bytes", "Bytes GC could free.", g.reclaimable_bytes)
            yield counter("gc_chunks_reclaimed", "Unneeded chunks taken out of the index.",
                          g.chunks_reclaimed)
            yield counter("retention_studies_deleted", "Studies deleted here when their "
                          "retention expired.", g.studies_deleted)
        LOGGER.debug("metrics scraped for %s", me)


class MetricsServer:
    """`[metrics] listen`: /metrics, the status page and /status.json (node/web.py),
    over HTTPS with client certificates when the node runs with [tls]."""

    def __init__(self, api: Any, listen: str, tls: WebTls | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(api))
        self._web = WebServer(listen, self.registry, lambda: statuspage.gather(api), tls)
        LOGGER.info("metrics on %s://%s/metrics, the status page on %s://%s/",
                    self._web.scheme, listen, self._web.scheme, listen)

    def close(self) -> None:
        self._web.close()
