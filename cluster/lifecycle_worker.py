"""Drives the lifecycle sync (cluster/lifecycle_sync.py) over gRPC, pushes records made
here to every alive peer at once, and tells the expiry deleter whether it may delete.

Deletion waits unless this node has been up for `settle_s` (dead_after_s: by then
it has heard from the cluster), is among a majority of the members it knows alive
(the smaller side of a split cannot vouch for holds placed on the larger), reaches
a peer if it was given seeds, and the sync confirms its record set equals every
alive peer's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from pacsmesh.cluster.lifecycle_sync import DigestAsk, LifecycleSync, RecordsAsk
from pacsmesh.cluster.peers import Peers
from pacsmesh.cluster.state import ClusterState
from pacsmesh.node.lifecycle import ADD_MAX, LifecycleBook
from pacsmesh.node.worker import Worker, WorkerState
from pacsmesh.proto import peer_pb2

LOGGER = logging.getLogger(__name__)
RPC_TIMEOUT_S = 20.0
# Deleting by date trusts this node's calendar: a node whose clock runs this far ahead
# of a live peer's (a wrong NTP server, a stepped VM) waits rather than delete early.
CLOCK_AHEAD_MAX_S = 86_400.0
T = TypeVar("T")


class LifecycleWorker(Worker):
    name = "lifecycle"

    def __init__(self, book: LifecycleBook, state: ClusterState, peers: Peers, node_id: str,
                 run: Callable[..., Awaitable[Any]], interval_s: float,
                 confirm_within_s: float, settle_s: float = 0.0,
                 has_seeds: bool = False) -> None:
        self.book = book
        self.state = state
        self.peers = peers
        self.node_id = node_id
        self._run = run
        self.sync = LifecycleSync(node_id, interval_s=interval_s,
                                  confirm_within_s=confirm_within_s)
        self.idle_s = min(1.0, interval_s / 2)
        self._outbox: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._news = asyncio.Event()
        # just started, a node knows few members (or none): deletion waits until it
        # has heard from the cluster, and a node told of seeds never counts as alone
        self._settled_at = time.monotonic() + settle_s
        self.has_seeds = has_seeds

    # ---- the worker --------------------------------------------------------------------

    def _alive(self) -> dict[str, str]:
        return {m.node_id: m.address for m in self.state.snapshot.alive_peers(self.node_id)}

    async def step(self) -> WorkerState:
        self._loop = asyncio.get_running_loop()
        alive = self._alive()
        if self._outbox:
            raws, self._outbox = self._outbox, []
            await asyncio.gather(*(self._push(addr, raws) for addr in alive.values()))
        ours = await self._run(self.book.digest)
        asks = self.sync.tick(time.monotonic(), alive, ours)
        if asks:
            await asyncio.gather(*(self._follow(ask, alive[ask.peer]) for ask in asks
                                   if ask.peer in alive))
            return WorkerState.BUSY
        await self.wait_news(self._news, self.idle_s)
        self._news.clear()
        return WorkerState.BUSY

    async def _follow(self, ask: DigestAsk | RecordsAsk, address: str) -> None:
        """One peer's exchange: the digest, then pages of records while they differ."""
        stub = self.peers.stub(address)
        next_asks: list[DigestAsk | RecordsAsk] = [ask]
        while next_asks:
            current = next_asks.pop()
            try:
                if isinstance(current, DigestAsk):
                    got = await stub.GetLifecycleDigest(peer_pb2.LifecycleDigestRequest(),
                                                        timeout=RPC_TIMEOUT_S)
                    ours = await self._run(self.book.digest)
                    next_asks += self.sync.on_digest(time.monotonic(), current.peer,
                                                     (got.digest, got.count), ours)
                else:
                    page = await stub.GetLifecycleRecords(
                        peer_pb2.LifecycleRecordsRequest(after=current.after,
                                                         limit=current.limit),
                        timeout=RPC_TIMEOUT_S)
                    raws, more = self.sync.on_records(time.monotonic(), current.peer,
                                                      list(page.records), page.more)
                    await self.accept(raws, current.peer)
                    next_asks += more
            except grpc.aio.AioRpcError as exc:
                LOGGER.debug("lifecycle sync with %s: %s", current.peer, exc.code().name)
                self.sync.on_failure(time.monotonic(), current.peer)
                return

    async def accept(self, raws: list[bytes], source: str) -> int:
        """Records from a peer (a page or a push) into the book; returns how many were new."""
        added = 0
        for start in range(0, len(raws), ADD_MAX):
            result = await self._run(self.book.add, raws[start:start + ADD_MAX])
            added += len(result.ids)
            for bad in result.rejected[:5]:
                LOGGER.warning("lifecycle record %s from %s refused: %s",
                               bad.record_id.hex()[:16], source, bad.why)
        if added:
            LOGGER.info("lifecycle: %d records (holds, releases, deletion requests) from %s",
                        added, source)
            self.sync.note_local_change(time.monotonic())
        return added

    # ---- pushes of records made here -----------------------------------------------------

    def made(self, raws: list[bytes]) -> None:
        """A hold, release or deletion request made here (any thread): push it now."""
        if self._loop is None:
            self._outbox.extend(raws)
            return
        self._loop.call_soon_threadsafe(self._made, raws)

    def _made(self, raws: list[bytes]) -> None:
        self._outbox.extend(raws)
        self.sync.note_local_change(time.monotonic())
        self._news.set()

    async def _push(self, address: str, raws: list[bytes]) -> None:
        try:
            await self.peers.stub(address).PushLifecycle(peer_pb2.LifecyclePush(records=raws),
                                                         timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # the digest comparison catches it up
            LOGGER.info("lifecycle push to %s: %s", address, exc.code().name)

    # ---- may the deleter delete? ---------------------------------------------------------

    def deletion_blocker(self) -> str:
        """"" when this node knows every hold the live cluster knows; else why not."""
        left = self._settled_at - time.monotonic()
        if left > 0:
            return f"membership is still settling after the start ({left:.0f} s more)"
        members = self.state.snapshot.members
        alive = self._alive()
        if not alive and self.has_seeds:
            return "no peer is reachable to confirm the legal holds it knows"
        if len(members) > 1 and 2 * (len(alive) + 1) <= len(members):
            return (f"only {len(alive) + 1} of {len(members)} members are alive here: the "
                    "smaller side of a split cannot know every legal hold")
        behind = {peer: -skew for peer, skew in self.state.clock_skew_s.items()
                  if peer in alive and -skew > CLOCK_AHEAD_MAX_S}
        if behind:
            peer, ahead = max(behind.items(), key=lambda item: item[1])
            return (f"this node's clock is {ahead / 86400:.1f} days ahead of {peer}'s: "
                    "deleting by date waits until the clocks agree (fix NTP)")
        ours = self.book.digest()
        now = time.monotonic()
        if self.sync.confirmed(now, alive, ours, alone_ok=not alive and not self.has_seeds):
            return ""
        waiting = self.sync.unconfirmed(now, alive, ours)
        return ("holds and deletion requests not yet confirmed equal with "
                + ", ".join(sorted(waiting)[:5]))
