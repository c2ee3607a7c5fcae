"""A bounded LRU of read-only file descriptors that many threads pread through.

Sharing a descriptor between preads is safe; closing one is not: the next open
anywhere in the process may get the same number, and a pread still in flight
on the old number would then read another file. So a descriptor is closed only
when no thread has it checked out. `borrow` counts users; eviction closes the
least recently used idle descriptor; a borrower that finds every slot busy
waits for one. Each thread holds at most one descriptor at a time (one pread),
so the wait cannot deadlock, and at most `fds_max` descriptors are ever open.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Slot:
    __slots__ = ("dropped", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 1
        self.dropped = False  # out of the cache: closed when its last user leaves


class ReadFds:
    def __init__(self, open_fd: Callable[[int], int], fds_max: int) -> None:
        if fds_max < 1:
            raise ValueError(f"fds_max must be at least 1, not {fds_max}")
        self._open_fd = open_fd
        self.fds_max = fds_max
        self._cond = threading.Condition()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # least recently used first
        self._open = 0  # cached, dropped-but-busy, or being opened: never above fds_max

    def open_count(self) -> int:
        with self._cond:
            return self._open

    @contextmanager
    def borrow(self, key: int) -> Iterator[int]:
        """A descriptor for `key`, open until the block ends. Opening errors propagate."""
        slot = self._checkout(key)
        try:
            yield slot.fd
        finally:
            self._release(slot)

    def discard(self, key: int, fd: int) -> None:
        """Never hand out this descriptor again (its file was deleted); a borrower of it
        keeps it until its block ends, the last one closes it."""
        with self._cond:
            slot = self._slots.get(key)
            if slot is not None and slot.fd == fd:
                del self._slots[key]
                slot.dropped = True

    def drop(self, key: int) -> None:
        """Forget `key`'s descriptor (its file is about to be removed): closed now if
        idle, else when its last borrower leaves."""
        with self._cond:
            slot = self._slots.pop(key, None)
            if slot is None:
                return
            if slot.users == 0:
                self._close(slot)
                self._cond.notify_all()
            else:
                slot.dropped = True

    def close(self) -> None:
        """Close every idle descriptor now and every busy one when its user leaves."""
        with self._cond:
            for slot in self._slots.values():
                if slot.users == 0:
                    self._close(slot)
                else:
                    slot.dropped = True
            self._slots.clear()
            self._cond.notify_all()

    def _checkout(self, key: int) -> _Slot:
        with self._cond:
            while True:
                slot = self._slots.get(key)
                if slot is not None:
                    return self._use(key, slot)
                if self._open < self.fds_max or self._evict_idle():
                    break
                self._cond.wait()
            self._open += 1  # reserve the slot; open outside the lock (a cold lookup may seek)
        try:
            fd = self._open_fd(key)
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(fd)
                return slot
            os.close(fd)  # another thread opened it meanwhile: ours was never shared
            self._open -= 1
            self._cond.notify_all()
            return self._use(key, slot)

    def _use(self, key: int, slot: _Slot) -> _Slot:
        slot.users += 1
        self._slots.move_to_end(key)
        return slot

    def _evict_idle(self) -> bool:
        for key, slot in self._slots.items():
            if slot.users == 0:
                del self._slots[key]
                self._close(slot)
                return True
        return False

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            slot.users -= 1
            if slot.users == 0:
                if slot.dropped:
                    self._close(slot)
                self._cond.notify_all()  # an idle or freed slot: a waiter can proceed

    def _close(self, slot: _Slot) -> None:
        os.close(slot.fd)
        self._open -= 1
