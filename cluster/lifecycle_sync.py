"""Lifecycle record sync, sans-IO: every node learns every hold, release and deletion request.

Lifecycle records are operators' actions, so few: no tree as for manifests. Every
`interval_s` a node asks each alive peer for the digest of its record set (AdHash
and count: node/lifecycle.py); when it differs, it pulls the peer's records whole,
a page at a time, and the book's union keeps what is new. The runtime and the
simulation drive the same object: `tick` gives asks, replies go to `on_digest` and
`on_records`, failures (a deadline passed) to `on_failure`; at most one request per
peer is in flight. One driver calls it (it is not thread-safe). When our book grows
(a push, a pull, a local hold) the caller says so with `note_local_change`, and
every peer is asked again at once, so a change is confirmed (or found to differ)
without waiting a whole interval.

`confirmed` is what the retention deleter asks before it deletes: a node that cannot
show it knows every hold the live cluster knows must not delete. It holds when, for
every alive peer, the latest digest the peer answered equals ours now and was asked
for within `confirm_within_s`. Equal digests of grow-only sets mean equal sets, and a
digest never returns to an earlier value, so an agreement from before our book last
changed cannot count: it was about another set. What it promises: we hold every
record any alive peer held `confirm_within_s` ago. A hold made more recently, at a
peer whose push did not reach us, may not be known yet.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from pacsmesh.node.hashing import content_hash
from pacsmesh.node.lifecycle import PAGE_MAX

LOGGER = logging.getLogger(__name__)
PAGES_PER_ROUND_MAX = 1000  # a round pulls at most this many pages (1M records)

Digest: TypeAlias = tuple[bytes, int]  # AdHash of record ids, record count


@dataclass(frozen=True, slots=True)
class DigestAsk:
    peer: str


@dataclass(frozen=True, slots=True)
class RecordsAsk:
    peer: str
    after: bytes  # record id; b"": from the first
    limit: int


Ask: TypeAlias = DigestAsk | RecordsAsk


@dataclass(slots=True)
class _Peer:
    due_at: float = -math.inf  # the next digest ask may go then
    in_flight: Ask | None = None
    sent_at: float = 0.0
    # the peer's latest digest answer and when we asked for it: the answer describes
    # its set at some moment after that, so asked-at is the conservative age
    seen: tuple[float, Digest] | None = None
    pages: int = 0  # pages of the pull round under way
    resume: bytes = b""  # where the next pull round starts (a round cut short)


class LifecycleSync:
    def __init__(self, my_id: str, interval_s: float = 5.0, confirm_within_s: float = 60.0,
                 timeout_s: float = 60.0, page_limit: int = PAGE_MAX,
                 pages_max: int = PAGES_PER_ROUND_MAX) -> None:
        self.me = my_id
        self.interval_s = interval_s
        self.confirm_within_s = confirm_within_s
        # a backstop: the driver reports failures (gRPC deadlines), but a request it
        # never reports must not silence a peer for good
        self.timeout_s = timeout_s
        self.page_limit = max(1, min(page_limit, PAGE_MAX))
        self.pages_max = max(1, pages_max)
        self._peers: dict[str, _Peer] = {}
        self._ours: Digest | None = None

    # ---- driving -----------------------------------------------------------------------

    def tick(self, now: float, alive_peers: Iterable[str], ours: Digest) -> list[Ask]:
        """Digest asks for the alive peers that are due; forgets peers no longer alive."""
        alive = self._alive(alive_peers)
        for gone in self._peers.keys() - alive:
            del self._peers[gone]
        if ours != self._ours:  # in case the caller did not say so itself
            if self._ours is not None:
                self.note_local_change(now)
            self._ours = ours
        asks: list[Ask] = []
        for peer in sorted(alive):
            st = self._peers.setdefault(peer, _Peer())
            if st.in_flight is not None:
                if now - st.sent_at < self.timeout_s:
                    continue
                LOGGER.warning("lifecycle sync: no answer from %s in %.0f s; asking again",
                               peer, now - st.sent_at)
                self._failed(st)
            if now >= st.due_at:
                st.due_at = now + self.interval_s
                asks.append(self._send(st, DigestAsk(peer), now))
        return asks

    def on_digest(self, now: float, peer: str, theirs: Digest, ours: Digest) -> list[Ask]:
        """A digest answer: equal, nothing to do; different, pull the peer's records."""
        st = self._peers.get(peer)
        if st is None or not isinstance(st.in_flight, DigestAsk):
            return []  # not asked (or forgotten since): ignored
        st.in_flight = None
        st.seen = (st.sent_at, theirs)
        if theirs == ours:
            st.resume = b""
            return []
        if theirs[1] == 0:  # a peer with no records has none for us
            return []
        st.pages = 0
        return [self._send(st, RecordsAsk(peer, st.resume, self.page_limit), now)]

    def on_records(self, now: float, peer: str, raws: Sequence[bytes], more: bool,
                   last_id: bytes | None = None) -> tuple[list[bytes], list[Ask]]:
        """A page of the peer's records: the ones to add to the book, and the next page's
        ask (none: the round is over). `last_id`: the id of the page's last record
        (computed when not given)."""
        st = self._peers.get(peer)
        if st is None or not isinstance(st.in_flight, RecordsAsk):
            return [], []
        asked, st.in_flight = st.in_flight, None
        if len(raws) > asked.limit:
            LOGGER.warning("lifecycle sync: %s answered %d records to an ask for %d; page "
                           "dropped", peer, len(raws), asked.limit)
            return [], []
        st.pages += 1
        page = list(raws)
        if not more or not page:
            st.resume = b""
            return page, []
        last = last_id if last_id is not None else content_hash(page[-1])
        if last <= asked.after:  # a page that does not advance would be asked for forever
            LOGGER.warning("lifecycle sync: %s's record pages do not advance; round ended", peer)
            st.resume = b""
            return page, []
        if st.pages >= self.pages_max:
            LOGGER.warning("lifecycle sync: %d pages pulled from %s in one round; the rest "
                           "next round", st.pages, peer)
            st.resume = last
            return page, []
        return page, [self._send(st, RecordsAsk(peer, last, asked.limit), now)]

    def on_failure(self, now: float, peer: str) -> None:
        """The request in flight to `peer` failed: asked again at the next interval."""
        st = self._peers.get(peer)
        if st is None or st.in_flight is None:
            return
        self._failed(st)
        st.due_at = now + self.interval_s

    def note_local_change(self, now: float) -> None:
        """Our book grew: every peer is asked again at once (after its request in flight)."""
        for st in self._peers.values():
            st.due_at = min(st.due_at, now)

    # ---- what the deleter asks ---------------------------------------------------------

    def unconfirmed(self, now: float, alive_peers: Iterable[str], ours: Digest) -> list[str]:
        """Alive peers whose latest digest is not ours, or older than confirm_within_s."""
        out = []
        for peer in sorted(self._alive(alive_peers)):
            st = self._peers.get(peer)
            seen = st.seen if st is not None else None
            if (seen is None or seen[1] != ours
                    or not 0 <= now - seen[0] <= self.confirm_within_s):
                out.append(peer)
        return out

    def confirmed(self, now: float, alive_peers: Iterable[str], ours: Digest,
                  alone_ok: bool = False) -> bool:
        """Every alive peer agreed with our digest lately. With no alive peer, only
        `alone_ok` (a one-node cluster) makes it so: alone, a node cannot tell a
        partition from an empty cluster."""
        alive = self._alive(alive_peers)
        if not alive:
            return alone_ok
        return not self.unconfirmed(now, alive, ours)

    def seen(self, peer: str) -> tuple[float, Digest] | None:
        """The peer's latest digest answer and when it was asked for (status)."""
        st = self._peers.get(peer)
        return st.seen if st is not None else None

    # ---- inside ------------------------------------------------------------------------

    def _alive(self, alive_peers: Iterable[str]) -> set[str]:
        return {p for p in alive_peers if p != self.me}

    def _send(self, st: _Peer, ask: Ask, now: float) -> Ask:
        st.in_flight, st.sent_at = ask, now
        return ask

    @staticmethod
    def _failed(st: _Peer) -> None:
        if isinstance(st.in_flight, RecordsAsk):  # the next round goes on from here
            st.resume = st.in_flight.after
        st.in_flight = None
