"""The cluster as the node's API sees it: members, holders, safety and alerts.

Runs in API threads; reads only the published snapshot, the holdings cache (in
LMDB: every read is a consistent snapshot), the counters the safety worker keeps
and this node's own catalog, so a status call never waits on a peer and costs
the same at any archive size."""

from __future__ import annotations

import time

from pacsmesh.cluster.bandwidth import FRESH, MB, REBALANCE, REPAIR
from pacsmesh.cluster.drill import Drills
from pacsmesh.cluster.membership import MemberState
from pacsmesh.cluster.safety import assess
from pacsmesh.cluster.safetybook import SafetyWorker
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.proto import node_pb2

REFUSAL_SHOWN_S = 300.0  # a refusal stays an alert this long after the last one
CLOCK_SKEW_ALERT_S = 30.0  # HLC copes with skew; operators should still fix clocks


class ClusterView:
    def __init__(self, state: ClusterState, replicator: Replicator,
                 scrub_interval_s: float) -> None:
        self.state = state
        self.r = replicator
        self.scrub_interval_s = scrub_interval_s
        self.drills: Drills | None = None
        self.safety: SafetyWorker | None = None

    def copies(self) -> int:
        return self.state.copies

    def min_distance_miles(self) -> float:
        return self.state.min_distance_miles

    def nodes(self) -> list[node_pb2.NodeStatus]:
        out = []
        for m in self.state.snapshot.members:
            used, free, cap = m.used_bytes, m.free_bytes, m.capacity_bytes
            if m.node_id == self.state.me:  # our own figures are fresh, not gossiped
                used, free = self.r.store.used_bytes(), self.r.store.free_bytes()
                if self.r.store.capacity_bytes:  # free is cached; never claim past capacity
                    free = min(free, max(0, self.r.store.capacity_bytes - used))
            if m.node_id == self.state.me:
                n, b = self.r.planner.backlog(self.r)
                oldest_ms = self.r.backlog_oldest_ms() if n else 0
                rate = self.r.plain_in.rate(time.monotonic())
                waiting = self.r.waiting() if n else ""
            else:
                report = self.r.reports.get(m.node_id)
                n, b = (report.backlog_instances, report.backlog_bytes) if report else (0, 0)
                oldest_ms = report.backlog_oldest_ms if report else 0
                rate = report.receive_bytes_per_s if report else 0.0
                waiting = report.waiting if report else ""
            now_s = time.time()
            out.append(node_pb2.NodeStatus(
                id=m.node_id, site=m.site, address=m.address, lat=m.lat, lon=m.lon,
                state=str(m.state), used_bytes=used, free_bytes=free, capacity_bytes=cap,
                backlog_instances=n, backlog_bytes=b,
                backlog_oldest_age_s=max(0.0, now_s - oldest_ms / 1000) if oldest_ms else 0.0,
                receive_bytes_per_s=rate,
                drain_s=0.0 if b == 0 else (b / rate if rate > 0 else -1.0), waiting=waiting))
        return out

    def links(self) -> list[node_pb2.LinkStatus]:
        return [node_pb2.LinkStatus(peer=p, sent_bytes=s, sent_bytes_per_s=sr,
                                    received_bytes=r, received_bytes_per_s=rr)
                for p, (s, sr, r, rr) in self.r.links.snapshot().items()]

    def transfer(self) -> node_pb2.TransferStatus:
        shaper = self.r.shaper
        lim = shaper.limits
        return node_pb2.TransferStatus(
            rate_mb_s=lim.rate_bps / MB, bulk_rate_mb_s=lim.bulk_rate_bps / MB,
            bulk_window=str(lim.bulk_window or ""),
            bulk_window_open=not shaper.deferral(REPAIR),
            sent_fresh_bytes=shaper.sent[FRESH], sent_repair_bytes=shaper.sent[REPAIR],
            sent_rebalance_bytes=shaper.sent[REBALANCE],
            relayed_chunks_stolen=self.r.stolen_chunks)

    def repair(self) -> node_pb2.RepairStatus:
        _, unsafe, oldest_ms = self.r.store.catalog.safety_counts()
        alive = {m.node_id for m in self.state.snapshot.alive_peers(self.state.me)}
        instances, bytes_ = self.r.planner.backlog(self.r)
        for node_id, rep in list(self.r.reports.items()):
            if node_id in alive:
                instances += rep.backlog_instances
                bytes_ += rep.backlog_bytes
        if self.safety is None:
            return node_pb2.RepairStatus(unsafe_studies=unsafe, backlog_instances=instances,
                                         backlog_bytes=bytes_, eta_s=-1.0)
        age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0
        p = self.safety.tracker.progress(time.monotonic(), unsafe, bytes_, age)
        return node_pb2.RepairStatus(
            unsafe_studies=unsafe, backlog_instances=instances, backlog_bytes=bytes_,
            studies_per_s=p.studies_per_s, bytes_per_s=p.bytes_per_s, eta_s=p.eta_s,
            stalled=p.stalled, judging=self.safety.pending())

    def holders(self, study_uid: str, instances: int) -> tuple[list[node_pb2.Holder], int]:
        rec = self.r.store.catalog.study_record(study_uid)
        if rec is None:
            return [], 0
        positions = self.r.positions()
        verdict = assess(rec.instances, rec.current_digest, self.r.holdings_for(study_uid),
                         positions, self.state.min_distance_miles)
        holders = []
        for node_id, held in verdict.holders:
            pos = positions.get(node_id)
            if node_id in verdict.full_holders:
                holders.append(node_pb2.Holder(node=node_id, site=pos.site if pos else "",
                                               instances=held,
                                               verified_age_s=self._verified_age_s(node_id)))
        return holders, verdict.safe_copies

    def _verified_age_s(self, node_id: str) -> float:
        """Since the holder's last complete scrub pass started (every chunk re-read)."""
        if node_id == self.state.me:
            started = self.r.last_scrub_started_ms()
        else:
            report = self.r.reports.get(node_id)
            started = report.scrub_started_ms if report is not None else 0
        # a peer's figure: a stamp in the future is shown as just verified, not negative
        return max(0.0, time.time() - started / 1000) if started else -1.0

    def alerts(self) -> list[node_pb2.Alert]:
        out: list[node_pb2.Alert] = []
        snap = self.state.snapshot
        for m in snap.members:
            if m.state == MemberState.SUSPECT:
                out.append(node_pb2.Alert(
                    severity="warning", code="NODE_SUSPECT",
                    message=f"node {m.node_id} ({m.site}) has not been heard from recently; "
                            "check its process and network"))
            elif (m.state == MemberState.LEFT
                  and self.state.left_silent_s.get(m.node_id, 0.0) >= self.state.dead_after_s):
                out.append(node_pb2.Alert(
                    severity="warning", code="NODE_LEFT",
                    message=f"node {m.node_id} ({m.site}) shut down cleanly and has not come "
                            f"back: {self._reprotection()}; start it again or retire it"))
            elif m.state == MemberState.DEAD:
                out.append(node_pb2.Alert(
                    severity="critical", code="NODE_DEAD",
                    message=f"node {m.node_id} ({m.site}) is dead: {self._reprotection()}; "
                            "repair or replace it"))
        unvouched = self.state.unvouched()
        if unvouched:
            out.append(node_pb2.Alert(
                severity="warning", code="MEMBER_UNVERIFIED",
                message=f"{len(unvouched)} members are known only from others' gossip and "
                        f"have never proven their id to this node ({', '.join(unvouched[:5])}"
                        f"{'...' if len(unvouched) > 5 else ''}): they get no copies until "
                        "they do; check their certificates and network"))
        for node_id in sorted(self.state.revoked):
            out.append(node_pb2.Alert(
                severity="critical", code="CERT_REVOKED",
                message=f"node {node_id} presented a revoked certificate: it is treated as "
                        "dead and its copies are being re-created elsewhere; retire it or "
                        "issue it a new certificate"))
        for peer, (count, study, when) in sorted(self.r.failed_proofs.items()):
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
            out.append(node_pb2.Alert(
                severity="critical", code="PROOF_FAILED",
                message=f"node {peer} claimed copies it could not prove it holds ({count} "
                        f"times, last study {study} at {at}); copies are not trimmed on its "
                        "word: check its disks, or revoke its certificate if it is not ours"))
        if self.state.copies > 1 and len(snap.members) <= 1:
            out.append(node_pb2.Alert(
                severity="warning", code="NO_PEERS",
                message=f"this node has no peers: every study has 1 of {self.state.copies} "
                        "copies; add [cluster] seeds to federate with other sites"))
        table = snap.table
        if table is not None and len(snap.members) > 1:
            unsatisfied = table.unsatisfied()
            if unsatisfied:
                shortfall = table.placement(unsatisfied[0]).shortfall
                out.append(node_pb2.Alert(
                    severity="critical", code="PLACEMENT_UNSATISFIABLE",
                    message=f"{len(unsatisfied)} of {self.state.partitions} partitions cannot "
                            f"be placed safely: {shortfall}; add a node at a distant site"))
        now = time.time()
        for address, (when, reason) in self.state.refusals.items():
            if now - when < REFUSAL_SHOWN_S:
                hint = ("make the cluster settings equal on every node"
                        if reason.startswith("cluster settings differ")
                        else "check that peer's identity and configuration")
                out.append(node_pb2.Alert(
                    severity="critical", code="PEER_REFUSED",
                    message=f"peer at {address} was refused: {reason}; {hint}"))
        out += self._verification_alerts()
        out += self._repair_alerts()
        for node_id, skew in self.state.clock_skew_s.items():
            if abs(skew) > CLOCK_SKEW_ALERT_S and snap.member(node_id) is not None:
                out.append(node_pb2.Alert(
                    severity="warning", code="CLOCK_SKEW",
                    message=f"node {node_id}'s clock is {skew:+.0f} s from ours; fix NTP"))
        for source, refused in self.r.future_refusals.items():
            if now - refused.last_at < REFUSAL_SHOWN_S:
                out.append(node_pb2.Alert(
                    severity="warning", code="MANIFEST_FROM_FUTURE",
                    message=f"{refused.count} manifests from {source} were stamped "
                            f"{refused.ahead_s:.0f} s ahead of our clock, more than "
                            "max_clock_ahead_s, and are not stored until our clock catches "
                            "up; fix that peer's clock (NTP), or it is forging versions"))
        return out

    def _reprotection(self) -> str:
        """What re-protection is actually doing, not what it should be doing."""
        rep = self.repair()
        if rep.unsafe_studies == 0:
            return "every study has its copies elsewhere"
        if rep.stalled:
            return (f"{rep.unsafe_studies} studies lack copies and re-protection is STALLED")
        if rep.eta_s >= 0:
            return (f"re-creating copies of {rep.unsafe_studies} studies "
                    f"({rep.backlog_bytes / 1e6:.0f} MB left, about {rep.eta_s / 60:.0f} min)")
        return f"{rep.unsafe_studies} studies lack copies; re-protection has not shown progress yet"

    def _repair_alerts(self) -> list[node_pb2.Alert]:
        rep = self.repair()
        if not rep.stalled:
            return []
        return [node_pb2.Alert(
            severity="critical", code="REPAIR_STALLED",
            message=f"{rep.unsafe_studies} studies lack safe copies and their number has not "
                    f"decreased for {self.safety.tracker.stall_after_s if self.safety else 0:.0f}"
                    f" s ({rep.backlog_instances} instances waiting to be copied): check that "
                    "enough distant nodes are alive and have space, and the fetch workers' logs")]

    def last_drill(self) -> list[node_pb2.DrillResult]:
        return self.drills.last() if self.drills is not None else []

    def _verification_alerts(self) -> list[node_pb2.Alert]:
        out = []
        stale = []
        for m in self.state.snapshot.members:
            if m.state != MemberState.ALIVE:
                continue
            age = self._verified_age_s(m.node_id)
            if age > self.scrub_interval_s * 1.5:
                stale.append(f"{m.node_id} ({age / 86400:.1f} days)")
        if stale:
            out.append(node_pb2.Alert(
                severity="warning", code="STUDIES_NOT_VERIFIED",
                message="copies not verified within the scrub interval on " + ", ".join(stale)
                        + ": check those nodes' scrubbers (pacsmesh scrub --node ...)"))
        if self.drills is not None:
            failed = [r for r in self.drills.last() if not r.ok]
            if failed:
                out.append(node_pb2.Alert(
                    severity="critical", code="DRILL_FAILED",
                    message=f"the last restore drill failed for {len(failed)} studies: "
                            f"{failed[0].error}; a backup that does not restore is no backup"))
        return out
