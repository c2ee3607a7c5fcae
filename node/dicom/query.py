"""C-FIND over the catalog, and the instance selection C-GET and C-MOVE share.

Levels PATIENT, STUDY, SERIES and IMAGE (Patient Root and Study Root models).
Matching follows PS3.4 C.2.2.2: an empty key matches everything (universal);
`*` and `?` are wildcards; a backslash list matches any of its values (lists
of UIDs); DA, TM and DT take ranges `A-B`, `A-`, `-B` (an upper bound covers
its whole precision: `-2026` ends with 2026). PN keys ignore case and match
any component group (person_name.py). A key we keep no value for matches
everything and comes back empty, as the standard allows for optional keys.

Character sets: matching is on text. Stored values were decoded with their
instance's Specific Character Set at ingest (node/charset.py); pydicom decodes
the identifier with the query's own. A response is written in the query's
character set when that set can carry every value in it, else in UTF-8
(ISO_IR 192), with Specific Character Set saying which (`charset.response_terms`).

Where the values come from: study records hold the patient and study keys most
queries use, so a study-level query reads one small record per candidate study
(found through the indexes where a key allows: candidates.py); the rest (study
time, series and instance keys) come from the manifests of the studies that
already matched. Answers are streamed, and bounded by `MATCHES_MAX`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pacsmesh.node import charset
from pacsmesh.node.catalog import Catalog
from pacsmesh.node.dicom import person_name
from pacsmesh.node.dicom.candidates import candidate_records
from pacsmesh.node.dicom.status import CANCEL, PENDING, SUCCESS, status
from pacsmesh.node.dicom.trail import Trail
from pacsmesh.proto import node_pb2

LOGGER = logging.getLogger(__name__)

MATCHES_MAX = 10_000  # responses to one C-FIND: past this, narrow the query
RETRIEVE_INSTANCES_MAX = 65_535  # sub-operation counts are US (PS3.7 C.4.2/3)
STUDIES_MATCHED_MAX = 100_000  # studies one query answers (patients held in memory)

STATUS_FIND_TOO_MANY = 0xA700  # out of resources
STATUS_FIND_BAD_IDENTIFIER = 0xA900  # identifier does not match SOP class
STATUS_FIND_FAILED = 0xC001  # unable to process
MODELS = {"1.2.840.10008.5.1.4.1.2.1.1": "Patient Root",
          "1.2.840.10008.5.1.4.1.2.2.1": "Study Root"}

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NO_WILDCARD_VRS = frozenset({"UI", "DA", "TM", "DT", "IS", "DS", "US", "UL", "SS", "SL",
                             "FL", "FD", "AT", "OB", "OW", "SQ", "UN"})
# Keys describing the query, not matched against anything.
CONTROL_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
                          "InstanceAvailability", "TimezoneOffsetFromUTC"})

# keyword -> manifest field, by the level that owns the attribute
PATIENT_FIELDS = {"PatientID": "patient_id", "PatientName": "patient_name",
                  "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex"}
STUDY_FIELDS = {"StudyInstanceUID": "study_instance_uid", "StudyDate": "study_date",
                "StudyTime": "study_time", "AccessionNumber": "accession_number",
                "StudyID": "study_id", "StudyDescription": "study_description"}
SERIES_FIELDS = {"SeriesInstanceUID": "series_instance_uid", "Modality": "modality",
                 "SeriesNumber": "series_number", "SeriesDescription": "series_description"}
IMAGE_FIELDS = {"SOPInstanceUID": "sop_instance_uid", "SOPClassUID": "sop_class_uid",
                "InstanceNumber": "instance_number"}
# Study keys the study record holds; the others need the study's manifests.
RECORD_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID",
                         "StudyDate", "AccessionNumber", "StudyDescription",
                         "ModalitiesInStudy", "NumberOfStudyRelatedInstances"})


class QueryError(Exception):
    """The identifier cannot be answered; the message says why (for Error Comment)."""


# ---- matching -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One matching key of the identifier: keyword, VR and its values (a list)."""

    keyword: str
    vr: str
    values: tuple[str, ...]

    @property
    def universal(self) -> bool:
        return not self.values or all(v in ("", "*") for v in self.values)


