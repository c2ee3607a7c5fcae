"""docs/conformance.md, the DICOM Conformance Statement, checked against the code.

Hospital IT connects modalities on the strength of that document, so every fact it
states in a table is compared here with the code that decides it: the presentation
contexts the AE accepts (read from the pynetdicom AE the node builds, never bound to
a port), the transfer-syntax conversion rules, every status code, the defaults of
[dicom], the limits, the C-FIND keys and their matching, the character sets and the
storage SOP classes. No processes; well under 2 s.

A table is found by the marker `<!-- table: NAME -->` on the line before it. Two
tables are generated from the code (the accepted transfer syntaxes, Annex 8.7's
storage SOP classes); print them with `.venv/bin/python -m tests.test_conformance`.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    build_context,
    sop_class,
)
from pynetdicom.presentation import negotiate_as_acceptor

from pacsmesh.node.config import ClusterSection, DicomSection
from pacsmesh.node.dicom import (
    admission,
    candidates,
    commitment,
    convert,
    fast_store,
    listener,
    query,
    retrieve,
    server,
    status,
    store_scp,
    trail,
    ul,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
REGENERATE = "regenerate with: .venv/bin/python -m tests.test_conformance"
UID_RE = re.compile(r"\b[12](?:\.\d+){3,}\b")
STATUS_RE = re.compile(r"\b0x[0-9A-F]{4}\b")
CT = UID("1.2.840.10008.5.1.4.1.1.2")
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

# What a retrieving peer gets of an instance stored in a syntax it did not accept
# (the last column of the accepted-syntax table), by convert.py's rules.
TARGETS_TABLE = "Table 4.2-12"  # the conversion targets' caption
FATE = "If a retrieving peer did not accept it"
CONVERTED = f"re-encoded in the first syntax of {TARGETS_TABLE} the peer accepted"
DECODED = "decoded with {} into the first syntax of " + TARGETS_TABLE + " the peer accepted"
LOSSY = "lossy: never decompressed; the sub-operation fails"
NEVER = "never converted; the sub-operation fails"
DECODER_NAMES = {"gdcm": "python-gdcm", "pydicom": "pydicom"}

# query.py names these keys only in the code that fills them in: keyword -> level
COUNT_KEYS = {
    "NumberOfPatientRelatedStudies": "PATIENT", "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT", "ModalitiesInStudy": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY", "NumberOfStudyRelatedInstances": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES", "AvailableTransferSyntaxUID": "IMAGE",
}
# the final statuses pynetdicom itself gives C-GET and C-MOVE (service_class.py)
PYNETDICOM_RETRIEVE_STATUSES = {0xB000, 0xA702, 0xA801}


# ---- reading the document ---------------------------------------------------------------


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_prose() -> str:
    """The document with every run of white space one space (sentences wrap)."""
    return " ".join(doc_text().split())


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """NAME -> rows (header -> cell text) of each table marked `<!-- table: NAME -->`."""
    out: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- table: ([a-z0-9-]+) -->", line.strip())
        if m is None:
            continue
        assert m.group(1) not in out, f"table {m.group(1)} is marked twice"
        body = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            body.append(row)
        assert len(body) >= 3, f"table {m.group(1)}: no table right after its marker"
        header = _cells(body[0])
        rows = [_cells(r) for r in body[2:]]
        for r in rows:
            assert len(r) == len(header), f"table {m.group(1)}: {r} has {len(r)} cells"
        out[m.group(1)] = [dict(zip(header, r, strict=True)) for r in rows]
    return out


def captions(text: str) -> dict[str, str]:
    """NAME -> the caption line right above its marker."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- table: ([a-z0-9-]+) -->", line.strip())
        if m is not None:
            out[m.group(1)] = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
    return out


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def code(cell: str) -> list[str]:
    """The `code` spans of a cell."""
    return re.findall(r"`([^`]*)`", cell)


