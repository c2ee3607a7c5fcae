"""Pages of studies for `pacsmesh ls`: filters through indexes, bounded work per request.

Where the candidates come from: a patient id reads by_patient (in study uid
order), a date range by_date (in date, then uid order), expired studies by_expiry
(in expiry date, then uid order), unsafe studies alone the
unsafe index (oldest first, kept by the cluster's safety verdicts), anything
else the study records themselves (in uid order). Every other filter is checked on each
candidate's record. Reading happens in short transactions of READ_BATCH keys,
and one request examines at most EXAMINE_MAX candidates: a filter that matches
little answers a short (even empty) page and a `next` to continue from, rather
than a scan of the whole archive.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pacsmesh.node.catalog import Catalog, Scanned
from pacsmesh.node.study_index import SEP, split_key, value_key
from pacsmesh.node.uids import uid_problem
from pacsmesh.proto import node_pb2

T = TypeVar("T")

LIMIT_DEFAULT = 1000  # studies per page when the request says 0
LIMIT_MAX = 10_000  # ~2 MB of summaries: far below the 16 MiB message cap
EXAMINE_MAX = 50_000  # candidates one request looks at (~0.5 s of record reads)
READ_BATCH = 1000  # keys per read transaction, at most


class BadQuery(ValueError):
    """The request cannot be answered as asked; the message says why."""


def valid_date(text: str) -> bool:
    """YYYYMMDD naming a real day."""
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class StudyFilter:
    patient_id: str = ""
    since: str = ""  # YYYYMMDD, inclusive
    until: str = ""
    modality: str = ""
    local: bool = False  # every current instance held here, verified
    unsafe: bool = False  # judged short of safe copies (the caller re-checks live)
    expired_by: str = ""  # YYYYMMDD: retention expiry on or before this day
    expiry_key: Callable[[node_pb2.StudyRecord], str] | None = None  # (its YYYYMMDD)

    def check(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value and not valid_date(value):
                raise BadQuery(f"{name} {value!r} is not a date YYYYMMDD")
        if self.since and self.until and self.since > self.until:
            raise BadQuery(f"since {self.since} is after until {self.until}")

    @property
    def dated(self) -> bool:
        return bool(self.since or self.until)

    def matches(self, rec: node_pb2.StudyRecord) -> bool:
        if rec.instances == 0:
            return False
        if self.patient_id and rec.patient_id != self.patient_id:
            return False
        if self.dated and not (rec.study_date and self.since <= rec.study_date
                               and (not self.until or rec.study_date <= self.until)):
            return False
        if self.modality and self.modality not in rec.modalities:
            return False
        if self.expired_by and (self.expiry_key is None
                                or self.expiry_key(rec) > self.expired_by):
            return False
        return not (self.local and rec.held_instances < rec.instances)


@dataclass
class Page(Generic[T]):
    items: list[T]
    next: str  # the study uid to continue after; "" when there is no more


class _Source:
    """One ordered stream of candidates: an index (or the records) and its bounds."""

    def __init__(self, catalog: Catalog, flt: StudyFilter) -> None:
        self.catalog = catalog
        self.expiry_key: Callable[[node_pb2.StudyRecord], str] | None = None
        self.index = ""
        self.prefix = b""
        self.until = b""
        if flt.patient_id:
            self.index, self.prefix = "patient_id", value_key(flt.patient_id) + SEP
        elif flt.dated:
            self.index, self.until = "study_date", flt.until.encode()
        elif flt.expired_by:
            self.index, self.until = "expires", flt.expired_by.encode()
            self.expiry_key = flt.expiry_key
        elif flt.unsafe:
            self.index = "unsafe"
        self.since = flt.since.encode() if self.index == "study_date" else b""

    def start(self, after: str) -> bytes:
        """The first key after study `after` ("" = from the beginning)."""
        if self.index == "unsafe":
            return self.catalog.unsafe_key(after) + SEP if after else b""
        if self.index == "expires":
            if not after:
                return b""
            rec = self.catalog.study_record(after)
            if rec is None or self.expiry_key is None:
                raise BadQuery(f"after: study {after} is not in this node's catalog")
            return value_key(self.expiry_key(rec)) + SEP + after.encode() + SEP
        if self.index == "study_date":
            if not after:
                return self.since
            rec = self.catalog.study_record(after)
            if rec is None:
                raise BadQuery(f"after: study {after} is not in this node's catalog")
            # resume at that study's place in date order (never before `since`)
            return max(value_key(rec.study_date) + SEP + after.encode() + SEP, self.since)
        return self.prefix + (after.encode() + SEP if after else b"")

    def within(self, key: bytes) -> bool:
        if self.prefix:
            return key.startswith(self.prefix)
        if self.until:
            return split_key(key)[0] <= self.until
        return True

    def read(self, start: bytes, count: int) -> list[Scanned]:
        return self.catalog.scan(self.index, start, count, self.within)


def list_page(catalog: Catalog, flt: StudyFilter, after: str, limit: int,
              keep: Callable[[node_pb2.StudyRecord], T | None],
              examine_max: int = 0) -> Page[T]:
    """Up to `limit` studies matching `flt` after study `after`, each turned into what
    `keep` makes of it (None: left out, e.g. a study that is safe when asked for unsafe
    ones); `keep` runs outside any read transaction. `examine_max`: 0 = EXAMINE_MAX."""
    flt.check()
    examine_max = examine_max or EXAMINE_MAX
    if after and (problem := uid_problem(after)):
        raise BadQuery(f"after: study UID {problem}")
    limit = min(limit or LIMIT_DEFAULT, LIMIT_MAX)
    source = _Source(catalog, flt)
    start = source.start(after)
    items: list[T] = []
    examined = 0
    batch = min(READ_BATCH, limit)  # a small page reads little; a sparse filter, more
    while True:
        budget = min(batch, examine_max - examined)
        batch = min(READ_BATCH, batch * 2)
        rows = source.read(start, budget + 1)  # one more: is there anything after?
        for i, (_, uid, rec) in enumerate(rows[:budget]):
            examined += 1
            if rec is not None and flt.matches(rec) and (item := keep(rec)) is not None:
                items.append(item)
                if len(items) >= limit:
                    return Page(items, uid if i + 1 < len(rows) else "")
        if len(rows) <= budget:
            return Page(items, "")
        if examined >= examine_max:
            return Page(items, rows[budget - 1][1])
        start = rows[budget - 1][0] + SEP