def _wildcard_match(pattern: str, value: str, fold: bool) -> bool:
    """`*` any run, `?` any one character, in O(len(pattern) * len(value)) steps. (A
    regex of the pattern backtracks exponentially: `*a*a*a*a*a*a*a*a*b` against 60
    a's took minutes, holding the GIL, so one C-FIND froze the whole node.)"""
    if fold:
        pattern, value = pattern.casefold(), value.casefold()
    p = v = 0
    star, resume = -1, 0  # the last `*` seen, and where its run would end next
    while v < len(value):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, v
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", value[v]):
            p += 1
            v += 1
        elif star >= 0:  # let the last `*` take one more character, and retry after it
            p, resume = star + 1, resume + 1
            v = resume
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _in_range(value: str, spec: str) -> bool:
    lower, _, upper = spec.partition("-")
    lower, upper = lower.strip(), upper.strip()
    if lower and value < lower:
        return False
    # compared at the bound's precision: an upper bound includes all it names
    return not (upper and value[: len(upper)] > upper)


def _wildcard_exact(pattern: str, value: str) -> bool:
    return _wildcard_match(pattern, value, fold=False)


def value_matches(key: Key, value: str) -> bool:
    """Does one stored value match one of the key's values?"""
    for want in key.values:
        if want in ("", "*"):
            return True
        if key.vr == "PN":
            if person_name.matches(want, value, _wildcard_exact):
                return True
        elif key.vr in RANGE_VRS and "-" in want:
            if value and _in_range(value, want):
                return True
        elif key.vr not in NO_WILDCARD_VRS and ("*" in want or "?" in want):
            if _wildcard_match(want, value, fold=False):
                return True
        elif want == value:
            return True
    return False


def row_matches(keys: list[Key], row: Row) -> bool:
    for key in keys:
        if key.universal or not row.knows(key.keyword):
            continue
        if not any(value_matches(key, v) for v in row.get(key.keyword)):
            return False
    return True


