"""Decided Storage Commitment reports waiting to go out: by which route, when to try
again, and when to give up. Free of IO: the service asks what is due, delivers,
and settles each attempt with the time it ended.

Routes:
- a destination: the requester's AE title is in [dicom.destinations], so the
  reports go on new associations to it, at most `REPORTS_PER_ASSOCIATION_MAX`
  per association. A failed attempt is retried after `retry_delay_s` (5 s,
  doubling, at most 10 min), per destination: one unreachable requester costs
  one connection attempt per delay, however many reports wait for it.
- a requester: its AE title is not a destination, so the only way to it is an
  association it opens itself (PS3.4 J.3.3 lets the N-EVENT-REPORT go on an
  association other than the N-ACTION's). Its reports wait until it sends its
  next Storage Commitment request, then go on that association.
Either way a report is given up `REPORT_KEEP_S` after its transaction's
deadline: by then the requester has long stopped waiting for it.

One attempt per route at a time (`busy`), so no report is sent twice at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pacsmesh.node.dicom.commit_verdict import Transaction, TxnKey

DESTINATION = "destination"
REQUESTER = "requester"
REPORTS_PER_ASSOCIATION_MAX = 100  # a stuck association holds back at most this many
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 600.0  # an unreachable requester is tried at least this often
# Modalities wait hours, not days, for a report before they alert or ask again;
# a day past the deadline covers a requester down overnight or over a restart.
REPORT_KEEP_S = 86_400.0


@dataclass(frozen=True)
class Route:
    kind: str  # DESTINATION or REQUESTER
    name: str  # the destination's AE title, or the requester as the audit trail names it


def retry_delay_s(failures: int) -> float:
    """How long a route waits after its `failures`-th failed attempt in a row."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** min(max(failures - 1, 0), 30))


@dataclass
class _RouteState:
    ready: dict[TxnKey, Transaction] = field(default_factory=dict)  # oldest first
    failures: int = 0  # failed attempts in a row
    next_at: float = 0.0  # a destination is not tried before this
    busy: bool = False  # an attempt is under way


class Outbox:
    def __init__(self, keep_s: float = REPORT_KEEP_S,
                 batch_max: int = REPORTS_PER_ASSOCIATION_MAX) -> None:
        assert keep_s > 0 and batch_max > 0
        self.keep_s, self.batch_max = keep_s, batch_max
        self._routes: dict[Route, _RouteState] = {}
        self._route_of: dict[TxnKey, Route] = {}
        self.references = 0  # referenced instances held here: the service's memory bound

    def __len__(self) -> int:
        return len(self._route_of)

    def add(self, route: Route, txn: Transaction) -> None:
        self.discard(txn.key)
        self._routes.setdefault(route, _RouteState()).ready[txn.key] = txn
        self._route_of[txn.key] = route
        self.references += len(txn.refs)

    def discard(self, key: TxnKey) -> Transaction | None:
        """Forget the report under `key` (a retry of its request replaces it). One in
        an attempt under way is still sent: that attempt holds its own list."""
        route = self._route_of.pop(key, None)
        if route is None:
            return None
        state = self._routes[route]
        txn = state.ready.pop(key)
        self.references -= len(txn.refs)
        self._forget_if_idle(route)
        return txn

    def get(self, key: TxnKey) -> Transaction | None:
        route = self._route_of.get(key)
        return self._routes[route].ready[key] if route is not None else None

    def waiting(self, route: Route) -> int:
        state = self._routes.get(route)
        return len(state.ready) if state is not None else 0

    def due(self, now: float) -> list[tuple[Route, list[Transaction]]]:
        """A batch for every destination that may be tried now; each is busy until
        `settle`."""
        batches = []
        for route, state in self._routes.items():
            if (route.kind == DESTINATION and not state.busy and state.ready
                    and state.next_at <= now):
                batches.append((route, self._take(state)))
        return batches

    def take(self, route: Route, now: float, force: bool = False) -> list[Transaction]:
        """The next batch for `route`, now that a way to it is open; busy until `settle`.
        [] when there is none, an attempt is under way, or (unless `force`: the
        requester just asked again) the route is waiting out a failure."""
        state = self._routes.get(route)
        if state is None or state.busy or not state.ready or (not force and state.next_at > now):
            return []
        return self._take(state)

    def settle(self, route: Route, delivered: list[Transaction], error: str,
               now: float) -> float:
        """The attempt on `route` is over: `delivered` went out, and `error` says why
        the rest did not ("" if nothing failed). The delay before the route is tried
        again (0 after a success)."""
        state = self._routes[route]
        state.busy = False
        for txn in delivered:
            if state.ready.get(txn.key) is txn:  # not replaced by a retry meanwhile
                del state.ready[txn.key]
                del self._route_of[txn.key]
                self.references -= len(txn.refs)
        delay = 0.0
        if error:
            state.failures += 1
            delay = retry_delay_s(state.failures)
        else:
            state.failures = 0
        state.next_at = now + delay
        self._forget_if_idle(route)
        return delay

    def failures(self, route: Route) -> int:
        state = self._routes.get(route)
        return state.failures if state is not None else 0

    def expired(self, now: float) -> list[Transaction]:
        """Reports past their give-up time (`keep_s` after the deadline), removed; never
        one in an attempt under way (its attempt settles first)."""
        gone = []
        for route, state in list(self._routes.items()):
            if state.busy:
                continue
            for key, txn in list(state.ready.items()):
                if now >= give_up_at(txn, self.keep_s):
                    del state.ready[key]
                    del self._route_of[key]
                    self.references -= len(txn.refs)
                    gone.append(txn)
            self._forget_if_idle(route)
        return gone

    def _take(self, state: _RouteState) -> list[Transaction]:
        state.busy = True
        batch = []
        for txn in state.ready.values():
            batch.append(txn)
            if len(batch) >= self.batch_max:
                break
        return batch

    def _forget_if_idle(self, route: Route) -> None:
        state = self._routes.get(route)
        if state is not None and not state.ready and not state.busy and not state.failures:
            del self._routes[route]


def give_up_at(txn: Transaction, keep_s: float = REPORT_KEEP_S) -> float:
    return txn.deadline + keep_s
