"""The node's client API over gRPC: the edge where errors become status codes.

Hashing, decompression and file IO run in a thread pool (they release the
GIL); the asyncio loop only moves messages. The cluster plugs in through
`ClusterView`: on a lone node it is `LoneView`, which answers for this node only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import grpc

from pacsmesh.node import alerts as alerts_mod
from pacsmesh.node import listing, retention
from pacsmesh.node.audit import AuditLog, Event
from pacsmesh.node.errors import ChunkCorrupt, ChunkMissing, PacsmeshError
from pacsmesh.node.expiry import ExpiryDeleter
from pacsmesh.node.gc import Collector
from pacsmesh.node.hlc import HybridClock
from pacsmesh.node.ingest import IngestSession, Prepared
from pacsmesh.node.retention_desk import Refused, RetentionDesk
from pacsmesh.node.scrubber import Scrubber
from pacsmesh.node.store import Store
from pacsmesh.node.telemetry import Telemetry
from pacsmesh.node.tls import CALLER
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto import node_pb2, node_pb2_grpc

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
Outcome = node_pb2.IngestResult.Outcome
PRECHECK_KEYS_MAX = 100_000  # per request: bounds the memory one client can make us use
UNSAFE_ALERT_AFTER_S = 3600.0  # an instance not safe off-site within an hour is news
DRILL_COUNT_MAX = 100  # studies per drill request
AUDIT_PAGE_DEFAULT = 1000
INGEST_BATCH_BYTES_MAX = 8 << 20  # received bytes held before handing them to a worker
INGEST_OUTCOMES = {Outcome.STORED: "stored", Outcome.DUPLICATE: "duplicate",
                   Outcome.REJECTED: "rejected"}  # as pacsmesh_ingest_instances_total says


class ClusterView(Protocol):
    """What the API needs to know about the rest of the cluster."""

    def copies(self) -> int: ...
    def min_distance_miles(self) -> float: ...
    def nodes(self) -> list[node_pb2.NodeStatus]: ...
    def holders(self, study_uid: str, instances: int) -> tuple[list[node_pb2.Holder], int]: ...
    def alerts(self) -> list[node_pb2.Alert]: ...
    def last_drill(self) -> list[node_pb2.DrillResult]: ...
    def repair(self) -> node_pb2.RepairStatus: ...
    def links(self) -> list[node_pb2.LinkStatus]: ...
    def transfer(self) -> node_pb2.TransferStatus: ...


class LoneView:
    """A node without peers: it is the only holder, so nothing is safe off-site."""

    def __init__(self, store: Store, node_id: str, site: str, address: str,
                 lat: float, lon: float, copies: int, min_distance_miles: float) -> None:
        self.store, self.node_id, self.site, self.address = store, node_id, site, address
        self.lat, self.lon = lat, lon
        self._copies, self._distance = copies, min_distance_miles

    def copies(self) -> int:
        return self._copies

    def min_distance_miles(self) -> float:
        return self._distance

    def nodes(self) -> list[node_pb2.NodeStatus]:
        return [node_pb2.NodeStatus(
            id=self.node_id, site=self.site, address=self.address, lat=self.lat, lon=self.lon,
            state="alive", used_bytes=self.store.used_bytes(),
            free_bytes=self.store.free_bytes(), capacity_bytes=self.store.capacity_bytes,
        )]

    def holders(self, study_uid: str, instances: int) -> tuple[list[node_pb2.Holder], int]:
        info = self.store.catalog.study_info(study_uid)
        if info.held_instances == 0:
            return [], 0
        holder = node_pb2.Holder(node=self.node_id, site=self.site, instances=info.held_instances)
        return [holder], (1 if info.held_instances == instances and instances > 0 else 0)

    def last_drill(self) -> list[node_pb2.DrillResult]:
        return []

    def repair(self) -> node_pb2.RepairStatus:
        return node_pb2.RepairStatus(eta_s=-1.0)

    def links(self) -> list[node_pb2.LinkStatus]:
        return []

    def transfer(self) -> node_pb2.TransferStatus:
        return node_pb2.TransferStatus()

    def alerts(self) -> list[node_pb2.Alert]:
        if self._copies <= 1:
            return []
        return [node_pb2.Alert(
            severity="warning", code="NO_PEERS",
            message=f"this node has no peers: every study has 1 of {self._copies} copies; "
                    "add [cluster] seeds to federate with other sites",
        )]


# Called after an instance became durable here: (manifest id, raw manifest, manifest).
StoredListener = Callable[[bytes, bytes, node_pb2.Manifest], None]
# Fetches a chunk this node lacks or holds damaged from a peer: verified plain bytes.
RemoteChunks = Callable[[bytes, node_pb2.Manifest], bytes]
# Restores K random studies from other nodes and verifies every byte.
Drill = Callable[[int], Awaitable[list[node_pb2.DrillResult]]]


class NodeService(node_pb2_grpc.NodeApiServicer):
    def __init__(self, store: Store, node_id: str, clock: HybridClock, view: ClusterView,
                 pool: ThreadPoolExecutor, listeners: list[StoredListener] | None = None,
                 remote: RemoteChunks | None = None, scrubber: Scrubber | None = None,
                 drill: Drill | None = None) -> None:
        self.store, self.node_id, self.clock, self.view, self.pool = (
            store, node_id, clock, view, pool)
        self.listeners = listeners if listeners is not None else []
        self.remote = remote
        self.scrubber = scrubber
        self.drill = drill
        self.growth = alerts_mod.GrowthTracker()
        self.member_growth: dict[str, alerts_mod.GrowthTracker] = {}  # peers, by id
        self.unsafe_alert_after_s = UNSAFE_ALERT_AFTER_S
        self.config_alerts: list[node_pb2.Alert] = []  # e.g. PLAINTEXT: fixed at start
        self.audit: AuditLog | None = None
        self.gc: Collector | None = None
        self.desk: RetentionDesk | None = None
        self.expiry: ExpiryDeleter | None = None
        self.telemetry = Telemetry()  # the daemon's own replaces it

    def _event(self, action: str, outcome: str, study_uid: str = "", instances: int = 0,
               detail: str = "") -> Event:
        c = CALLER.get()
        return Event(time=time.time(), who=c.who, role=c.role, address=c.address,
                     action=action, outcome=outcome, study_uid=study_uid,
                     instances=instances, detail=detail)

    async def _audit(self, action: str, outcome: str, study_uid: str = "", instances: int = 0,
                     detail: str = "") -> None:
        """Returns once the event is durable: the answer follows its record."""
        if self.audit is not None:
            await self._run(self.audit.record,
                            self._event(action, outcome, study_uid, instances, detail))

    def _audit_nowait(self, event: Event) -> None:
        """For finally blocks of streams cut short, which may not await."""
        if self.audit is not None:
            self.audit.record(event, wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- ingest -------------------------------------------------------------------

    async def Precheck(self, request: node_pb2.PrecheckRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.PrecheckReply:
        if len(request.file_hashes) + len(request.chunk_hashes) > PRECHECK_KEYS_MAX:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"at most {PRECHECK_KEYS_MAX} hashes per precheck")
        known = await self._run(self.store.catalog.known_files, list(request.file_hashes))
        missing = await self._run(self.store.chunks.missing, list(request.chunk_hashes))
        return node_pb2.PrecheckReply(known_file_hashes=known, missing_chunk_hashes=missing)

    async def Ingest(self, request_iterator: AsyncIterator[node_pb2.IngestMessage],
                     context: grpc.aio.ServicerContext[Any, Any]
                     ) -> AsyncIterator[node_pb2.IngestResult]:
        session = IngestSession(self.store, self.node_id, self.clock)
        results: asyncio.Queue[node_pb2.IngestResult | None] = asyncio.Queue()
        commits: set[asyncio.Task[None]] = set()

        async def commit(p: Prepared) -> None:
            try:
                await asyncio.wrap_future(self.store.submit(p.manifest_id, p.raw, p.manifest))
                outcome = Outcome.STORED  # held here now (new, or known from a peer before)
                self.telemetry.ingested("put", "stored", p.manifest.size)
                for listener in self.listeners:
                    listener(p.manifest_id, p.raw, p.manifest)
                await results.put(node_pb2.IngestResult(
                    client_ref=p.client_ref, outcome=outcome, manifest_id=p.manifest_id,
                    bytes_written=p.bytes_written, sop_instance_uid=p.manifest.sop_instance_uid,
                    study_instance_uid=p.manifest.study_instance_uid))
            except PacsmeshError as exc:
                await results.put(node_pb2.IngestResult(
                    client_ref=p.client_ref, outcome=Outcome.REJECTED, reason=str(exc)))

        async def handle(batch: list[node_pb2.IngestMessage]) -> None:
            for out in await self._run(session.on_messages, batch):
                if isinstance(out, Prepared):
                    task = asyncio.create_task(commit(out))
                    commits.add(task)
                    task.add_done_callback(commits.discard)
                else:
                    await results.put(out)

        async def read() -> None:
            try:
                batch: list[node_pb2.IngestMessage] = []
                batch_bytes = 0
                async for msg in request_iterator:
                    batch.append(msg)
                    batch_bytes += len(msg.part.data)
                    # hand whole instances to the worker thread, bounded in memory
                    if msg.WhichOneof("kind") in ("end", "abort") or (
                            batch_bytes >= INGEST_BATCH_BYTES_MAX):
                        await handle(batch)
                        batch, batch_bytes = [], 0
                if batch:
                    await handle(batch)
                tail = session.close()
                if tail is not None:
                    await results.put(tail)
                if commits:
                    await asyncio.gather(*commits)
            finally:
                await results.put(None)

        reader = asyncio.create_task(read())
        stored: dict[str, int] = {}
        rejected = 0
        finished = False
        try:
            while (item := await results.get()) is not None:
                if item.outcome != Outcome.STORED:  # stored ones were counted with their size
                    self.telemetry.ingested("put", INGEST_OUTCOMES[item.outcome])
                if item.outcome == Outcome.REJECTED:
                    rejected += 1
                elif item.study_instance_uid:
                    stored[item.study_instance_uid] = stored.get(item.study_instance_uid, 0) + 1
                yield item
            await reader  # surface errors of the reader
            # the stream ends only once the put's audit record is durable
            await self._audit_put(stored, rejected, "ok" if not rejected else "partial")
            finished = True
        finally:
            reader.cancel()
            if not finished:
                for event in self._put_events(stored, rejected, "interrupted"):
                    self._audit_nowait(event)

    def _put_events(self, stored: dict[str, int], rejected: int, outcome: str) -> list[Event]:
        events = [self._event("put", outcome, study, n) for study, n in sorted(stored.items())]
        if rejected or not events:
            events.append(self._event("put", "refused" if not stored else outcome,
                                      detail=f"{rejected} files rejected"))
        return events

    async def _audit_put(self, stored: dict[str, int], rejected: int, outcome: str) -> None:
        if self.audit is not None:
            for event in self._put_events(stored, rejected, outcome):
                await self._run(self.audit.record, event)

    # ---- restore ----------------------------------------------------------------------

    async def GetStudy(self, request: node_pb2.GetStudyRequest,
                       context: grpc.aio.ServicerContext[Any, Any]
                       ) -> AsyncIterator[node_pb2.GetStudyMessage]:
        if problem := uid_problem(request.study_uid):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"study UID {problem}")
        current = await self._run(self.store.catalog.current_manifests, request.study_uid)
        if not current:
            await self._audit("get", "failed", request.study_uid, detail="not in the catalog")
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"study {request.study_uid} is not in this node's catalog")
        sent, failed, finished = 0, 0, False
        try:
            async for message in self._send_study(current):
                if message.WhichOneof("kind") == "end":
                    sent += 1
                elif message.WhichOneof("kind") == "error":
                    failed += 1
                yield message
            await self._audit("get", "ok" if not failed else "partial", request.study_uid,
                              sent, f"{failed} instances unreadable" if failed else "")
            finished = True
        finally:
            if not finished:
                self._audit_nowait(self._event("get", "interrupted", request.study_uid, sent))

    async def _send_study(self, current: list[tuple[bytes, bytes, node_pb2.Manifest]]
                          ) -> AsyncIterator[node_pb2.GetStudyMessage]:
        for mid, raw, m in current:
            yield node_pb2.GetStudyMessage(start=node_pb2.InstanceStart(manifest=raw,
                                                                         manifest_id=mid))
            for ref in m.chunks:
                try:
                    data = await self._run(self._read_chunk, ref.hash, m)
                except (ChunkCorrupt, ChunkMissing) as exc:
                    LOGGER.error("instance %s: %s", m.sop_instance_uid, exc,
                                 extra={"study": m.study_instance_uid,
                                        "instance": m.sop_instance_uid})
                    yield node_pb2.GetStudyMessage(error=node_pb2.InstanceError(
                        sop_instance_uid=m.sop_instance_uid,
                        reason=f"instance {m.sop_instance_uid} cannot be read here: {exc}"))
                    break
                yield node_pb2.GetStudyMessage(data=node_pb2.InstanceData(data=data))
            else:
                yield node_pb2.GetStudyMessage(end=node_pb2.InstanceEnd())

    def _read_chunk(self, key: bytes, m: node_pb2.Manifest) -> bytes:
        """A verified chunk: from this node, else (missing or damaged here) from a peer."""
        try:
            return self.store.chunks.read(key)
        except (ChunkCorrupt, ChunkMissing) as exc:
            if self.remote is None:
                raise
            LOGGER.warning("instance %s: %s; reading it from a peer", m.sop_instance_uid, exc,
                           extra={"study": m.study_instance_uid, "instance": m.sop_instance_uid})
            return self.remote(key, m)

    # ---- views ------------------------------------------------------------------------

    def _summary(self, rec: node_pb2.StudyRecord, unsafe_only: bool
                 ) -> node_pb2.StudySummary | None:
        _, safe = self.view.holders(rec.study_uid, rec.instances)
        if unsafe_only and safe >= self.view.copies():
            return None
        exp = self.store.catalog.expiry_of(rec).expires
        return node_pb2.StudySummary(
            study_uid=rec.study_uid, patient_id=rec.patient_id, study_date=rec.study_date,
            modalities=sorted(rec.modalities), instances=rec.instances, bytes=rec.bytes,
            safe_copies=safe, expires=exp.isoformat() if exp else "")

    def _study_page(self, request: node_pb2.ListStudiesRequest
                    ) -> listing.Page[node_pb2.StudySummary]:
        cat = self.store.catalog
        flt = listing.StudyFilter(
            patient_id=request.patient_id, since=request.since, until=request.until,
            modality=request.modality, local=request.local, unsafe=request.unsafe,
            expired_by=(retention.today_utc(time.time()).strftime("%Y%m%d")
                        if request.expired else ""),
            expiry_key=lambda rec: retention.expiry_key(cat.expiry_of(rec)))
        return listing.list_page(self.store.catalog, flt, request.after, request.limit,
                                 lambda rec: self._summary(rec, request.unsafe))

    async def ListStudies(self, request: node_pb2.ListStudiesRequest,
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> node_pb2.ListStudiesReply:
        try:
            page = await self._run(self._study_page, request)
        except listing.BadQuery as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        filters = {"patient": bool(request.patient_id), "since": request.since,
                   "until": request.until, "modality": request.modality,
                   "local": request.local, "unsafe": request.unsafe,
                   "expired": request.expired}
        shown = ", ".join(f"{k}={v}" for k, v in filters.items() if v)  # no patient IDs
        await self._audit("ls", "ok", instances=len(page.items),
                          detail=f"{len(page.items)} studies listed" + (f"; {shown}"
                                                                         if shown else ""))
        return node_pb2.ListStudiesReply(studies=page.items, next=page.next)

    def _locate(self, study_uid: str) -> node_pb2.LocateReply:
        info = self.store.catalog.study_info(study_uid)
        holders, safe = self.view.holders(study_uid, info.instances)
        required = self.view.copies()
        return node_pb2.LocateReply(study_uid=study_uid, instances=info.instances,
                                    holders=holders, safe_copies=safe, required_copies=required,
                                    safe=info.instances > 0 and safe >= required)

    async def Locate(self, request: node_pb2.LocateRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.LocateReply:
        if problem := uid_problem(request.study_uid):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"study UID {problem}")
        reply = await self._run(self._locate, request.study_uid)
        await self._audit("locate", "ok" if reply.instances else "failed", request.study_uid,
                          reply.instances)
        if reply.instances == 0:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"study {request.study_uid} is not in the catalog")
        return reply

    def _status(self) -> node_pb2.StatusReply:
        # Counters and one index key: a status call costs the same at any archive size.
        required = self.view.copies()
        studies, unsafe, oldest_unsafe_ms = self.store.catalog.safety_counts()
        instances = self.store.catalog.instance_count()
        safe_studies = studies - unsafe
        now_ms = time.time() * 1000
        oldest_age = max(0.0, (now_ms - oldest_unsafe_ms) / 1000) if oldest_unsafe_ms else 0.0
        alerts = list(self.view.alerts())
        alerts += self._own_alerts()
        if oldest_age > self.unsafe_alert_after_s:
            alerts.append(node_pb2.Alert(
                severity="critical", code="STUDIES_UNSAFE",
                message=f"{studies - safe_studies} studies have fewer than {required} safe "
                        f"copies; the oldest for {oldest_age / 3600:.1f} h: check peers and "
                        "placement"))
        nodes = self.view.nodes()
        self._member_days_until_full(nodes)
        chunk_bytes = self.store.packs.bytes_total()
        return node_pb2.StatusReply(
            repair=self.view.repair(),
            copies=required, min_distance_miles=self.view.min_distance_miles(), nodes=nodes,
            studies=studies, instances=instances, safe_studies=safe_studies,
            unsafe_studies=studies - safe_studies, oldest_unsafe_age_s=oldest_age,
            alerts=alerts, answered_by=self.node_id, chunk_bytes=chunk_bytes,
            last_drill=self.view.last_drill(), days_until_full=self._days_until_full(),
            links=self.view.links(), transfer=self.view.transfer())

    def _member_days_until_full(self, nodes: list[node_pb2.NodeStatus]) -> None:
        """Each member's days until full, from its used bytes as gossip reported them over
        the calls of the last week (this node's own from its disk)."""
        for n in nodes:
            if n.id == self.node_id:
                n.days_until_full = self._days_until_full()
                continue
            growth = self.member_growth.setdefault(n.id, alerts_mod.GrowthTracker())
            growth.add(n.used_bytes)
            days = alerts_mod.days_until_full(n.free_bytes, growth.bytes_per_day(n.used_bytes))
            n.days_until_full = -1.0 if days is None else days
        for gone in set(self.member_growth) - {n.id for n in nodes}:
            del self.member_growth[gone]

    def _days_until_full(self) -> float:
        used = self.store.used_bytes()
        days = alerts_mod.days_until_full(self.store.free_bytes(),
                                          self.growth.bytes_per_day(used))
        return -1.0 if days is None else days

    def _own_alerts(self) -> list[node_pb2.Alert]:
        used = self.store.used_bytes()
        self.growth.add(used)
        per_day = self.growth.bytes_per_day(used)
        out = list(self.config_alerts)
        out += alerts_mod.disk_alerts(self.node_id, self.store.used_fraction())
        out += alerts_mod.growth_alerts(
            self.node_id, alerts_mod.days_until_full(self.store.free_bytes(), per_day), per_day)
        if self.scrubber is not None:
            st = self.scrubber.state
            out += alerts_mod.scrub_alerts(
                self.node_id, self.scrubber.overdue(int(time.time() * 1000)),
                self.scrubber.interval_s, st.corrupt_found, st.repaired,
                list(st.unrepairable.values()))
        if self.expiry is not None and self.expiry.paused:
            out.append(node_pb2.Alert(
                severity="warning", code="RETENTION_PAUSED",
                message=f"on {self.node_id}: {self.expiry.paused}; nothing is deleted "
                        "until that is resolved"))
        return out

    async def Status(self, request: node_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.StatusReply:
        return await self._run(self._status)

    # ---- proof that backups are real -------------------------------------------------

    def scrub_status(self) -> node_pb2.ScrubStatus:
        assert self.scrubber is not None
        st = self.scrubber.state
        now_ms = time.time() * 1000
        return node_pb2.ScrubStatus(
            running=st.running, pass_chunks=st.pass_chunks,
            total_chunks=self.store.chunks.count(),
            pass_started_age_s=(now_ms - st.pass_started_ms) / 1000 if st.running else 0.0,
            last_pass_completed_age_s=((now_ms - st.last_pass_completed_ms) / 1000
                                       if st.last_pass_completed_ms else -1.0),
            chunks_verified=st.chunks_verified, bytes_verified=st.bytes_verified,
            corrupt_found=st.corrupt_found, repaired=st.repaired,
            unrepairable=list(st.unrepairable.values()),
            rate_mb_s=self.scrubber.rate_bytes_s / 1e6, interval_s=self.scrubber.interval_s,
            overdue=self.scrubber.overdue(int(now_ms)), node=self.node_id)

    async def Scrub(self, request: node_pb2.ScrubRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.ScrubStatus:
        if self.scrubber is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node has no scrubber")
        assert self.scrubber is not None
        if request.now:
            self.scrubber.request_pass()
            await self._audit("scrub", "ok", detail="a pass requested now")
        return await self._run(self.scrub_status)

    def gc_status(self) -> node_pb2.GcStatus:
        assert self.gc is not None
        st, cfg = self.gc.state, self.gc.cfg
        totals = self.gc.totals()
        now_ms = time.time() * 1000
        return node_pb2.GcStatus(
            running=st.running, reclaimable_bytes=totals["reclaimable_bytes"],
            reclaimed_bytes=st.reclaimed_bytes, dead_bytes=totals["dead_bytes"],
            loose_chunks=totals["loose_chunks"], loose_bytes=totals["loose_bytes"],
            pack_bytes=totals["pack_bytes"], packs=totals["packs"],
            pass_packs_done=st.pass_packs_done, pass_packs_total=len(st.pass_packs),
            pass_bytes_moved=st.pass_bytes_moved,
            last_pass_completed_age_s=((now_ms - st.last_pass_completed_ms) / 1000
                                       if st.last_pass_completed_ms else -1.0),
            rate_mb_s=cfg.rate_mb_s, interval_s=cfg.interval_s,
            chunks_reclaimed=st.chunks_reclaimed, packs_compacted=st.packs_compacted,
            node=self.node_id, loose_grace_s=cfg.loose_grace_s,
            studies_deleted=self.store.catalog.expiry.deleted_count())

    async def Gc(self, request: node_pb2.GcRequest,
                 context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.GcStatus:
        if self.gc is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node has no collector")
        assert self.gc is not None
        if request.now:
            self.gc.request_pass()
            await self._audit("gc", "ok", detail="a pass requested now")
        return await self._run(self.gc_status)

    async def Retention(self, request: node_pb2.RetentionRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.RetentionReply:
        desk = await self._desk(context)
        try:
            reply = await self._run(desk.report, request.study_uid)
        except Refused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._audit("retention", "ok", request.study_uid, detail=reply.state)
        return reply

    async def Hold(self, request: node_pb2.HoldRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.RetentionReply:
        desk = await self._desk(context)
        return await self._lifecycle("hold", desk.hold, request, context)

    async def Release(self, request: node_pb2.HoldRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.RetentionReply:
        desk = await self._desk(context)
        return await self._lifecycle("release", desk.release, request, context)

    async def Delete(self, request: node_pb2.HoldRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.RetentionReply:
        desk = await self._desk(context)
        return await self._lifecycle("delete", desk.request_delete, request, context)

    async def _desk(self, context: grpc.aio.ServicerContext[Any, Any]) -> RetentionDesk:
        if self.desk is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node keeps no retention")
        assert self.desk is not None
        return self.desk

    async def _lifecycle(self, action: str,
                         fn: Callable[[str, str, str], node_pb2.RetentionReply],
                         request: node_pb2.HoldRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.RetentionReply:
        """A hold, release or deletion request: done and audited, or refused and audited
        with the reason (the study is never touched by a refused one)."""
        if not request.reason.strip():
            await self._audit(action, "refused", request.study_uid, detail="no reason given")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{action} needs --reason: say why, for the audit trail")
        try:
            reply = await self._run(fn, request.study_uid, request.reason, CALLER.get().who)
        except Refused as exc:
            await self._audit(action, "refused", request.study_uid, detail=str(exc))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        await self._audit(action, "ok", request.study_uid, detail=request.reason)
        return reply

    async def Drill(self, request: node_pb2.DrillRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.DrillReply:
        if self.drill is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "restore drills need peers: this node has none")
        assert self.drill is not None
        count = max(1, min(request.count or 1, DRILL_COUNT_MAX))
        results = await self.drill(count)
        for r in results:
            await self._audit("drill", "ok" if r.ok else "failed", r.study_uid, r.instances,
                              f"from {r.source_node}" + (f": {r.error}" if r.error else ""))
        if not results:
            await self._audit("drill", "failed", detail="no study could be drilled")
        return node_pb2.DrillReply(results=results)

    async def Audit(self, request: node_pb2.AuditRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.AuditReply:
        if self.audit is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node keeps no audit trail")
        assert self.audit is not None
        if request.study_uid and (problem := uid_problem(request.study_uid)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"study UID {problem}")
        events, after = await self._run(self.audit.read, request.since_s, request.study_uid,
                                        request.limit or AUDIT_PAGE_DEFAULT, request.after)
        await self._audit("audit", "ok", request.study_uid, detail=f"{len(events)} events read")
        return node_pb2.AuditReply(next=after, events=[node_pb2.AuditEvent(
            time=e.time, who=e.who, role=e.role, address=e.address, action=e.action,
            study_uid=e.study_uid, instances=e.instances, outcome=e.outcome, detail=e.detail)
            for e in events])
