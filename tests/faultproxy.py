"""A user-space fault proxy between real node processes (netem is not available here).

Every node advertises a proxy port instead of its own: all peer traffic to node B
enters B's listener here and is forwarded to B's real port. The proxy tells which
node opened a connection by finding the process that owns its client socket
(/proc/net/tcp and the registered pids' fds), so faults apply per directed pair
of sites even though every node shares 127.0.0.1:

* partitions between groups of sites, either as a black hole (bytes are held, as
  a dead route holds packets; they flow again when the partition heals, as TCP
  retransmission would deliver them) or as resets (every connection across the
  cut is reset, and new ones are refused);
* slow links: added one-way delay and a byte-rate throttle per direction;
* lossy links: connections across the link reset at random (a rate per second).

Clients (the CLI, tests) talk to nodes' real ports directly, so they never pass
through here: a site's own modality is not across the WAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 64 * 1024
QUEUE_CHUNKS = 64  # read ahead of a slow writer, at most (4 MiB a direction)
POLL_S = 0.05  # how often a held (black-holed) connection looks again
CHAOS_TICK_S = 0.25


@dataclass
class LinkFault:
    """What one direction of the link src -> dst suffers (bytes from src to dst)."""

    delay_s: float = 0.0
    rate_bytes_s: float = 0.0  # 0 = unlimited
    resets_per_s: float = 0.0  # chance rate of a connection across the link being reset

    @property
    def clean(self) -> bool:
        return not (self.delay_s or self.rate_bytes_s or self.resets_per_s)


@dataclass
class _Bucket:
    """A token bucket shared by every connection on one direction of a link."""

    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)

    async def take(self, n: int, rate: Callable[[], float]) -> None:
        while True:
            r = rate()
            if r <= 0:
                return
            now = time.monotonic()
            self.tokens = min(r, self.tokens + (now - self.at) * r)  # at most 1 s of burst
            self.at = now
            if self.tokens >= n or self.tokens >= r:  # a chunk larger than a second's worth
                self.tokens -= n
                return
            await asyncio.sleep(min(0.25, (min(n, r) - self.tokens) / r))


@dataclass(eq=False)
class _Conn:
    src: str | None  # None: not a node (never faulted)
    dst: str
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    closed: bool = False


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, not a FIN: what a peer sees when a middlebox drops state."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _socket_inode(client_port: int, server_port: int) -> str | None:
    """The inode of the client end of the connection 127.0.0.1:client -> :server."""
    # gRPC's sockets are dual-stack: 127.0.0.1 shows as ::ffff:127.0.0.1 in tcp6
    for table, ip in (("tcp", "0100007F"), ("tcp6", "0000000000000000FFFF00000100007F")):
        want_local, want_remote = f"{ip}:{client_port:04X}", f"{ip}:{server_port:04X}"
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[2] == want_remote:
                    return parts[9]
    return None


def _owner(inode: str, pids: dict[str, int]) -> str | None:
    target = f"socket:[{inode}]"
    for name, pid in list(pids.items()):
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        return name
    return None


class FaultProxy:
    """One listener per node; all of them run on one asyncio loop in a daemon thread."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faultproxy",
                                        daemon=True)
        self._thread.start()
        self.targets: dict[str, int] = {}  # node -> its real port
        self.ports: dict[str, int] = {}  # node -> the proxy port it advertises
        self.pids: dict[str, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self.conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cut: set[frozenset[str]] = set()  # pairs that cannot talk
        self.cut_mode = "blackhole"
        self.links: dict[tuple[str, str], LinkFault] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.stats = {"connections": 0, "unidentified": 0, "resets": 0, "refused": 0}
        self._chaos = asyncio.run_coroutine_threadsafe(self._chaos_loop(), self.loop)

    # ---- control, from any thread -------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def add_node(self, name: str, target_port: int) -> int:
        """Listens for ``name`` and returns the port it should advertise (``target_port``
        may be set later in ``targets``)."""
        async def listen() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._spawn(self._accept(name, r, w)), "127.0.0.1", 0)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        port = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        self.targets[name] = target_port
        self.ports[name] = port
        return port

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def set_pid(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def partition(self, groups: Iterable[Iterable[str]], mode: str = "blackhole") -> None:
        """No traffic between sites of different groups until ``heal_partition``."""
        assert mode in ("blackhole", "reset"), mode
        sets = [set(g) for g in groups]
        cut = {frozenset((a, b)) for i, ga in enumerate(sets) for gb in sets[i + 1:]
               for a in ga for b in gb}

        def apply() -> None:
            self.cut, self.cut_mode = cut, mode
            if mode == "reset":
                for c in list(self.conns):
                    if self._blocked(c):
                        self._kill(c)
        self._call(apply)

    def heal_partition(self) -> None:
        def apply() -> None:
            self.cut = set()
        self._call(apply)

    def shape(self, src: str, dst: str, fault: LinkFault) -> None:
        """Bytes from ``src`` to ``dst`` suffer ``fault`` (one direction)."""
        def apply() -> None:
            if fault.clean:
                self.links.pop((src, dst), None)
            else:
                self.links[(src, dst)] = fault
        self._call(apply)

    def clear_links(self) -> None:
        self._call(self.links.clear)

    def heal_all(self) -> None:
        self.heal_partition()
        self.clear_links()

    def close(self) -> None:
        async def stop() -> None:
            self._chaos.cancel()
            for s in self._servers:
                s.close()
            for c in list(self.conns):
                self._kill(c)
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # ---- the data path, on the loop ------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task held here until done: asyncio.streams drops its reference to a handler
        task when the transport closes, and a pending task without one is destroyed
        mid-await, leaving the other end of its connection open forever."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _blocked(self, c: _Conn) -> bool:
        return c.src is not None and frozenset((c.src, c.dst)) in self.cut

    def _kill(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        self.stats["resets"] += 1
        for w in c.writers:
            _abort(w)
        self.conns.discard(c)

    async def _identify(self, client_port: int, server_port: int) -> str | None:
        def look() -> str | None:
            inode = _socket_inode(client_port, server_port)
            return None if inode is None else _owner(inode, self.pids)
        return await asyncio.get_running_loop().run_in_executor(None, look)

    async def _accept(self, name: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        client_port = int(writer.get_extra_info("peername")[1])
        server_port = int(writer.get_extra_info("sockname")[1])
        src = await self._identify(client_port, server_port)
        self.stats["connections"] += 1
        if src is None:
            self.stats["unidentified"] += 1
        c = _Conn(src, name, [writer])
        if self._blocked(c) and self.cut_mode == "reset":
            self.stats["refused"] += 1
            _abort(writer)
            return
        self.conns.add(c)
        while self._blocked(c) and not c.closed:  # a SYN into a black hole: wait it out
            await asyncio.sleep(POLL_S)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.targets[name])
        except OSError:
            self.conns.discard(c)
            c.closed = True
            _abort(writer)  # the node is down: refused, as without a proxy
            return
        c.writers.append(up_writer)
        if c.closed:
            _abort(up_writer)
            return
        await asyncio.gather(self._pump(c, reader, up_writer, c.src, name),
                             self._pump(c, up_reader, writer, name, c.src),
                             return_exceptions=True)
        if not c.closed:
            c.closed = True
            self.conns.discard(c)
            for w in c.writers:
                with contextlib.suppress(Exception):
                    w.close()

    async def _pump(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    src: str | None, dst: str | None) -> None:
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        key = (src, dst) if src is not None and dst is not None else None

        async def read_side() -> None:
            try:
                while not c.closed:
                    data = await reader.read(CHUNK)
                    await q.put((time.monotonic(), data))
                    if not data:
                        return
            except (OSError, asyncio.IncompleteReadError):
                await q.put((time.monotonic(), b""))

        async def write_side() -> None:
            while True:
                at, data = await q.get()
                while self._blocked(c) and not c.closed:
                    await asyncio.sleep(POLL_S)
                if c.closed:
                    return
                fault = self.links.get(key) if key else None
                if fault is not None and fault.delay_s:
                    wait = at + fault.delay_s - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if data and key is not None and key in self.links:
                    bucket = self._buckets.setdefault(key, _Bucket())
                    await bucket.take(len(data), lambda: self._rate(key))
                if c.closed:
                    return
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        reading = asyncio.ensure_future(read_side())
        try:
            await write_side()
        except (OSError, ConnectionError, RuntimeError):
            self._kill(c)
        finally:
            if c.closed:
                reading.cancel()
            with contextlib.suppress(BaseException):
                await reading

    def _rate(self, key: tuple[str, str]) -> float:
        fault = self.links.get(key)
        return fault.rate_bytes_s if fault is not None else 0.0

    async def _chaos_loop(self) -> None:
        while True:
            await asyncio.sleep(CHAOS_TICK_S)
            for c in list(self.conns):
                if c.src is None:
                    continue
                rate = max((f.resets_per_s for f in (self.links.get((c.src, c.dst)),
                                                     self.links.get((c.dst, c.src))) if f),
                           default=0.0)
                if rate and self.rng.random() < rate * CHAOS_TICK_S:
                    self._kill(c)

    def describe(self) -> dict[str, Any]:
        return {"cut": sorted("|".join(sorted(p)) for p in self.cut), "mode": self.cut_mode,
                "links": {f"{a}->{b}": vars(f) for (a, b), f in self.links.items()},
                **self.stats}