def parse_keys(identifier: Dataset) -> tuple[str, list[Key]]:
    """(query level, matching keys) of a C-FIND/GET/MOVE identifier."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise QueryError(f"Query/Retrieve Level {level!r} is not one of {', '.join(LEVELS)}")
    keys = []
    for elem in identifier:
        if elem.tag.group == 0x0002 or elem.keyword in CONTROL_KEYS or not elem.keyword:
            continue
        if elem.VR == "SQ":  # sequence matching is optional; we answer them empty
            keys.append(Key(elem.keyword, elem.VR, ()))
            continue
        raw = elem.value
        if raw is None:
            values: tuple[str, ...] = ()
        elif isinstance(raw, MultiValue | list | tuple):
            values = tuple(str(v).strip() for v in raw)
        else:
            values = (str(raw).strip(),)
        keys.append(Key(elem.keyword, elem.VR, tuple(v for v in values if v) or ()))
    return level, keys


# ---- rows: the attribute values of one matched entity -------------------------------------


@dataclass
class Row:
    """Values by keyword; `more` fills in the costly ones the first time one is asked."""

    values: dict[str, list[str]]
    more: Callable[[], dict[str, list[str]]] | None = None
    more_keys: frozenset[str] = frozenset()
    study_uid: str = ""
    series_uid: str = ""
    manifests: list[node_pb2.Manifest] = field(default_factory=list)
    study_uids: list[str] = field(default_factory=list)  # a patient's studies

    def knows(self, keyword: str) -> bool:
        return keyword in self.values or keyword in self.more_keys

    def get(self, keyword: str) -> list[str]:
        if keyword not in self.values and keyword in self.more_keys and self.more is not None:
            self.values.update(self.more())
            self.more = None
        return self.values.get(keyword, [])


def _fields(m: node_pb2.Manifest, names: dict[str, str]) -> dict[str, list[str]]:
    return {kw: [getattr(m, f)] for kw, f in names.items()}


STUDY_MORE_KEYS = frozenset({"StudyTime", "StudyID", "PatientSex", "NumberOfStudyRelatedSeries"})


def study_row(catalog: Catalog, rec: node_pb2.StudyRecord) -> Row:
    values = {
        "PatientID": [rec.patient_id], "PatientName": [rec.patient_name],
        "PatientBirthDate": [rec.patient_birth_date], "StudyInstanceUID": [rec.study_uid],
        "StudyDate": [rec.study_date], "AccessionNumber": [rec.accession_number],
        "StudyDescription": [rec.study_description],
        "ModalitiesInStudy": sorted(rec.modalities) or [""],
        "NumberOfStudyRelatedInstances": [str(rec.instances)],
    }

    def more() -> dict[str, list[str]]:
        instances = catalog.study_instances(rec.study_uid)
        out = {"NumberOfStudyRelatedSeries": [str(len({s for s, _ in instances}))]}
        current = catalog.with_text_fixes(catalog.current_manifests(rec.study_uid))
        if current:
            m = current[0]
            out.update({"StudyTime": [m.study_time], "StudyID": [m.study_id],
                        "PatientSex": [m.patient_sex]})
        return out

    return Row(values, more, STUDY_MORE_KEYS, study_uid=rec.study_uid)


def _study_values(study: Row) -> dict[str, list[str]]:
    """The upper-level values a series or image row repeats (without loading more)."""
    return dict(study.values)


def series_rows(study: Row, manifests: list[node_pb2.Manifest]) -> list[Row]:
    by_series: dict[str, list[node_pb2.Manifest]] = {}
    for m in manifests:
        by_series.setdefault(m.series_instance_uid, []).append(m)
    rows = []
    for series_uid, members in sorted(by_series.items()):
        first = min(members, key=_instance_order)
        values = _study_values(study)
        values.update(_fields(first, PATIENT_FIELDS | STUDY_FIELDS | SERIES_FIELDS))
        values["NumberOfSeriesRelatedInstances"] = [str(len(members))]
        rows.append(Row(values, study_uid=study.study_uid, series_uid=series_uid,
                        manifests=members))
    return rows


def image_rows(study: Row, manifests: list[node_pb2.Manifest]) -> list[Row]:
    rows = []
    for m in sorted(manifests, key=_instance_order):
        values = _study_values(study)
        values.update(_fields(m, PATIENT_FIELDS | STUDY_FIELDS | SERIES_FIELDS | IMAGE_FIELDS))
        values["AvailableTransferSyntaxUID"] = [m.transfer_syntax_uid]
        rows.append(Row(values, study_uid=m.study_instance_uid,
                        series_uid=m.series_instance_uid, manifests=[m]))
    return rows


def _instance_order(m: node_pb2.Manifest) -> tuple[str, int, str]:
    number = int(m.instance_number) if m.instance_number.isdigit() else 0
    return (m.series_instance_uid, number, m.sop_instance_uid)


# ---- the search -----------------------------------------------------------------------------


def _wanted(keys: list[Key]) -> dict[str, tuple[str, ...]]:
    """keyword -> values of the keys that name something (not universal)."""
    return {k.keyword: k.values for k in keys if not k.universal}


def matching_studies(catalog: Catalog, keys: list[Key]) -> Iterator[Row]:
    """Studies whose patient and study keys match, streamed. Candidates come from the
    indexes (candidates.py); keys the study record holds are tested first, the rest
    (which read the study's manifests) only on studies that passed those."""
    record_keys = [k for k in keys if k.keyword in RECORD_KEYS]
    other_keys = [k for k in keys if k.keyword not in RECORD_KEYS]
    matched = 0
    for rec in candidate_records(catalog, _wanted(record_keys)):
        row = study_row(catalog, rec)
        if not (row_matches(record_keys, row) and row_matches(other_keys, row)):
            continue
        yield row
        matched += 1
        if matched >= STUDIES_MATCHED_MAX:
            LOGGER.warning("query matched more than %d studies; the rest are left out",
                           STUDIES_MATCHED_MAX)
            return


def _upper_keys(keys: list[Key], fields: dict[str, str]) -> list[Key]:
    return [k for k in keys if k.keyword not in fields]


def find(catalog: Catalog, level: str, keys: list[Key]) -> Iterator[Row]:
    """Every entity at `level` matching `keys`, streamed."""
    lower = SERIES_FIELDS | IMAGE_FIELDS | {"NumberOfSeriesRelatedInstances": "",
                                            "AvailableTransferSyntaxUID": ""}
    study_keys = _upper_keys(keys, lower)
    if level == "PATIENT":
        yield from _patients(catalog, keys)
        return
    studies = matching_studies(catalog, study_keys)
    if level == "STUDY":
        yield from studies
        return
    for study in studies:
        manifests = catalog.with_text_fixes(catalog.current_manifests(study.study_uid))
        rows = series_rows(study, manifests) if level == "SERIES" else image_rows(
            study, manifests)
        for row in rows:
            if row_matches(keys, row):
                yield row


def _patients(catalog: Catalog, keys: list[Key]) -> Iterator[Row]:
    patient_keys = [k for k in keys if k.keyword in PATIENT_FIELDS or
                    k.keyword.startswith("NumberOfPatientRelated")]
    by_patient: dict[str, list[Row]] = {}
    record_keys = [k for k in patient_keys if k.keyword in RECORD_KEYS]
    for rec in candidate_records(catalog, _wanted(record_keys)):
        row = study_row(catalog, rec)
        if row_matches(record_keys, row):
            by_patient.setdefault(rec.patient_id, []).append(row)
            if len(by_patient) >= STUDIES_MATCHED_MAX:
                break
    for _, studies in sorted(by_patient.items()):
        first = studies[0]
        values = {kw: first.values.get(kw, [""]) for kw in PATIENT_FIELDS if kw != "PatientSex"}
        values["NumberOfPatientRelatedStudies"] = [str(len(studies))]
        values["NumberOfPatientRelatedInstances"] = [
            str(sum(int(s.values["NumberOfStudyRelatedInstances"][0]) for s in studies))]

        def more(studies: list[Row] = studies) -> dict[str, list[str]]:
            series = sum(int(s.get("NumberOfStudyRelatedSeries")[0]) for s in studies)
            return {"PatientSex": studies[0].get("PatientSex"),
                    "NumberOfPatientRelatedSeries": [str(series)]}

        row = Row(values, more, frozenset({"PatientSex", "NumberOfPatientRelatedSeries"}),
                  study_uids=[s.study_uid for s in studies])
        if row_matches(patient_keys, row):
            yield row


# ---- answers ----------------------------------------------------------------------------------


def response(identifier: Dataset, row: Row, level: str, ae_title: str) -> Dataset:
    """The identifier of one pending C-FIND response: each requested key, filled in."""
    ds = Dataset()
    texts: list[tuple[str, str]] = []  # (VR, value) of what is sent, for the charset
    for elem in identifier:
        keyword = elem.keyword
        if elem.tag.group == 0x0002 or keyword in ("SpecificCharacterSet",):
            continue
        if keyword == "QueryRetrieveLevel":
            ds.add_new(elem.tag, elem.VR, level)
            continue
        if keyword == "RetrieveAETitle":
            continue  # always set below
        if keyword == "InstanceAvailability":
            ds.add_new(elem.tag, elem.VR, "ONLINE")
            continue
        if elem.VR == "SQ":
            ds.add_new(elem.tag, "SQ", [])
            continue
        values = [v for v in row.get(keyword) if v] if keyword and row.knows(keyword) else []
        if elem.VR == "IS":
            values = [v for v in values if v.lstrip("+-").isdigit()]
        texts.extend((elem.VR, v) for v in values if not v.isascii())
        value: Any = None if not values else values[0] if len(values) == 1 else values
        ds.add_new(elem.tag, elem.VR, value)
    ds.RetrieveAETitle = ae_title
    # pydicom encodes the values in the set named here when pynetdicom sends `ds`
    terms = charset.response_terms(charset.terms_of(identifier.get("SpecificCharacterSet")),
                                   texts)
    if terms:
        ds.SpecificCharacterSet = terms[0] if len(terms) == 1 else list(terms)
    return ds


def select_instances(catalog: Catalog, identifier: Dataset) -> list[node_pb2.Manifest]:
    """The current version of every instance a C-GET/C-MOVE identifier names, in
    study/series/instance order. Raises QueryError past RETRIEVE_INSTANCES_MAX."""
    level, keys = parse_keys(identifier)
    out: list[node_pb2.Manifest] = []
    seen: set[str] = set()
    for row in find(catalog, level, keys):
        study_uids = row.study_uids if level == "PATIENT" else (
            [row.study_uid] if level == "STUDY" else [])
        for uid in study_uids:
            current = [m for _, _, m in catalog.current_manifests(uid)]
            row.manifests.extend(sorted(current, key=_instance_order))
        for m in row.manifests:
            if m.sop_instance_uid in seen:
                continue
            seen.add(m.sop_instance_uid)
            out.append(m)
            if len(out) > RETRIEVE_INSTANCES_MAX:
                raise QueryError(f"more than {RETRIEVE_INSTANCES_MAX} instances match: "
                                 "retrieve fewer at a time")
    return out


# ---- the C-FIND service -------------------------------------------------------------------------


def described(keys: list[Key]) -> str:
    """Which keys a query matched on and how many it asked for: never their values
    (patient names and IDs)."""
    used = [k.keyword for k in keys if not k.universal]
    return f"matched on {','.join(used) or 'nothing'}; {len(keys)} keys asked"


class FindScp:
    def __init__(self, catalog: Catalog, ae_title: str, trail: Trail) -> None:
        self.catalog, self.ae_title, self.trail = catalog, ae_title, trail

    def handle(self, event: Any) -> Iterator[tuple[Any, Dataset | None]]:
        """EVT_C_FIND: matches streamed as pending responses, at most MATCHES_MAX; the
        audit event is durable before the final response."""
        calling = event.assoc.requestor.ae_title
        model = MODELS.get(str(event.request.AffectedSOPClassUID), "C-FIND")
        try:
            identifier = event.identifier
            level, keys = parse_keys(identifier)
        except QueryError as exc:
            LOGGER.warning("C-FIND from %s refused: %s", calling, exc)
            yield self._final(event, "refused", f"{model}: {exc}",
                              status(STATUS_FIND_BAD_IDENTIFIER, str(exc))), None
            return
        except Exception as exc:  # an identifier that does not decode
            # the type only: a decoder's message may quote the value (a name, an ID)
            LOGGER.warning("C-FIND from %s: bad identifier (%s)", calling, type(exc).__name__)
            yield self._final(event, "refused", f"{model}: bad identifier",
                              status(STATUS_FIND_BAD_IDENTIFIER, f"bad identifier: {exc}")
                              ), None
            return
        what = f"{model} {level}, {described(keys)}"
        sent = 0
        try:
            for row in find(self.catalog, level, keys):
                if event.is_cancelled:
                    yield self._final(event, "partial", f"{what}; cancelled after {sent} "
                                      "matches", status(CANCEL)), None
                    return
                if sent >= MATCHES_MAX:
                    LOGGER.warning("C-FIND from %s stopped at %d matches", calling, sent)
                    yield self._final(event, "partial", f"{what}; stopped at {sent} matches",
                                      status(STATUS_FIND_TOO_MANY, f"more than {MATCHES_MAX} "
                                             "matches: narrow the query")), None
                    return
                yield PENDING, response(identifier, row, level, self.ae_title)
                sent += 1
        except Exception as exc:
            LOGGER.exception("C-FIND from %s failed", calling)
            yield self._final(event, "failed", f"{what}; failed after {sent} matches",
                              status(STATUS_FIND_FAILED, f"internal error: {exc}")), None
            return
        LOGGER.info("C-FIND from %s at %s level: %d matches", calling, level, sent)
        yield self._final(event, "ok", f"{what}; {sent} matches", status(SUCCESS)), None

    def _final(self, event: Any, outcome: str, detail: str, answer: Dataset) -> Dataset:
        """The final status, once the audit event is durable."""
        try:
            self.trail.record(event.assoc, "C-FIND", outcome, detail=detail)
        except OSError as exc:
            LOGGER.error("C-FIND audit event cannot be written: %s", exc)
            return status(STATUS_FIND_FAILED, "audit trail cannot be written")
        return answer