def uids(cell: str) -> list[str]:
    return UID_RE.findall(cell)


def statuses(cell: str) -> list[int]:
    return [int(s, 16) for s in STATUS_RE.findall(cell)]


def numbers(cell: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", cell)]


def column(rows: list[dict[str, str]], name: str) -> list[str]:
    return [r[name] for r in rows]


def status_column(rows: list[dict[str, str]]) -> list[int]:
    out = []
    for r in rows:
        found = statuses(r["Status"])
        assert len(found) == 1, f"one status per row: {r['Status']}"
        out.extend(found)
    return out


@pytest.fixture(scope="module")
def doc() -> dict[str, list[dict[str, str]]]:
    return tables(doc_text())


# ---- what the code says -------------------------------------------------------------------


def sop_class_name(uid: str) -> str:
    """pydicom's name of a SOP class, else pynetdicom's keyword in words."""
    name = UID(uid).name
    if name != uid:
        return name
    keyword = next(k for k in dir(sop_class)
                   if not k.startswith("_") and isinstance(getattr(sop_class, k), str)
                   and getattr(sop_class, k) == uid)
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", keyword)


def storage_annex_rows() -> list[tuple[str, str]]:
    """(name, UID) of every storage SOP class the AE accepts, in pynetdicom's order."""
    return [(sop_class_name(str(cx.abstract_syntax)), str(cx.abstract_syntax))
            for cx in AllStoragePresentationContexts if cx.abstract_syntax]


def syntax_fate(ts: str) -> str:
    """What convert.py does with an instance stored in `ts` for a peer that did not
    accept `ts`."""
    if ts in convert.UNCOMPRESSED:
        return CONVERTED
    if ts in convert.LOSSLESS_DECODERS:
        return DECODED.format(DECODER_NAMES[convert.LOSSLESS_DECODERS[UID(ts)]])
    if ts in convert.LOSSY:
        return LOSSY
    return NEVER


def syntax_rows() -> list[tuple[str, str, str, str]]:
    """(#, name, UID, fate) of the syntaxes the storage contexts accept, preferred first."""
    return [(str(i), UID(ts).name, ts, syntax_fate(ts))
            for i, ts in enumerate(server.STORAGE_SYNTAXES, 1)]


def render() -> str:
    """The generated tables, as they go in the document."""
    out = ["<!-- table: storage-transfer-syntaxes -->",
           f"| # | Transfer Syntax | UID | {FATE} |",
           "|---|---|---|---|"]
    out += [f"| {n} | {name} | `{ts}` | {fate} |" for n, name, ts, fate in syntax_rows()]
    out += ["", "<!-- table: storage-sop-classes -->", "| SOP Class | UID |", "|---|---|"]
    out += [f"| {name} | `{uid}` |" for name, uid in storage_annex_rows()]
    return "\n".join(out)


@pytest.fixture(scope="module")
def dicom_server() -> Iterator[server.DicomServer]:
    """The node's DICOM server with its pynetdicom AE built (never started). Building
    it sets pynetdicom's process-wide logging options: put them back afterwards."""
    saved = (_config.LOG_HANDLER_LEVEL, _config.STORE_SEND_CHUNKED_DATASET,
             logging.getLogger("pynetdicom").level, logging.getLogger("pynetdicom.dul").level)
    archive: Any = SimpleNamespace(audit=None, store=SimpleNamespace(catalog=None),
                                   node_id="conformance", remote=None)
    srv = server.DicomServer(archive, DicomSection(), Path("/nonexistent"))
    srv.ae = srv._build_ae()
    try:
        yield srv
    finally:
        srv.commitment._reports.shutdown()
        _config.LOG_HANDLER_LEVEL, _config.STORE_SEND_CHUNKED_DATASET = saved[:2]
        logging.getLogger("pynetdicom").setLevel(saved[2])
        logging.getLogger("pynetdicom.dul").setLevel(saved[3])


def supported(srv: server.DicomServer) -> dict[str, Any]:
    """Abstract syntax -> the AE's supported presentation context."""
    return {str(cx.abstract_syntax): cx for cx in srv.ae.supported_contexts}


NON_STORAGE = {server.VERIFICATION, commitment.STORAGE_COMMITMENT_PUSH, *server.QUERY_RETRIEVE}


# ---- the document -------------------------------------------------------------------------


def test_every_marked_table_parses(doc: dict[str, list[dict[str, str]]]) -> None:
    assert len(doc) >= 20
    assert all(doc.values()), [k for k, v in doc.items() if not v]
    caps = captions(doc_text())
    numbered = [re.match(r"\*\*(Table [0-9.]+-\d+) ", c) for c in caps.values()]
    assert all(numbered), caps
    names = [m.group(1) for m in numbered if m]
    assert len(names) == len(set(names)), names
    assert caps["conversion-targets"].startswith(f"**{TARGETS_TABLE} ")
    assert caps["storage-transfer-syntaxes"].startswith("**Table 4.2-6 ")


def test_overview_lists_the_services(doc: dict[str, list[dict[str, str]]],
                                     dicom_server: server.DicomServer) -> None:
    rows = doc["network-services"]
    listed = [u for r in rows for u in uids(r["UID"])]
    assert sorted(listed) == sorted(NON_STORAGE)
    for r in rows:
        for uid in uids(r["UID"]):
            assert r["SOP Class"] == UID(uid).name, r
    storage = [r for r in rows if not uids(r["UID"])]
    assert len(storage) == 1 and str(len(server.STORAGE_CLASSES)) in storage[0]["SOP Class"]
    # what the AE accepts is that, and nothing else
    assert set(supported(dicom_server)) == NON_STORAGE | server.STORAGE_CLASSES
    assert NON_STORAGE.isdisjoint(server.STORAGE_CLASSES)


def test_storage_annex_is_every_accepted_storage_class(
        doc: dict[str, list[dict[str, str]]]) -> None:
    rows = [(r["SOP Class"], code(r["UID"])[0]) for r in doc["storage-sop-classes"]]
    assert rows == storage_annex_rows(), REGENERATE
    assert {uid for _, uid in rows} == server.STORAGE_CLASSES
    assert len(rows) == len(server.STORAGE_CLASSES)  # no class twice
    assert f"({len(rows)})" in captions(doc_text())["storage-sop-classes"]


def test_accepted_transfer_syntaxes(doc: dict[str, list[dict[str, str]]],
                                    dicom_server: server.DicomServer) -> None:
    rows = [(r["#"], r["Transfer Syntax"], code(r["UID"])[0],
             r[FATE])
            for r in doc["storage-transfer-syntaxes"]]
    assert rows == syntax_rows(), REGENERATE
    order = [uid for _, _, uid, _ in rows]
    # both receive paths prefer them in that order
    contexts = supported(dicom_server)
    for uid in server.STORAGE_CLASSES:
        assert list(contexts[uid].transfer_syntax) == order, uid
        assert (contexts[uid].scu_role, contexts[uid].scp_role) == (False, True), uid
    assert dicom_server.fast_policy.syntaxes == order
    assert dicom_server.fast_policy.supported == server.STORAGE_CLASSES
    # Verification: any of them ("Table 4.2-3 (any)")
    assert set(contexts[server.VERIFICATION].transfer_syntax) == set(order)
    assert set(ALL_TRANSFER_SYNTAXES) == set(order)


def test_query_and_commitment_transfer_syntaxes(doc: dict[str, list[dict[str, str]]],
                                                dicom_server: server.DicomServer) -> None:
    listed = [code(r["UID"])[0] for r in doc["query-transfer-syntaxes"]]
    assert [r["Transfer Syntax"] for r in doc["query-transfer-syntaxes"]] == [
        UID(ts).name for ts in listed]
    contexts = supported(dicom_server)
    for uid in (*server.QUERY_RETRIEVE, commitment.STORAGE_COMMITMENT_PUSH):
        assert list(contexts[uid].transfer_syntax) == listed, uid
        assert contexts[uid].scu_role is None and contexts[uid].scp_role is None  # default


def test_role_selection_outcomes(doc: dict[str, list[dict[str, str]]],
                                 dicom_server: server.DicomServer) -> None:
    """What pynetdicom answers a requester's SCP/SCU Role Selection for a storage class."""
    ours = supported(dicom_server)[CT]
    for r in doc["role-selection"]:
        proposed = r["Proposed (SCU, SCP)"]
        roles: dict[UID, tuple[bool | None, bool | None]] | None = None
        if proposed != "none":
            scu, scp = (bool(int(v)) for v in re.findall(r"\d", proposed))
            roles = {CT: (scu, scp)}
        rq = build_context(CT, ["1.2.840.10008.1.2.1"])
        rq.context_id = 1
        result, _ = negotiate_as_acceptor([rq], [ours], roles)
        cx, outcome = result[0], r["Result"]
        if outcome.startswith("rejected"):
            assert cx.result == 0x01, r  # user rejection
        elif outcome.startswith("accepted; requester is SCU"):
            assert (cx.result, cx.as_scu, cx.as_scp) == (0, False, True), r
        elif outcome.startswith("accepted; requester is SCP only"):
            assert (cx.result, cx.as_scu, cx.as_scp) == (0, True, False), r
        else:
            pytest.fail(f"unknown outcome {outcome!r}")


def test_c_get_requester_first_context_decides(dicom_server: server.DicomServer) -> None:
    """Section 4.2.1.4.4 says a C-GET requester's storage contexts follow its first
    context per SOP class, and a second context for the class is accepted only in a
    syntax of the first. If this fails because that was changed, update the document."""
    def proposed(cid: int, uid: str, ts: list[str]) -> Any:
        cx = build_context(uid, ts)
        cx.context_id = cid
        return cx

    jpeg_ls, explicit = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"
    rq = [proposed(1, STUDY_ROOT_GET, [explicit]), proposed(3, CT, [jpeg_ls]),
          proposed(5, CT, [explicit])]
    assoc = SimpleNamespace(
        requestor=SimpleNamespace(requested_contexts=rq),
        acceptor=SimpleNamespace(supported_contexts=list(dicom_server.ae.supported_contexts)))
    dicom_server._on_requested(SimpleNamespace(assoc=assoc))
    result, _ = negotiate_as_acceptor(rq, assoc.acceptor.supported_contexts,
                                      {CT: (False, True)})
    by_id = {cx.context_id: (cx.result, list(cx.transfer_syntax)) for cx in result}
    assert by_id[3] == (0, [jpeg_ls])
    assert by_id[5][0] == 0x04  # transfer syntax not supported
    assert "accepted only in a transfer syntax that the first one also lists" in doc_prose()


def test_conversion_rules(doc: dict[str, list[dict[str, str]]]) -> None:
    targets = [code(r["UID"])[0] for r in doc["conversion-targets"]]
    assert targets == list(convert.UNCOMPRESSED)
    assert [r["Preference"] for r in doc["conversion-targets"]] == [
        str(i) for i in range(1, len(targets) + 1)]
    decoded = {code(r["UID"])[0]: r["Decoder"] for r in doc["lossless-decoders"]}
    assert decoded == {ts: DECODER_NAMES[p] for ts, p in convert.LOSSLESS_DECODERS.items()}
    # every lossy syntax is accepted, and the table says it is never decompressed
    fates = {code(r["UID"])[0]: r[FATE]
             for r in doc["storage-transfer-syntaxes"]}
    assert set(fates) >= convert.LOSSY
    assert all(fates[ts] == LOSSY for ts in convert.LOSSY)
    text = doc_text()
    assert "never decompressed" in text and "never compressed" in text


def test_c_store_statuses(doc: dict[str, list[dict[str, str]]]) -> None:
    code_statuses = {v for k, v in vars(store_scp).items() if k.startswith("STATUS_")}
    assert sorted(status_column(doc["store-statuses"])) == sorted(code_statuses)


def test_c_find_statuses(doc: dict[str, list[dict[str, str]]]) -> None:
    code_statuses = {status.SUCCESS, status.PENDING, status.CANCEL} | {
        v for k, v in vars(query).items() if k.startswith("STATUS_FIND_")}
    assert sorted(status_column(doc["find-statuses"])) == sorted(code_statuses)


def test_retrieve_statuses(doc: dict[str, list[dict[str, str]]]) -> None:
    final = {status.SUCCESS, status.PENDING, status.CANCEL, retrieve.STATUS_TOO_MANY_MATCHES,
             retrieve.STATUS_IDENTIFIER_MISMATCH} | PYNETDICOM_RETRIEVE_STATUSES
    assert sorted(status_column(doc["retrieve-statuses"])) == sorted(final)
    sub = {retrieve.STATUS_PROCESSING_FAILURE, retrieve.STATUS_SOP_CLASS_NOT_SUPPORTED}
    assert sorted(status_column(doc["suboperation-failures"])) == sorted(sub)


def test_storage_commitment_codes(doc: dict[str, list[dict[str, str]]]) -> None:
    code_statuses = {v for k, v in vars(commitment).items() if k.startswith("STATUS_")}
    assert sorted(status_column(doc["commitment-statuses"])) == sorted(code_statuses)
    reasons = {v for k, v in vars(commitment).items() if k.startswith("FAILURE_")}
    assert sorted(status_column(doc["commitment-failure-reasons"])) == sorted(reasons)
    events = {int(r["Event Type ID"]) for r in doc["commitment-events"]}
    assert events == {commitment.EVENT_ALL_SUCCESS, commitment.EVENT_FAILURES}
    text = doc_text()
    assert commitment.WELL_KNOWN_INSTANCE_UID in text
    group = commitment.PRIVATE_GROUP
    creator = f"({group:04X},0010)"
    reason = f"({group:04X},{0x1000 | commitment.PRIVATE_REASON:04X})"
    assert f"`{commitment.PRIVATE_CREATOR}`" in text and creator in text and reason in text


def test_association_rejections(doc: dict[str, list[dict[str, str]]]) -> None:
    rows = {r["Reason"]: tuple(int(r[k][0]) for k in ("Result", "Source", "Diagnostic"))
            for r in doc["association-rejections"]}
    assert sorted(rows.values()) == sorted([ul.REJECT_CALLING_AE, ul.REJECT_LIMIT])


def test_implementation_identification(doc: dict[str, list[dict[str, str]]],
                                       dicom_server: server.DicomServer) -> None:
    rows = {r["Item"]: r["Value"] for r in doc["implementation"]}
    assert code(rows["Implementation Class UID"]) == [str(PYNETDICOM_IMPLEMENTATION_UID)]
    assert code(rows["Implementation Version Name"]) == [PYNETDICOM_IMPLEMENTATION_VERSION]
    assert code(rows["Application Context Name"]) == [ul.APPLICATION_CONTEXT]
    assert server.PDU_RECEIVE_MAX in numbers(rows["Maximum PDU size received"])
    assert dicom_server.ae.maximum_pdu_size == server.PDU_RECEIVE_MAX
    assert dicom_server.fast_policy.max_pdu == server.PDU_RECEIVE_MAX
    assert dicom_server.ae.implementation_class_uid == PYNETDICOM_IMPLEMENTATION_UID


def _default(f: Any) -> Any:
    value = f.default_factory() if f.default is MISSING else f.default
    return list(value) if isinstance(value, tuple) else value


def test_config_defaults(doc: dict[str, list[dict[str, str]]]) -> None:
    rows = {code(r["Key"])[0]: r for r in doc["config"]}
    assert set(rows) == {f.name for f in fields(DicomSection)}
    for f in fields(DicomSection):
        literal = code(rows[f.name]["Default"])[0]
        assert tomllib.loads(f"v = {literal}")["v"] == _default(f), f.name


def test_safety_defaults(doc: dict[str, list[dict[str, str]]]) -> None:
    rows = {code(r["Key"])[0]: r for r in doc["safety-config"]}
    cluster = ClusterSection()
    assert set(rows) == {"copies", "min_distance_miles"}
    for key, r in rows.items():
        assert tomllib.loads(f"v = {code(r['Default'])[0]}")["v"] == getattr(cluster, key)
    assert (f"by default {cluster.copies} copies, {cluster.min_distance_miles:g} miles"
            in doc_prose())


def test_defaults_quoted_in_prose() -> None:
    """`key` (default X) and `key`, default X in sentences: the [dicom] defaults."""
    dicom = DicomSection()
    quoted = re.findall(r"`(\w+)`(?:,| \()[^)`]*?default `?([\w.]+)", doc_prose())
    seen = set()
    for key, value in quoted:
        if not hasattr(dicom, key):
            continue
        seen.add(key)
        default = getattr(dicom, key)
        if isinstance(default, float):
            assert float(value) == default, key
        else:
            assert value == str(default), key
    assert {"ae_title", "max_associations", "commitment_timeout_s",
            "max_pending_per_address"} <= seen, seen


def test_limits(doc: dict[str, list[dict[str, str]]]) -> None:
    rows = doc["limits"]
    for r in rows:
        module, name = code(r["Code"])[0].split(".")
        value = getattr(importlib.import_module(f"pacsmesh.node.dicom.{module}"), name)
        assert float(value) in numbers(r["Value"]), r
    named = {code(r["Code"])[0] for r in rows}
    for must in ("server.PDU_RECEIVE_MAX", "query.MATCHES_MAX", "query.RETRIEVE_INSTANCES_MAX",
                 "candidates.STUDIES_EXAMINED_MAX", "convert.CONVERT_BYTES_MAX",
                 "server.TIMEOUT_S", "commitment.REFERENCES_PENDING_MAX"):
        assert must in named, must


# Numbers the prose repeats from the code: (pattern, the values its groups must be)
PROSE_NUMBERS: list[tuple[str, tuple[float, ...]]] = [
    (r"At most ([\d,]+) are sent", (query.MATCHES_MAX,)),
    (r"[Mm]ore than ([\d,]+) matches", (query.MATCHES_MAX,)),
    (r"examines at most ([\d,]+) studies and matches at most ([\d,]+) studies",
     (candidates.STUDIES_EXAMINED_MAX, query.STUDIES_MATCHED_MAX)),
    (r"[Mm]ore than ([\d,]+) instances (?:are refused|selected)",
     (query.RETRIEVE_INSTANCES_MAX,)),
    (r"At most ([\d,]+) referenced instances", (commitment.REFERENCES_PENDING_MAX,)),
    (r"More than ([\d,]+) instances would be awaited", (commitment.REFERENCES_PENDING_MAX,)),
    (r"larger than ([\d,]+) MiB", (convert.CONVERT_BYTES_MAX >> 20,)),
    (r"At most ([\d,]+) conversions", (convert.CONVERSIONS_AT_ONCE,)),
    (r"idle for ([\d.]+) s", (server.TIMEOUT_S,)),
    (r"each response for ([\d.]+) s", (server.TIMEOUT_S,)),
    (r"times out after ([\d.]+) s", (server.TIMEOUT_S,)),
    (r"time out after ([\d.]+) s", (commitment.REPORT_TIMEOUT_S,)),
    (r"up to ([\d,]+) attempts ([\d.]+) s apart",
     (commitment.REPORT_ATTEMPTS, commitment.REPORT_RETRY_S)),
    (r"at most ([\d,]+) at once delivering", (commitment.REPORT_THREADS,)),
    (r"at least every ([\d.]+) s", (commitment.POLL_S,)),
    (r"At most ([\d,]+) contexts are proposed", (retrieve.CONTEXTS_MAX,)),
    (r"within ([\d.]+) s fails its sub-operation", (retrieve.READ_TIMEOUT_S,)),
    (r"memory up to ([\d,]+) MiB", (fast_store.SPOOL_MEMORY_MAX >> 20,)),
    (r"at most ([\d,]+) \u00d7 `max_associations`", (admission.PENDING_PER_ASSOCIATION,)),
    (r"A-ASSOCIATE-RQ longer than ([\d,]+) MiB", (listener.ASSOCIATE_RQ_BYTES_MAX >> 20,)),
    (r"cut to ([\d,]+) characters", (status.ERROR_COMMENT_LEN_MAX,)),
    (r"once per ([\d.]+) s per address", (trail.THROTTLE_WINDOW_S,)),
]


def test_numbers_in_sentences() -> None:
    prose = doc_prose()
    for pattern, expected in PROSE_NUMBERS:
        found = re.findall(pattern, prose)
        assert found, f"no sentence matches {pattern!r}"
        for match in found:
            got = (match,) if isinstance(match, str) else match
            assert tuple(float(g.replace(",", "")) for g in got) == tuple(
                float(e) for e in expected), (pattern, match)


def _level(keyword: str) -> str:
    for level, names in (("PATIENT", query.PATIENT_FIELDS), ("STUDY", query.STUDY_FIELDS),
                         ("SERIES", query.SERIES_FIELDS), ("IMAGE", query.IMAGE_FIELDS)):
        if keyword in names:
            return level
    return COUNT_KEYS[keyword]


def test_c_find_keys(doc: dict[str, list[dict[str, str]]]) -> None:
    rows = {code(r["Attribute"])[0]: r for r in doc["find-keys"]}
    known = (set(query.PATIENT_FIELDS) | set(query.STUDY_FIELDS) | set(query.SERIES_FIELDS)
             | set(query.IMAGE_FIELDS) | query.RECORD_KEYS | query.STUDY_MORE_KEYS
             | set(COUNT_KEYS))
    assert set(rows) == known
    indexed = {"StudyInstanceUID", "StudyDate", *(kw for kw, _ in candidates.VALUE_INDEXES)}
    for keyword, r in rows.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None
        vr = dictionary_VR(tag)
        assert r["Tag"] == f"({tag >> 16:04X},{tag & 0xFFFF:04X})", keyword
        assert r["VR"] == vr, keyword
        assert r["Level"] == _level(keyword), keyword
        assert r["Wildcards"].startswith("yes") == (vr not in query.NO_WILDCARD_VRS), keyword
        assert r["Ranges"].startswith("yes") == (vr in query.RANGE_VRS), keyword
        assert r["Index"].startswith("yes") == (keyword in indexed), keyword
    levels = [r["Level"] for r in doc["find-levels"]]
    assert levels == list(query.LEVELS)


def test_c_find_control_keys(doc: dict[str, list[dict[str, str]]]) -> None:
    rows = {code(r["Attribute"])[0]: r for r in doc["control-keys"]}
    assert set(rows) == query.CONTROL_KEYS
    for keyword, r in rows.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None and r["Tag"] == f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def test_character_sets(doc: dict[str, list[dict[str, str]]]) -> None:
    terms = {code(r["Defined Term"])[0] for r in doc["character-sets"]}
    assert terms == set(python_encoding) - {""}


def test_tls_parameters() -> None:
    text = doc_text()
    assert f"`{listener.BCP195_CIPHERS}`" in text
    assert "TLS 1.2" in text


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
