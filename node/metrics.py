"""Prometheus metrics on `[metrics] listen`: what `status`, `scrub` and `gc` report,
as metric families an operator's Prometheus scrapes and alerts on.

Every figure is read at scrape time from the same counters the CLI's views use
(constant cost at any archive size), so the scrape and `pacsmesh status` never
disagree. What leaves no figure of its own (gRPC and DICOM requests, associations,
instances received) is counted as it happens by the node's Telemetry
(telemetry.py), whose families are yielded here too: one registry for everything.
Names follow Prometheus conventions: base units in the name, `_total` for
counters. The HTTP server is node/web.py's, which also serves the
status page.

Every node reports the cluster as it sees it (members, safety) and itself (disk,
requests, scrub, GC); dashboards take max() of the former over nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pacsmesh.node import statuspage
from pacsmesh.node.web import WebServer, WebTls

LOGGER = logging.getLogger(__name__)
STATES = ("alive", "suspect", "dead", "left")
# pacsmesh_node_<name>{node}: one gauge per member, from its NodeStatus field
MEMBER_GAUGES = (
    ("used_bytes", "Storage used per member.", "used_bytes"),
    ("free_bytes", "Storage free per member.", "free_bytes"),
    ("backlog_bytes", "Bytes a member still has to copy.", "backlog_bytes"),
    ("backlog_instances", "Instances a member still has to copy.", "backlog_instances"),
    ("capacity_bytes", "Storage a member offers (0: its disk's free space).",
     "capacity_bytes"),
    ("backlog_oldest_age_seconds", "Age of the oldest instance a member waits for (0: none).",
     "backlog_oldest_age_s"),
    ("receive_bytes_per_second", "Chunk bytes a member has been receiving lately.",
     "receive_bytes_per_s"),
    ("drain_seconds", "A member's backlog at its receive rate (-1: not moving).", "drain_s"),
)


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
        # seconds, not days: Prometheus base units (promtool's lint); Grafana shows days
        yield gauge("storage_full_in_seconds", "Until this node's storage is full at the "
                    "recent rate (-1: not growing).",
                    st.days_until_full * 86400 if st.days_until_full >= 0 else -1.0)
        yield gauge("chunk_bytes", "Bytes of this node's pack files.", st.chunk_bytes)
        yield from self._disk(next((n for n in st.nodes if n.id == me), None))
        yield counter("manifests_committed", "Manifests made durable by group commits "
                      "(ingest and replication).", api.store.committed_items)
        yield counter("group_commits", "Group commits (fsync pairs).", api.store.commits)

        state = GaugeMetricFamily("pacsmesh_node_state", "1 for each member's state as "
                                  "this node sees it.", labels=["node", "site", "state"])
        per_member = [(GaugeMetricFamily(f"pacsmesh_node_{name}", doc, labels=["node"]), field)
                      for name, doc, field in MEMBER_GAUGES]
        for n in st.nodes:
            for s in STATES:
                state.add_metric([n.id, n.site, s], 1.0 if n.state == s else 0.0)
            for family, field in per_member:
                family.add_metric([n.id], getattr(n, field))
        yield state
        yield from (family for family, _ in per_member)

        sent = CounterMetricFamily("pacsmesh_link_sent_bytes", "Chunk bytes sent to a peer.",
                                   labels=["peer"])
        received = CounterMetricFamily("pacsmesh_link_received_bytes", "Chunk bytes "
                                       "received from a peer.", labels=["peer"])
        sent_rate = GaugeMetricFamily("pacsmesh_link_sent_bytes_per_second", "Chunk bytes "
                                      "sent to a peer, over the last 10 s.", labels=["peer"])
        received_rate = GaugeMetricFamily("pacsmesh_link_received_bytes_per_second", "Chunk "
                                          "bytes received from a peer, over the last 10 s.",
                                          labels=["peer"])
        for link in st.links:
            sent.add_metric([link.peer], link.sent_bytes)
            received.add_metric([link.peer], link.received_bytes)
            sent_rate.add_metric([link.peer], link.sent_bytes_per_s)
            received_rate.add_metric([link.peer], link.received_bytes_per_s)
        yield from (sent, received, sent_rate, received_rate)
        by_purpose = CounterMetricFamily("pacsmesh_transfer_sent_bytes", "Chunk bytes sent "
                                         "to peers, by purpose.", labels=["purpose"])
        t = st.transfer
        for purpose, n_bytes in (("fresh", t.sent_fresh_bytes), ("repair", t.sent_repair_bytes),
                                 ("rebalance", t.sent_rebalance_bytes)):
            by_purpose.add_metric([purpose], n_bytes)
        yield by_purpose
        r = st.repair
        yield gauge("repair_backlog_instances", "Instances every alive member still has "
                    "to copy, as last reported.", r.backlog_instances)
        yield gauge("repair_backlog_bytes", "Bytes every alive member still has to copy.",
                    r.backlog_bytes)
        yield gauge("repair_bytes_per_second", "Rate the repair backlog is shrinking at.",
                    r.bytes_per_s)
        yield gauge("repair_eta_seconds", "Until every study is safe again at the recent "
                    "rate (-1: unknown).", r.eta_s)
        yield gauge("repair_stalled", "1 if re-protection made no progress lately.",
                    1.0 if r.stalled else 0.0)

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
        last_at = max((d.at_s for d in st.last_drill), default=0.0)
        yield gauge("drill_last_age_seconds", "Since the last restore drill (-1: none since "
                    "this node started).", max(0.0, time.time() - last_at) if last_at else -1.0)
        yield gauge("drill_last_studies", "Studies the last restore drill restored.",
                    len(st.last_drill))
        yield gauge("drill_last_failed_studies", "Studies the last restore drill could not "
                    "restore and verify.", sum(1 for d in st.last_drill if not d.ok))
        yield gauge("drill_last_duration_seconds", "Longest restore of a study in the last "
                    "drill.", max((d.seconds for d in st.last_drill), default=0.0))

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
            yield gauge("scrub_running", "1 while a scrub pass runs.", 1.0 if sc.running else 0.0)
            yield gauge("scrub_pass_chunks", "Chunks the running pass has verified.",
                        sc.pass_chunks)
            yield gauge("scrub_chunks", "Chunks a pass verifies (every chunk held here).",
                        sc.total_chunks)
        if api.gc is not None:
            g = api.gc_status()
            yield counter("gc_reclaimed_bytes", "Pack bytes freed by compaction.",
                          g.reclaimed_bytes)
            yield gauge("gc_reclaimable_bytes", "Bytes GC could free.", g.reclaimable_bytes)
            yield counter("gc_chunks_reclaimed", "Unneeded chunks taken out of the index.",
                          g.chunks_reclaimed)
            yield counter("retention_studies_deleted", "Studies deleted here when their "
                          "retention expired.", g.studies_deleted)
            yield counter("gc_packs_compacted", "Pack files rewritten without their unneeded "
                          "chunks.", g.packs_compacted)
            yield gauge("gc_dead_bytes", "Bytes of unneeded chunks still in pack files.",
                        g.dead_bytes)
            yield gauge("gc_running", "1 while a GC pass runs.", 1.0 if g.running else 0.0)
            yield gauge("gc_last_pass_age_seconds", "Since the last GC pass ended (-1: never).",
                        g.last_pass_completed_age_s)
        telemetry = getattr(api, "telemetry", None)
        if telemetry is not None:
            yield from telemetry.collect()
        LOGGER.debug("metrics scraped for %s", me)

    def _disk(self, mine: Any) -> Iterator[Metric]:
        """This node's own storage and name, unlabelled: what a per-node panel plots.
        `mine`: this node's NodeStatus in the status reply (None: not a member yet)."""
        used = mine.used_bytes if mine is not None else self.api.store.used_bytes()
        free = mine.free_bytes if mine is not None else self.api.store.free_bytes()
        capacity = self.api.store.capacity_bytes or used + free
        yield GaugeMetricFamily("pacsmesh_disk_used_bytes", "Bytes this node's data uses.",
                                value=used)
        yield GaugeMetricFamily("pacsmesh_disk_free_bytes", "Bytes this node may still "
                                "fill.", value=free)
        yield GaugeMetricFamily("pacsmesh_disk_capacity_bytes", "Bytes this node may hold: "
                                "[node] capacity_bytes, else used and free together.",
                                value=capacity)
        info = GaugeMetricFamily("pacsmesh_node_info", "1, labelled with this node's id and "
                                 "site.", labels=["node", "site"])
        info.add_metric([self.api.node_id, mine.site if mine is not None else ""], 1.0)
        yield info


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
