"""The studies a C-FIND/C-GET/C-MOVE identifier may name, found through the indexes.

Which key leads, the most selective first: StudyInstanceUID (a lookup per UID),
AccessionNumber, PatientID (exact values, or the prefix before a trailing `*`),
StudyDate (dates and ranges). Without any of them (e.g. PatientName with
wildcards), the study records are read in UID order. Either way one query looks
at no more than STUDIES_EXAMINED_MAX studies: past that it answers with what it
found and logs a warning. These are candidates only: the caller matches every
key against each one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pacsmesh.node.catalog import Catalog
from pacsmesh.node.study_index import SEP, split_key, value_key
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)

STUDIES_EXAMINED_MAX = 100_000  # ~1-2 s of reading and matching for one query
READ_BATCH = 1000  # keys per read transaction: none stays open while answers go out
# keyword -> index field, most selective first (StudyDate is handled on its own)
VALUE_INDEXES = (("AccessionNumber", "accession_number"), ("PatientID", "patient_id"))


@dataclass(frozen=True)
class KeyRange:
    """Keys from `start` on while `within` holds."""

    start: bytes
    within: Callable[[bytes], bool]


def _prefix(start: bytes) -> KeyRange:
    return KeyRange(start, lambda key: key.startswith(start))


def _value_ranges(values: tuple[str, ...]) -> list[KeyRange] | None:
    """Exact values and `prefix*` patterns; None when a pattern cannot use the index."""
    out = []
    for v in values:
        head = v[:-1] if v.endswith("*") else v
        if "*" in head or "?" in head:
            return None
        out.append(_prefix(value_key(head) + SEP if head == v else value_key(head)))
    return out


def _date_range(value: str) -> KeyRange:
    if "-" not in value:
        return _prefix(value_key(value) + SEP)
    lower, _, upper = (part.strip() for part in value.partition("-"))
    top = upper.encode()
    # an upper bound covers all it names: -2026 ends with 2026 (as query.py matches)
    return KeyRange(lower.encode(),
                    lambda key: not top or split_key(key)[0][: len(top)] <= top)


def candidate_records(catalog: Catalog, wanted: dict[str, tuple[str, ...]]
                      ) -> Iterator[node_pb2.StudyRecord]:
    """Studies with instances that the keys may match; `wanted`: keyword -> values of
    the identifier's non-universal keys."""
    uids = wanted.get("StudyInstanceUID")
    if uids is not None and not any("*" in u or "?" in u for u in uids):
        for uid in dict.fromkeys(uids):
            rec = catalog.study_record(uid)
            if rec is not None and rec.instances > 0:
                yield rec
        return
    for keyword, index in VALUE_INDEXES:
        if keyword in wanted and (ranges := _value_ranges(wanted[keyword])) is not None:
            yield from _scan(catalog, index, ranges)
            return
    if "StudyDate" in wanted:
        yield from _scan(catalog, "study_date", [_date_range(v) for v in wanted["StudyDate"]])
        return
    yield from _scan(catalog, "", [KeyRange(b"", lambda key: True)])


def _scan(catalog: Catalog, index: str, ranges: list[KeyRange]
          ) -> Iterator[node_pb2.StudyRecord]:
    seen: set[str] = set()  # ranges may overlap
    examined = 0
    for r in ranges:
        start = r.start
        while True:
            budget = min(READ_BATCH, STUDIES_EXAMINED_MAX - examined)
            rows = catalog.scan(index, start, budget + 1, r.within)  # +1: is there more?
            for _, uid, rec in rows[:budget]:
                if rec is not None and rec.instances > 0 and uid not in seen:
                    seen.add(uid)
                    yield rec
            examined += len(rows[:budget])
            if len(rows) <= budget:
                break
            if examined >= STUDIES_EXAMINED_MAX:
                LOGGER.warning("query stopped after examining %d studies (by %s): the answer "
                               "may be incomplete; give PatientID, AccessionNumber or a "
                               "StudyDate range", examined, index or "study uid")
                return
            start = rows[budget - 1][0] + SEP
