"""The single-site daemon: one store, the gRPC server, and the seams where the
cluster adds its services and background workers.

Shutdown (SIGTERM or SIGINT): stop taking new calls, give calls in flight a grace
period to finish, stop the workers, then commit and close the store. Anything
acknowledged was durable before its acknowledgement; this order also makes
what is in flight either finish or fail visibly to its sender.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pacsmesh.node.audit import AuditLog, AuditSlot, Event
from pacsmesh.node.charset_repair import CharsetRepair
from pacsmesh.node.config import Config, node_id_for
from pacsmesh.node.dicom import DicomServer
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing, ConfigError, Mismatch, PacsmeshError
from pacsmesh.node.expiry import ExpiryDeleter
from pacsmesh.node.gc import Collector
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import LayoutCheck, Prepared, prepare_file, prepare_local
from pacsmesh.node.lifecycle import LifecycleBook
from pacsmesh.node.logsetup import set_identity, stdout_line
from pacsmesh.node.metrics import MetricsServer
from pacsmesh.node.retention_desk import RetentionDesk
from pacsmesh.node.rpc_meter import MeterInterceptor
from pacsmesh.node.scrubber import Scrubber
from pacsmesh.node.service import (
    ClusterView,
    Drill,
    LoneView,
    NodeService,
    RemoteChunks,
    StoredListener,
)
from pacsmesh.node.store import CommitItem, Store
from pacsmesh.node.telemetry import Telemetry
from pacsmesh.node.tls import (
    Caller,
    Gate,
    GateInterceptor,
    Revocations,
    TlsFiles,
    is_loopback,
    load_files,
    server_credentials,
)
from pacsmesh.node.web import WebTls
from pacsmesh.node.worker import Runner, Worker
from pacsmesh.proto import node_pb2, node_pb2_grpc

LOGGER = logging.getLogger(__name__)
GRPC_MESSAGE_MAX = 16 << 20  # chunks are <= 4 MiB; headroom for manifests of huge files
SHUTDOWN_GRACE_S = 10.0
IO_THREADS = 4  # hashing, zstd and file IO release the GIL; 2 cores here, IO waits too

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", GRPC_MESSAGE_MAX),
    ("grpc.max_send_message_length", GRPC_MESSAGE_MAX),
    ("grpc.so_reuseport", 0),  # a port in use must fail loudly, not be shared
]


class NodeDaemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tls: TlsFiles | None = None
        self.gate = Gate(None)
        if cfg.tls.enabled:
            self.tls = load_files(Path(cfg.tls.ca_cert), Path(cfg.tls.cert), Path(cfg.tls.key))
            who = self.tls.identity
            if who.role != "node":
                raise ConfigError(f"[tls] cert {cfg.tls.cert} is a {who.role} certificate; "
                                  "a node needs one issued with --role node")
            if cfg.node.id and cfg.node.id != who.name:
                raise ConfigError(f"[node] id = {cfg.node.id!r} but the certificate names "
                                  f"{who.name!r}: a node's id is its certificate's")
            cfg = replace(cfg, node=replace(cfg.node, id=who.name))
            self.cfg = cfg
            revocations = Revocations(self.tls.ca, Path(cfg.tls.crl) if cfg.tls.crl else None,
                                      cfg.path, cfg.tls.revoked_serials)
            self.gate = Gate(revocations, self._refused)
        self.node_id = node_id_for(cfg)
        self.telemetry = Telemetry()  # requests, ingest, replication: counted as they happen
        set_identity(self.node_id, cfg.node.site)  # on every log line from now on
        self.audit = AuditLog(cfg.node.data_dir)
        self.store = Store(cfg.node.data_dir, cfg.node.capacity_bytes,
                           pack_size_max=cfg.node.pack_size_mb << 20,
                           partitions=cfg.cluster.partitions, retention=cfg.retention)
        self.store.audit_sink = self.audit.record_now
        self.clock = HybridClock(
            max_ahead_ms=max(1, round(cfg.cluster.max_clock_ahead_s * 1000)))
        self.pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")
        self.runner: Runner | None = None
        self.scrubber = Scrubber(self.store, cfg.scrub.rate_mb_s, cfg.scrub.interval_s)
        self.gc = Collector(self.store, cfg.gc, self.scrubber.report_suspect)
        self.lifecycle = LifecycleBook(self.store.env)
        self.desk = RetentionDesk(self.store, self.lifecycle, self.node_id)
        self.expiry = ExpiryDeleter(self.store, self.desk, self.audit, cfg.gc.expiry_check_s)
        self.drill: Drill | None = None  # restore drills need peers: the cluster sets it
        self.view: ClusterView = LoneView(
            self.store, self.node_id, cfg.node.site, cfg.advertise, cfg.node.lat, cfg.node.lon,
            cfg.cluster.copies, cfg.cluster.min_distance_miles)
        self.server: grpc.aio.Server | None = None
        self._services: list[Callable[[grpc.aio.Server], None]] = []
        self._service_names: list[str] = [node_pb2.DESCRIPTOR.services_by_name["NodeApi"].full_name]
        self._workers: list[Worker] = [self.scrubber, self.gc, self.expiry,
                                       CharsetRepair(self.store, self._read_chunk)]
        self._on_stop: list[Callable[[], Any]] = []
        self._after_stop: list[Callable[[], Any]] = []
        self.listeners: list[StoredListener] = []  # told of every instance stored here
        self.remote: RemoteChunks | None = None  # reads chunks from peers when set
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dicom: DicomServer | None = None  # the DICOM listener, when configured
        if cfg.dicom.listen or cfg.dicom.tls_listen:  # bad TLS files fail here, before serving
            self.dicom = DicomServer(self, cfg.dicom, cfg.node.data_dir, self._dicom_revoked(),
                                     self.telemetry)

    # seams for the cluster composition root
    def add_service(self, register: Callable[[grpc.aio.Server], None], full_name: str) -> None:
        self._services.append(register)
        self._service_names.append(full_name)

    def add_worker(self, worker: Worker) -> None:
        self._workers.append(worker)

    def on_stop(self, fn: Callable[[], Any]) -> None:
        """Run first at shutdown, while everything still works (e.g. tell peers)."""
        self._on_stop.append(fn)

    def after_stop(self, fn: Callable[[], Any]) -> None:
        """Run once the server and workers have stopped (e.g. close channels)."""
        self._after_stop.append(fn)

    # ---- for in-process front ends (DICOM), called from their own threads -------------

    def ingest_bytes(self, data: bytes, client_ref: str = "", check: LayoutCheck | None = None,
                     file_hash: bytes | None = None, audit: AuditSlot | None = None
                     ) -> node_pb2.IngestResult:
        """Store one whole Part 10 file; returns once it is durable here (or rejected).
        Runs the same checks as `pacsmesh put`, and `check` on its layout first.
        `audit`: its event (set by `check`) is written by the group commit that makes
        the instance durable, before this returns."""
        return self._ingest_whole(lambda: prepare_local(
            self.store, self.node_id, self.clock, data, client_ref, check, file_hash),
            client_ref, audit)

    def ingest_file(self, path: str, client_ref: str = "", check: LayoutCheck | None = None,
                    file_hash: bytes | None = None, audit: AuditSlot | None = None
                    ) -> node_pb2.IngestResult:
        """As ingest_bytes, for a Part 10 file on disk, read a chunk at a time."""
        return self._ingest_whole(lambda: prepare_file(
            self.store, self.node_id, self.clock, path, client_ref, check, file_hash),
            client_ref, audit)

    def _ingest_whole(self, prepare: Callable[[], Prepared | node_pb2.IngestResult],
                      client_ref: str, audit: AuditSlot | None) -> node_pb2.IngestResult:
        try:
            out = prepare()
        except Mismatch:
            raise  # the caller's own check: it answers for it
        except PacsmeshError as exc:
            return node_pb2.IngestResult(client_ref=client_ref, reason=str(exc),
                                         outcome=node_pb2.IngestResult.REJECTED)
        if not isinstance(out, Prepared):
            return out
        item = CommitItem(out.manifest_id, out.raw, out.manifest, Future(),
                          audit=audit.event if audit is not None else None)
        try:
            self.store.submit_item(item).result()
            if audit is not None and item.audit is not None:
                audit.written, audit.error = not item.audit_error, item.audit_error
        except PacsmeshError as exc:
            return node_pb2.IngestResult(client_ref=client_ref, reason=str(exc),
                                         outcome=node_pb2.IngestResult.REJECTED)
        if self.loop is not None:  # listeners live on the event loop
            for listener in self.listeners:
                self.loop.call_soon_threadsafe(listener, out.manifest_id, out.raw, out.manifest)
        return node_pb2.IngestResult(
            client_ref=client_ref, outcome=node_pb2.IngestResult.STORED,
            manifest_id=out.manifest_id, bytes_written=out.bytes_written,
            sop_instance_uid=out.manifest.sop_instance_uid,
            study_instance_uid=out.manifest.study_instance_uid)

    def _read_chunk(self, key: bytes, m: node_pb2.Manifest) -> bytes:
        """A verified chunk from here, else from a peer (once the cluster set `remote`)."""
        try:
            return self.store.chunks.read(key)
        except (ChunkCorrupt, ChunkMissing):
            if self.remote is None:
                raise
        return self.remote(key, m)

    def instance_safety(self, sop_instance_uid: str) -> tuple[bool, str]:
        """Whether an instance's copies are safe (N verified copies at sites pairwise >= D
        apart), and if not, why. Judged on its whole study: stricter, never looser."""
        versions = self.store.catalog.versions_of(sop_instance_uid)
        if not versions:
            return False, "instance is not in the catalog"
        got = self.store.catalog.get(versions[-1])
        if got is None:
            return False, "instance is not in the catalog"
        study = got[1].study_instance_uid
        rec = self.store.catalog.study_record(study)
        instances = rec.instances if rec is not None else 0
        _, safe = self.view.holders(study, instances)
        need = self.view.copies()
        if safe >= need:
            return True, ""
        return False, f"{safe} of {need} safe copies so far"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # the meter first: it wraps the gate, so refused calls count with their code
        server = grpc.aio.server(options=GRPC_OPTIONS,
                                 interceptors=[MeterInterceptor(self.telemetry),
                                               GateInterceptor(self.gate)])
        api = NodeService(self.store, self.node_id, self.clock, self.view, self.pool,
                          self.listeners, self.remote, self.scrubber, self.drill)
        api.unsafe_alert_after_s = self.cfg.cluster.unsafe_alert_after_s
        api.audit = self.audit
        api.gc = self.gc
        api.desk = self.desk
        api.expiry = self.expiry
        api.telemetry = self.telemetry
        if self.cfg.metrics.listen:
            try:
                metrics = MetricsServer(api, self.cfg.metrics.listen, self._web_tls())
            except OSError as exc:
                raise ConfigError(f"[metrics] listen = {self.cfg.metrics.listen!r}: "
                                  f"{exc.strerror}") from exc
            self._after_stop.append(metrics.close)
        if (plaintext := self.plaintext_alert()) is not None:
            api.config_alerts.append(plaintext)
        node_pb2_grpc.add_NodeApiServicer_to_server(api, server)
        for register in self._services:
            register(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        try:
            if self.tls is not None:
                port = server.add_secure_port(self.cfg.node.listen, server_credentials(self.tls))
            else:
                port = server.add_insecure_port(self.cfg.node.listen)
        except RuntimeError as exc:
            raise PacsmeshError(f"cannot listen on {self.cfg.node.listen}: {exc}") from exc
        if port == 0:
            raise PacsmeshError(f"cannot listen on {self.cfg.node.listen}: address in use?")
        await server.start()
        self.server = server
        for name in [*self._service_names, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.runner = Runner()
        for worker in self._workers:
            self.runner.start(worker)
        if self.dicom is not None:  # PacsmeshError (exit 1): a port in use
            self.dicom.start()
        LOGGER.info("node %s (%s) serving on %s", self.node_id, self.cfg.node.site,
                    self.cfg.node.listen)

    def _web_tls(self) -> WebTls | None:
        """With [tls], the status page and /metrics are HTTPS with this node's own
        certificate, and readers prove who they are as on the gRPC edge (same CA, CRL)."""
        if self.tls is None:
            return None
        revocations = self.gate.revocations
        return WebTls(Path(self.cfg.tls.cert), Path(self.cfg.tls.key), self.tls.ca,
                      revocations.revoked if revocations is not None else None)

    def _dicom_revoked(self) -> Callable[[int], bool] | None:
        """The cluster's revocations, for DICOM TLS clients when the cluster CA signs them
        (a CRL of the cluster CA says nothing about another CA's serials)."""
        revocations = self.gate.revocations
        dicom = self.cfg.dicom
        if revocations is None or not dicom.tls_listen:
            return None
        if Path(dicom.tls_client_ca).resolve() != Path(self.cfg.tls.ca_cert).resolve():
            return None
        return revocations.revoked

    def _refused(self, caller: Caller, method: str, reason: str) -> None:
        LOGGER.warning("refused %s from %s (%s): %s", method, caller.address, caller.who, reason)
        self.audit.record(Event(time=time.time(), who=caller.who, role=caller.role,
                                address=caller.address, action=method.rsplit("/", 1)[-1],
                                outcome="refused", detail=reason), wait=False)

    def plaintext_alert(self) -> node_pb2.Alert | None:
        """Plaintext beyond loopback is allowed only on purpose, and never quietly."""
        if self.tls is not None or is_loopback(self.cfg.node.listen):
            return None
        return node_pb2.Alert(
            severity="critical", code="PLAINTEXT",
            message=f"the gRPC API on {self.cfg.node.listen} is plaintext and open to anyone "
                    "who can reach it ([tls] insecure = true): patient data and every "
                    "command are unprotected; configure [tls] (README: Securing a federation)")

    async def stop(self) -> None:
        await _call_all(self._on_stop)
        if self.dicom is not None:  # blocks while associations in flight finish
            await asyncio.get_running_loop().run_in_executor(None, self.dicom.stop)
        if self.server is not None:
            await self.server.stop(SHUTDOWN_GRACE_S)
        if self.runner is not None:
            await self.runner.stop()
        await _call_all(self._after_stop)
        self.audit.close()
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)
        self.pool.shutdown(wait=True)
        LOGGER.info("node %s stopped cleanly", self.node_id)

    async def serve_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        print(stdout_line(f"pacsmesh node {self.node_id} ready on {self.cfg.node.listen}"),
              flush=True)
        await stop.wait()
        LOGGER.info("signal received: shutting down")
        await self.stop()



async def _call_all(fns: list[Callable[[], Any]]) -> None:
    for fn in fns:
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # shutdown goes on: the store must still be closed cleanly
            LOGGER.exception("shutdown hook failed")
