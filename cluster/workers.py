"""The thin runtime workers: each drives one sans-IO machine over gRPC and disk.

    announce     AnnounceQueue -> Announce to every alive peer
    fetch        FetchPlanner -> pull chunks, verify, commit (cluster/transfer.py)
    antientropy  SyncRound with a random peer -> accept the manifests it gives
    holdings     HoldingsRound with every alive peer -> our cache of their holdings
    trim         TrimPlanner and TrimRound -> drop copies we need not hold

The decisions are the machines'; the simulation (tests/sim) drives the same
machines, so what it proves is about this code. Disk reads of the machines run
in the thread pool; network calls on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import grpc

from pacsmesh.cluster import wire
from pacsmesh.cluster.antientropy import SyncRound
from pacsmesh.cluster.holdings import HoldingsRound
from pacsmesh.cluster.messages import (
    HeldRootGive,
    Request,
    StudyHoldingAsk,
    StudyHoldingGive,
    approx_size,
)
from pacsmesh.cluster.peers import RPC_TIMEOUT_S
from pacsmesh.cluster.transfer import BATCH_THREADS, Replicator
from pacsmesh.cluster.trim import (
    RETRY_INTERVALS,
    STUDIES_PER_STEP_MAX,
    TrimCase,
    TrimPlanner,
    TrimRound,
    eligible,
)
from pacsmesh.node.alerts import DISK_REFUSE_REPLICAS_FRACTION
from pacsmesh.node.catalog import partition_of
from pacsmesh.node.logsetup import Tally, n_studies
from pacsmesh.node.worker import Worker, WorkerState
from pacsmesh.proto import node_pb2, peer_pb2

LOGGER = logging.getLogger(__name__)
HELD_DELTA_MAX = 1000  # studies per pushed delta (~80 KB)
HELD_DELTA_IDLE_S = 1.0  # with no news, look again this often
HELD_DELTA_COALESCE_S = 0.05
AUDIT_CANDIDATES = 32  # claimed studies looked at per proof audit
FETCH_BATCHES_IN_FLIGHT = BATCH_THREADS


class AnnounceWorker(Worker):
    name = "announce"
    idle_s = 0.2

    def __init__(self, r: Replicator) -> None:
        self.r = r

    async def step(self) -> WorkerState:
        if not len(self.r.announce):
            self.r.wakeup.clear()
            await self.wait_news(self.r.wakeup, 1.0)
            if not self.r.wakeup.is_set():
                return WorkerState.IDLE
        batch = self.r.announce.next_batch()
        if not batch:
            return WorkerState.IDLE
        msg = peer_pb2.ManifestBatch(manifests=batch, sender=self.r.node_id,
                                     sender_address=self.r.address)
        peers = self.r.state.snapshot.alive_peers(self.r.node_id)
        await asyncio.gather(*(self._send(p.address, msg) for p in peers))
        return WorkerState.BUSY

    async def _send(self, address: str, msg: peer_pb2.ManifestBatch) -> None:
        try:
            await self.r.peers.stub(address).Announce(msg, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # anti-entropy will deliver it later
            LOGGER.info("announce to %s failed: %s", address, exc.code().name)


class FetchWorker(Worker):
    """Keeps up to FETCH_BATCHES_IN_FLIGHT fetch batches going: while one commits or
    waits on a slow link, the next is already on the wire (and a feeder is always
    drawing the batch its partners are asking it for)."""

    name = "fetch"
    idle_s = 1.0

    def __init__(self, r: Replicator) -> None:
        self.r = r
        self._refusing = False
        self._tasks: set[asyncio.Task[tuple[int, int]]] = set()
        self._short = False  # a finished batch left chunks nowhere to be found

    async def step(self) -> WorkerState:
        try:
            return await self._step()
        except asyncio.CancelledError:
            for task in self._tasks:
                task.cancel()
            raise

    async def _step(self) -> WorkerState:
        r = self.r
        self._say()
        self._reap()
        full = await r._run(r.store.used_fraction)
        if full >= DISK_REFUSE_REPLICAS_FRACTION:  # local ingest keeps the rest of the disk
            if not self._refusing:
                LOGGER.error("storage %.0f %% used: refusing new replicas", full * 100)
            self._refusing = True
            return WorkerState.THROTTLED
        self._refusing = False
        if len(self._tasks) >= FETCH_BATCHES_IN_FLIGHT:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            return self._after_reap()
        wanted = await r._run(self._plan)
        if not wanted:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.idle_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                return self._after_reap()
            r.wakeup.clear()
            await self.wait_news(r.wakeup, self.idle_s)  # announcements wake us early
            return WorkerState.BUSY if r.planner.fresh else self._after_reap(idle=True)
        task = asyncio.create_task(self._fetch(wanted))
        self._tasks.add(task)
        return WorkerState.BUSY

    def _say(self) -> None:
        """Copies made here because placement changed: a line per interval at most."""
        got = self.r.moved_here.take(time.monotonic())
        if got is None:
            return
        change = self.r.state.placement_changed
        why = (f"repair: {', '.join(change.gone)} gone" if change.gone
               else f"rebalance: {', '.join(change.joined)} joined" if change.joined
               else "rebalance: placement weights changed")
        LOGGER.info("%s; %s instances copied here (first study: %s); fetched from %s", why,
                    f"{got.count:,}", got.first, got.sources("bytes") or "nobody")

    def _reap(self) -> None:
        for task in [t for t in self._tasks if t.done()]:
            self._tasks.discard(task)
            if task.cancelled():
                continue
            if task.exception() is not None:
                LOGGER.error("a fetch batch failed: %r", task.exception())
                self._short = True
                continue
            held, asked = task.result()
            self._short |= held < asked

    def _after_reap(self, idle: bool = False) -> WorkerState:
        self._reap()
        short, self._short = self._short, False
        if short and not self.r.planner.busy() and not self._tasks:
            return WorkerState.THROTTLED  # some chunks are nowhere yet: back off
        return WorkerState.IDLE if idle else WorkerState.BUSY

    async def _fetch(self, wanted: list[tuple[bytes, bytes, node_pb2.Manifest]]
                     ) -> tuple[int, int]:
        mids = [mid for mid, _, _ in wanted]
        try:
            held = await asyncio.get_running_loop().run_in_executor(
                self.r.batch_pool, self.r.fetch_batch, wanted)
        finally:
            self.r.inflight.difference_update(mids)
        return held, len(wanted)

    def _plan(self) -> list[tuple[bytes, bytes, node_pb2.Manifest]]:
        out = []
        for c in self.r.planner.plan(self.r, time.monotonic()):
            got = self.r.store.catalog.get(c.mid)
            if got is not None:
                out.append((c.mid, got[0], got[1]))
        self.r.inflight.update(mid for mid, _, _ in out)
        return out


class AntiEntropyWorker(Worker):
    name = "antientropy"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s
        self.rounds = 0
        self.last_bytes = 0  # received in the last round, for the benchmark
        self._rotate = 0

    async def step(self) -> WorkerState:
        peers = self.r.state.snapshot.alive_peers(self.r.node_id)
        if not peers:
            return WorkerState.IDLE
        peer = random.choice(peers)
        try:
            pulled = await self.sync_with(peer.address)
        except grpc.aio.AioRpcError as exc:
            LOGGER.info("anti-entropy with %s failed: %s", peer.node_id, exc.code().name)
            return WorkerState.IDLE
        self.rounds += 1
        if pulled:
            LOGGER.info("anti-entropy with %s: pulled %d manifests", peer.node_id, pulled)
            return WorkerState.BUSY  # more may differ: the next round now, not in idle_s
        return WorkerState.IDLE

    async def sync_with(self, address: str) -> int:
        """One round against one peer; returns how many manifests were new here."""
        r = self.r
        stub = r.peers.stub(address)
        self._rotate += 1
        machine: SyncRound[bytes] = SyncRound(r, address, first_partition=self._rotate * 7919)
        request: Request | None = machine.start()
        received = new = 0
        while request is not None:
            reply = await wire.call(stub, request, RPC_TIMEOUT_S)
            received += approx_size(reply)
            manifests, request = await r._run(machine.on_reply, reply)
            if manifests:
                new += await r._run(r.accept_manifests, list(manifests), address)
        self.last_bytes = received
        if new:
            r.wakeup.set()
        return new


class HeldDeltaWorker(Worker):
    """Pushes what changed in our holdings to every alive peer, a batch at a time, so
    their caches follow without re-reading a partition."""

    name = "held-delta"
    idle_s = 0.0  # step waits for news itself
    cancel_on_stop = True  # (a lost push is caught up by the digest comparison)

    def __init__(self, r: Replicator) -> None:
        self.r = r

    async def step(self) -> WorkerState:
        r = self.r
        await r.held_news(timeout_s=HELD_DELTA_IDLE_S)
        # news coalesce for a moment: an ingest of hundreds of instances a second is a
        # few pushes, not one per instance
        await asyncio.sleep(HELD_DELTA_COALESCE_S)
        studies = await r._run(r.take_held_delta, HELD_DELTA_MAX)
        if not studies:
            return WorkerState.BUSY  # (held_news did the waiting)
        msg = peer_pb2.HeldDelta(node_id=r.node_id, studies=studies)
        peers = r.state.snapshot.alive_peers(r.node_id)
        await asyncio.gather(*(self._send(p.address, msg) for p in peers))
        return WorkerState.BUSY

    async def _send(self, address: str, msg: peer_pb2.HeldDelta) -> None:
        try:
            await self.r.peers.stub(address).PushHeld(msg, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # the digest comparison catches it up
            LOGGER.debug("held delta to %s: %s", address, exc.code().name)


class HoldingsWorker(Worker):
    """Keeps our cache of every alive peer's holdings equal to theirs, by digests.
    Each peer's round runs on its own: a slow peer delays only its own news."""

    name = "holdings"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s
        self._rounds: dict[str, asyncio.Task[None]] = {}

    async def step(self) -> WorkerState:
        for p in self.r.state.snapshot.alive_peers(self.r.node_id):
            if p.node_id not in self._rounds:
                self._rounds[p.node_id] = asyncio.create_task(self._one(p.node_id, p.address))
        return WorkerState.IDLE

    async def _one(self, node_id: str, address: str) -> None:
        r = self.r
        machine = HoldingsRound(r.holdings, node_id)
        request: Any = machine.start()
        stub = r.peers.stub(address)
        try:
            while request is not None:
                reply = await wire.call(stub, request, RPC_TIMEOUT_S)
                if isinstance(reply, HeldRootGive):  # copy on write: API threads read it
                    r.reports = {**r.reports, node_id: reply}
                replace, request = await r._run(machine.on_reply, reply)
                if replace is not None:
                    changed = await r._run(r.holdings.replace, replace.peer, replace.partition,
                                           list(replace.studies))
                    for callback in r.on_holdings_changed:
                        callback(node_id, [replace.partition], changed)
        except grpc.aio.AioRpcError as exc:
            LOGGER.debug("holdings of %s: %s", node_id, exc.code().name)
        except Exception:  # a task of its own: nobody else would see it
            LOGGER.exception("holdings round with %s failed", node_id)
        finally:
            self._rounds.pop(node_id, None)


