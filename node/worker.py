"""Background workers: every loop of a node (gossip, anti-entropy, repair, scrub)
is a Worker whose state the CLI can list, and one Runner owns their shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass

LOGGER = logging.getLogger(__name__)
ERROR_BACKOFF_S = 5.0  # a failing worker retries, but never in a tight loop


class WorkerState(enum.StrEnum):
    BUSY = "busy"
    THROTTLED = "throttled"
    IDLE = "idle"
    DONE = "done"


@dataclass
class WorkerInfo:
    name: str
    state: WorkerState
    last_error: str = ""
    errors: int = 0
    last_step_at: float = 0.0


class Worker:
    """Subclasses implement `step`, which does one bounded unit of work and says what
    to do next: BUSY (call again now), IDLE (sleep `idle_s`), DONE (stop)."""

    name = "worker"
    idle_s = 1.0
    # True for a worker whose step waits by itself (for news) and holds nothing a
    # cancel could leave half done: at stop it is cancelled instead of waited for
    cancel_on_stop = False
    stopping: asyncio.Event | None = None  # the runner's, set when it starts the worker

    async def wait_news(self, event: asyncio.Event, timeout_s: float) -> None:
        """Until `event` is set, the runner stops, or `timeout_s` passes: a step that
        waits for news itself must not hold up a node's shutdown for its timeout."""
        waits = [asyncio.ensure_future(event.wait())]
        if self.stopping is not None:
            waits.append(asyncio.ensure_future(self.stopping.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def step(self) -> WorkerState:
        raise NotImplementedError


class Runner:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.info: dict[str, WorkerInfo] = {}
        self._stopping = asyncio.Event()
        self._workers: dict[str, Worker] = {}

    def start(self, worker: Worker) -> None:
        self.info[worker.name] = WorkerInfo(worker.name, WorkerState.IDLE)
        self._workers[worker.name] = worker
        worker.stopping = self._stopping
        self._tasks[worker.name] = asyncio.create_task(self._loop(worker), name=worker.name)

    async def _loop(self, worker: Worker) -> None:
        info = self.info[worker.name]
        while not self._stopping.is_set():
            try:
                state = await worker.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                info.errors += 1
                info.last_error = f"{type(exc).__name__}: {exc}"
                LOGGER.exception("worker %s failed", worker.name)
                state = WorkerState.THROTTLED
            info.state, info.last_step_at = state, time.time()
            if state is WorkerState.DONE:
                return
            delay = {WorkerState.BUSY: 0.0, WorkerState.IDLE: worker.idle_s,
                     WorkerState.THROTTLED: ERROR_BACKOFF_S}[state]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if not self._tasks:
            return
        for name, task in self._tasks.items():
            if self._workers[name].cancel_on_stop:
                task.cancel()
        _, pending = await asyncio.wait(self._tasks.values(), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
