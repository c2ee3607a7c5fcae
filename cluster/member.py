"""The composition root: builds a full cluster member from a config and runs it.

node/ knows nothing of peers; this module plugs the cluster's services and
workers into the single-site daemon's seams, as Garage's binary composes its
lower crates.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from pacsmesh.cluster.bandwidth import Shaper, limits_from_config
from pacsmesh.cluster.drill import Drills, DrillWorker
from pacsmesh.cluster.gossip import GossipWorker, me_as_member, new_membership
from pacsmesh.cluster.lifecycle_worker import LifecycleWorker
from pacsmesh.cluster.membership import ClusterSettings
from pacsmesh.cluster.peer_service import PeerService
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.safetybook import SafetyWorker
from pacsmesh.cluster.state import ClusterState
from pacsmesh.cluster.transfer import Replicator
from pacsmesh.cluster.view import ClusterView
from pacsmesh.cluster.workers import (
    AnnounceWorker,
    AntiEntropyWorker,
    FetchWorker,
    HeldDeltaWorker,
    HoldingsWorker,
    ProofAuditWorker,
    TrimWorker,
)
from pacsmesh.node import retention
from pacsmesh.node.config import Config
from pacsmesh.node.daemon import NodeDaemon
from pacsmesh.proto import peer_pb2, peer_pb2_grpc

LOGGER = logging.getLogger(__name__)


def next_incarnation(data_dir: Path) -> int:
    """Raised on every start and kept, so our new records beat the old ones."""
    try:
        value = int((data_dir / "incarnation").read_text().strip()) + 1
    except (FileNotFoundError, ValueError):
        value = 1
    keep_incarnation(data_dir, value)
    return value


def keep_incarnation(data_dir: Path, value: int) -> None:
    """Also after a refutation raised it: peers bound how far a relayed record may
    raise our incarnation, so the next start must not begin below this run's."""
    path = data_dir / "incarnation"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{value}\n")
    tmp.replace(path)


def build(cfg: Config) -> NodeDaemon:
    daemon = NodeDaemon(cfg)
    c = cfg.cluster
    state = ClusterState(daemon.node_id, c.partitions, c.copies, c.min_distance_miles,
                         c.dead_after_s, c.gossip_interval_s)
    settings = ClusterSettings(c.copies, c.min_distance_miles, c.partitions,
                               retention.fingerprint(cfg.retention))
    me = me_as_member(daemon.node_id, cfg.node.site, cfg.node.lat, cfg.node.lon, cfg.advertise,
                      next_incarnation(cfg.node.data_dir))
    # our real size from the first record on: a weight of zero until the first gossip
    # round would move placement away from us and back at every start
    me = replace(me, capacity_bytes=cfg.node.capacity_bytes,
                 used_bytes=daemon.store.used_bytes(), free_bytes=daemon.store.free_bytes())
    membership = new_membership(me, settings, list(c.seeds), c.gossip_interval_s,
                                c.suspect_after_s or None, c.dead_after_s)
    peers = Peers(daemon.tls, state.id_at)
    daemon.gate.on_revoked_node = state.revoke
    state.require_contact = daemon.tls is not None
    store = daemon.store
    gossip = GossipWorker(
        membership, state, peers, c.gossip_interval_s,
        usage=lambda: (cfg.node.capacity_bytes, store.used_bytes(), store.free_bytes()))
    gossip.keep_incarnation = lambda value: keep_incarnation(cfg.node.data_dir, value)
    replicator = Replicator(store, state, peers, daemon.node_id, cfg.advertise, daemon.clock,
                            daemon.pool)
    replicator.proof_identity = daemon.node_id if daemon.tls is not None else ""
    replicator.telemetry = daemon.telemetry
    t = cfg.transfer
    replicator.fresh_s, replicator.wire_zstd_level = t.fresh_s, t.wire_zstd_level
    replicator.shaper = Shaper(limits_from_config(t.rate_mb_s, t.bulk_rate_mb_s, t.bulk_window,
                                                  t.peers), daemon.node_id)
    background = max(1.0, 5 * c.gossip_interval_s)
    trim = TrimWorker(replicator, background)
    safety = SafetyWorker(replicator, c.repair_stalled_after_s, c.gossip_interval_s)
    gossip.on_placement_change.append(replicator.on_placement_change)
    gossip.on_placement_change.append(trim.on_placement_change)
    replicator.on_holdings_changed.append(trim.on_holdings_changed)
    gossip.publish()
    view = ClusterView(state, replicator, cfg.scrub.interval_s)
    view.safety = safety
    daemon.view = view
    daemon.listeners.append(replicator.on_stored)
    daemon.scrubber.repair = replicator.repair_chunk
    replicator.scrub_started_ms = lambda: daemon.scrubber.state.last_pass_started_ms
    drills = Drills(replicator)
    daemon.drill = drills.run
    view.drills = drills
    daemon.remote = replicator.read_remote
    lifecycle = LifecycleWorker(daemon.lifecycle, state, peers, daemon.node_id, replicator._run,
                                interval_s=background, confirm_within_s=max(60.0, 6 * background),
                                settle_s=c.dead_after_s, has_seeds=bool(c.seeds))
    daemon.desk.listeners.append(lifecycle.made)
    daemon.expiry.confirmed = lifecycle.deletion_blocker
    daemon.expiry.on_deleted.append(lambda uids: replicator.held_changed(set(uids)))
    service = PeerService(gossip, replicator)
    service.lifecycle = lifecycle
    daemon.add_service(lambda server: peer_pb2_grpc.add_PeerApiServicer_to_server(service, server),
                       peer_pb2.DESCRIPTOR.services_by_name["PeerApi"].full_name)
    # anti-entropy is the safety net under announce; a few gossip rounds apart is plenty
    for worker in (gossip, AnnounceWorker(replicator), FetchWorker(replicator),
                   AntiEntropyWorker(replicator, background),
                   HoldingsWorker(replicator, max(0.5, 2 * c.gossip_interval_s)),
                   HeldDeltaWorker(replicator),
                   ProofAuditWorker(replicator, c.proof_audit_interval_s),
                   trim, safety, lifecycle):
        daemon.add_worker(worker)
    if cfg.drill.interval_s > 0:
        daemon.add_worker(DrillWorker(drills, cfg.drill.interval_s, cfg.drill.count))
    daemon.on_stop(gossip.leave)
    daemon.after_stop(peers.close)
    daemon.after_stop(replicator.close)
    return daemon


async def _serve(cfg: Config) -> None:
    daemon = build(cfg)
    await daemon.serve_until_signalled()


def run_member(cfg: Config) -> int:
    asyncio.run(_serve(cfg))
    return 0