class TrimWorker(Worker):
    name = "trim"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s
        self.planner = TrimPlanner(RETRY_INTERVALS * interval_s)
        self.trimmed = Tally()  # studies (and their manifests) no longer held here

    def on_placement_change(self) -> None:
        """Partitions placed elsewhere now where we hold something: worth a look."""
        mine = self.r.my_partitions()
        held = self.r.store.catalog.held_partition_digests()
        self.planner.enqueue(p for p, (_, n) in enumerate(held) if n and p not in mine)

    def on_holdings_changed(self, peer: str, partitions: list[int], studies: set[str]) -> None:
        """A peer's holdings changed where we hold copies placed elsewhere: look again."""
        mine = self.r.my_partitions()
        catalog = self.r.store.catalog
        self.planner.enqueue(p for p in partitions
                             if p not in mine and catalog.held_in_partition(p))

    async def step(self) -> WorkerState:
        r = self.r
        if got := self.trimmed.take(time.monotonic()):
            LOGGER.info("trimmed %s (%s instances' extra copies dropped here; first: %s): "
                        "their replica sets hold %d verified copies each",
                        n_studies(got.count), f"{got.items:,}", got.first, r.state.copies)
        if r.state.snapshot.table is None:
            return WorkerState.IDLE
        partition = self.planner.next(time.monotonic())
        if partition is None:
            return WorkerState.IDLE
        after = self.planner.cursor.pop(partition, "")
        cases, last, more = await r._run(self._cases, partition, after)
        undecided = False
        for case in cases:
            undecided |= not await self._maybe_trim(case)
        if more:  # the rest of this partition next step
            self.planner.cursor[partition] = last
            self.planner.enqueue([partition])
        elif undecided:
            self.planner.retry_later(partition, time.monotonic())
        return WorkerState.BUSY

    def _cases(self, partition: int, after: str) -> tuple[list[TrimCase], str, bool]:
        catalog = self.r.store.catalog
        recs = catalog.partition_study_page(partition, after, STUDIES_PER_STEP_MAX,
                                            held_only=True)
        out = []
        for rec in recs:
            if rec.held_instances == 0:
                continue
            current = catalog.current_manifests(rec.study_uid)
            out.append(TrimCase(
                rec.study_uid, rec.instances, rec.current_digest, rec.all_digest,
                tuple(catalog.study_manifest_ids(rec.study_uid)),
                any(m.origin_node == self.r.node_id for _, _, m in current)))
        last = recs[-1].study_uid if recs else after
        return out, last, len(recs) >= STUDIES_PER_STEP_MAX

    async def _maybe_trim(self, case: TrimCase) -> bool:
        """False when the decision could not be made (ask again later)."""
        r = self.r
        placement = r.state.placement(case.study_uid)
        snap = r.state.snapshot
        if placement is None:
            return False
        addresses = {m.node_id: m.address for m in snap.alive_peers(r.node_id)}
        if case.origin_here or r.node_id in placement.replicas:
            return True  # nothing to decide: we keep it
        if not eligible(r.node_id, case, placement.replicas, addresses):
            return False
        challenges = await r._run(r.challenge, case.study_uid, placement.replicas)
        if challenges is None:
            return False
        machine = TrimRound(r.node_id, case, placement.replicas, r.positions(),
                            r.state.copies, r.state.min_distance_miles, challenges)
        step: Any = machine.start()
        while not isinstance(step, bool):  # ask now: trimming on stale news is how data dies
            node_id, ask = step
            try:
                reply = await wire.call(r.peers.stub(addresses[node_id]), ask, RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return False
            step = machine.on_reply(reply)
        for liar in machine.failed_proofs:
            r.note_failed_proof(liar, case.study_uid)
        if not step:
            return False
        # Only what the answers covered, and only if nothing reached the study meanwhile
        # (an instance stored here while we asked may be its only copy).
        dropped = await r._run(r.store.unhold_unchanged, case.study_uid, case.all_digest,
                               list(case.mids))
        if dropped is None:
            return False
        r.trimmed_studies += 1
        r.held_changed({case.study_uid})
        self.trimmed.add(case.study_uid, 1, dropped)
        LOGGER.debug("trimmed (%d manifests): the replica set %s holds %d verified copies",
                     dropped, ",".join(placement.replicas), r.state.copies,
                     extra={"study": case.study_uid})
        return True


class ProofAuditWorker(Worker):
    """Now and then, asks a random peer to prove it holds a random study it claims.

    Holdings are a peer's own word; a member with a valid certificate could claim
    copies it never stored, and status would count them. A claim of a full copy
    that fails a proof of possession marks the peer as holding nothing (for status,
    safety and trims) and raises PROOF_FAILED. Only full copies equal to ours are
    checked: a partial or different copy is not evidence of a lie."""

    name = "proof-audit"

    def __init__(self, r: Replicator, interval_s: float) -> None:
        self.r = r
        self.idle_s = interval_s
        self.audits = 0

    async def step(self) -> WorkerState:
        r = self.r
        peers = r.state.snapshot.alive_peers(r.node_id)
        if not peers:
            return WorkerState.IDLE
        peer = random.choice(peers)
        study = await r._run(self._pick, peer.node_id)
        if study is None:
            return WorkerState.IDLE
        challenges = await r._run(r.challenge, study, [peer.node_id])
        if challenges is None:
            return WorkerState.IDLE
        c = challenges[peer.node_id]
        try:
            reply = await wire.call(r.peers.stub(peer.address),
                                    StudyHoldingAsk(study, c.nonce, c.chunks), RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return WorkerState.IDLE  # unreachable is the failure detector's business
        self.audits += 1
        rec = await r._run(r.store.catalog.study_record, study)
        if (not isinstance(reply, StudyHoldingGive) or rec is None or reply.held_instances == 0
                or reply.held_digest != rec.current_digest):
            return WorkerState.IDLE  # the claim changed meanwhile: inconclusive
        if reply.proofs != c.expected or reply.node_id != peer.node_id:
            r.note_failed_proof(peer.node_id, study)
        return WorkerState.IDLE

    def _pick(self, peer: str) -> str | None:
        """A study the peer claims in full, as we hold it too: from a random place."""
        catalog = self.r.store.catalog
        start = peer.encode() + b"\0" + random.randbytes(4)
        studies, _ = self.r.holdings.studies_of(peer, start, AUDIT_CANDIDATES)
        if not studies:
            studies, _ = self.r.holdings.studies_of(peer, b"", AUDIT_CANDIDATES)
        random.shuffle(studies)
        for study in studies:
            rec = catalog.study_record(study)
            if rec is None or rec.held_instances != rec.instances or rec.instances == 0:
                continue
            partition = partition_of(study, catalog.partitions)
            for h in self.r.holdings.for_study(study, partition, [peer]):
                if h.held_instances == rec.instances and h.held_digest == rec.current_digest:
                    return study
        return None
