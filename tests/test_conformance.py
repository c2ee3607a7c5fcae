"""docs/conformance.md, the DICOM Conformance Statement, checked against the code.

Hospital IT connects modalities on the strength of that document, so every fact it
states in a table is compared here with the code that decides it: the presentation
contexts the AE accepts (read from the pynetdicom AE the node builds, never bound to
a port), the transfer-syntax conversion rules, every status code, the defaults of
[dicom], the limits, the C-FIND keys and their matching, the character sets and the
storage SOP classes, the Storage Commitment request limits, refusals and report
delivery, and the version the document describes. No processes; well under 2 s.

A table is found by the marker `<!-- table: NAME -->` on the line before it. Two
tables are generated from the code (the accepted transfer syntaxes, Annex 8.7's
storage SOP classes); print them with `.venv/bin/python -m tests.test_conformance`.
"""

from __future__ import annotations

import importlib
import io
import itertools
import logging
import re
import sys
import tomllib
import zlib
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
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
from pynetdicom.dsutils import encode
from pynetdicom.presentation import negotiate_as_acceptor

from pacsmesh.node.config import ClusterSection, DicomSection
from pacsmesh.node.dicom import (
    admission,
    candidates,
    commit_delivery,
    commit_ledger,
    commit_outbox,
    commit_request,
    commit_verdict,
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

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "conformance.md"
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
    # an index environment the Storage Commitment ledger opens, and never writes to
    env = SimpleNamespace(open_db=lambda name: name)
    archive: Any = SimpleNamespace(audit=None, store=SimpleNamespace(catalog=None, env=env),
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
        assert (contexts[uid].scu_role, contexts[uid].scp_role) == (True, True), uid
    assert dicom_server.fast_policy.syntaxes == order
    assert dicom_server.fast_policy.supported == server.STORAGE_CLASSES
    # what storage does not accept of what pydicom knows: the JPIP Referenced syntaxes
    # the document names (with their names), and nothing else
    m = re.search(r"Not accepted for storage: (.*?)\. They carry a URL", doc_prose())
    assert m is not None, "no sentence names the syntaxes not accepted for storage"
    refused = code(m.group(1))
    assert set(refused) == set(ALL_TRANSFER_SYNTAXES) - set(order)
    assert all(ts in order or "JPIP" in UID(ts).name for ts in ALL_TRANSFER_SYNTAXES)
    for ts in refused:
        assert f"{UID(ts).name} `{ts}`" in m.group(1), ts
    # Verification: on the general path any syntax pydicom knows, JPIP included
    # (Table 4.2-5); on the storage-only path those of Table 4.2-6 (its one list)
    assert set(contexts[server.VERIFICATION].transfer_syntax) == set(ALL_TRANSFER_SYNTAXES)
    rq = ul.AssociateRq("PACSMESH", "MODALITY",
                        [ul.ProposedContext(1, server.VERIFICATION, refused)])
    assert fast_store.negotiate(rq, dicom_server.fast_policy)[0][1] == (
        ul.TRANSFER_SYNTAXES_NOT_SUPPORTED)
    # Table 4.2-6's note: which rows are uncompressed, which deflated
    m = re.search(r"Rows (\d+), (\d+) and (\d+) are uncompressed; row (\d+), "
                  r"Deflated Explicit VR Little Endian,", doc_prose())
    assert m is not None
    plain, deflated = [int(g) for g in m.groups()[:3]], int(m.group(4))
    assert order[deflated - 1] == convert.DEFLATED_LE
    assert {order[i - 1] for i in plain} == set(convert.UNCOMPRESSED) - {convert.DEFLATED_LE}


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
    """What each receive path answers a requester's SCP/SCU Role Selection for a
    storage class: pynetdicom on the general path; on the storage-only path whether
    fast_store.py serves the association at all, and then its own negotiation."""
    ours = supported(dicom_server)[CT]
    explicit = "1.2.840.10008.1.2.1"
    proposals = []
    for r in doc["role-selection"]:
        proposed = r["Proposed (SCU, SCP)"]
        roles: dict[UID, tuple[bool | None, bool | None]] | None = None
        scu = scp = 0
        if proposed != "none":
            scu, scp = (int(v) for v in re.findall(r"\d", proposed))
            roles = {CT: (bool(scu), bool(scp))}
        proposals.append((scu, scp) if roles else None)
        # the general path: pynetdicom
        rq = build_context(CT, [explicit])
        rq.context_id = 1
        result, _ = negotiate_as_acceptor([rq], [ours], roles)
        cx, outcome = result[0], r["General path"]
        if outcome.startswith("rejected"):
            assert cx.result == 0x01, r  # user rejection
        elif outcome.startswith("accepted; requester is SCU"):
            assert (cx.result, cx.as_scu, cx.as_scp) == (0, False, True), r
        elif outcome.startswith("accepted; requester is SCP only"):
            assert (cx.result, cx.as_scu, cx.as_scp) == (0, True, False), r
        elif outcome.startswith("accepted; requester is both SCU and SCP"):
            assert (cx.result, cx.as_scu, cx.as_scp) == (0, True, True), r
        else:
            pytest.fail(f"unknown outcome {outcome!r}")
        # the storage-only path (plaintext, storage and Verification only)
        fast_rq = ul.AssociateRq("PACSMESH", "MODALITY",
                                 [ul.ProposedContext(1, CT, [explicit])],
                                 roles={CT: (scu, scp)} if roles else {})
        outcome = r["Storage-only path"]
        served = fast_store.eligible(fast_rq, server.STORAGE_CLASSES)
        if outcome.startswith("not served here"):
            assert not served, r
        elif outcome.startswith("accepted; requester is SCU"):
            assert served, r
            assert fast_store.negotiate(fast_rq, dicom_server.fast_policy) == [
                (1, ul.ACCEPTANCE, explicit)], r
        else:
            pytest.fail(f"unknown outcome {outcome!r}")
    # every proposal a role selection item can make, and none
    assert sorted(proposals, key=str) == sorted(
        [None, (0, 0), (0, 1), (1, 0), (1, 1)], key=str)


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
    # no target has encapsulated pixel data; the one compressed is the deflated one
    assert not any(UID(ts).is_encapsulated for ts in targets)
    for r in doc["conversion-targets"]:
        ts = UID(code(r["UID"])[0])
        assert r["Transfer Syntax"] == ts.name
        assert (r["Compression"] != "none") == ts.is_deflated, r
        assert ts.is_deflated == (ts == convert.DEFLATED_LE)
    decoded = {code(r["UID"])[0]: r["Decoder"] for r in doc["lossless-decoders"]}
    assert decoded == {ts: DECODER_NAMES[p] for ts, p in convert.LOSSLESS_DECODERS.items()}
    # every lossy syntax is accepted, and the table says it is never decompressed
    fates = {code(r["UID"])[0]: r[FATE]
             for r in doc["storage-transfer-syntaxes"]}
    assert set(fates) >= convert.LOSSY
    assert all(fates[ts] == LOSSY for ts in convert.LOSSY)
    prose = doc_prose()
    assert "lossy data is never decompressed" in prose
    assert "no encapsulated (compressed) pixel data is produced; the one compressed " \
           "target is Deflated Explicit VR Little Endian" in prose


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
    code_statuses = {v for k, v in vars(commit_request).items() if k.startswith("STATUS_")}
    assert sorted(status_column(doc["commitment-statuses"])) == sorted(code_statuses)
    reasons = {v for k, v in vars(commit_verdict).items() if k.startswith("FAILURE_")}
    assert sorted(status_column(doc["commitment-failure-reasons"])) == sorted(reasons)
    events = {int(r["Event Type ID"]) for r in doc["commitment-events"]}
    assert events == {commit_verdict.EVENT_ALL_SUCCESS, commit_verdict.EVENT_FAILURES}
    text, prose = doc_text(), doc_prose()
    assert f"`{commit_delivery.STORAGE_COMMITMENT_PUSH}`" in text
    assert f"`{commit_delivery.WELL_KNOWN_INSTANCE_UID}` (the well-known instance)" in text
    group = commit_verdict.PRIVATE_GROUP
    creator = f"({group:04X},0010)"
    reason = f"({group:04X},{0x1000 | commit_verdict.PRIVATE_REASON:04X})"
    assert f"`{commit_verdict.PRIVATE_CREATOR}`" in text and creator in text and reason in text
    assert f"not safe within 3600 s: {commit_verdict.NOT_RECEIVED}" in prose
    # where the transactions are kept
    assert f"LMDB sub-database `{commit_ledger.DB_NAME.decode()}`" in prose


def _refusal(action_type: int, raw: bytes, deflated: bool = False) -> commit_request.Refused:
    with pytest.raises(commit_request.Refused) as caught:
        commit_request.read_request(action_type, raw, True, True, deflated)
    return caught.value


def _action_information(transaction_uid: str, *refs: tuple[str, str]) -> bytes:
    ds = Dataset()
    if transaction_uid:
        ds.TransactionUID = transaction_uid
    items = []
    for class_uid, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        if sop_instance:
            item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    raw = encode(ds, True, True)
    assert raw is not None
    return raw


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # a too long UID, on purpose
def test_storage_commitment_refusals(doc: dict[str, list[dict[str, str]]]) -> None:
    """Each refusal commit_request.py and commitment.py make has the status whose row
    in Table 4.2-16 names its cause, and an Error Comment that fits (0000,0902)."""
    when = {statuses(r["Status"])[0]: " ".join(r["When"].split())
            for r in doc["commitment-statuses"]}
    ok = _action_information("1.2.3", (str(CT), "1.2.3.4"))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(b"\0" * (commit_request.REQUEST_BYTES_MAX + 1)) + deflater.flush()
    many = cast(Any, {"TransactionUID": "1.2.3",  # the count is checked before the items
                      "ReferencedSOPSequence": [None] * (
                          commit_request.REFERENCES_PER_REQUEST_MAX + 1)})
    cases: list[tuple[str, commit_request.Refused]] = [
        ("Action Type ID other than 1", _refusal(2, ok)),
        ("No Action Information", _refusal(1, b"")),
        ("does not decode", _refusal(1, b"\0" * 7)),
        ("does not inflate", _refusal(1, b"\xff" * 100, deflated=True)),
        ("no Transaction UID", _refusal(1, _action_information("", (str(CT), "1.2.3.4")))),
        ("an empty Referenced SOP Sequence", _refusal(1, _action_information("1.2.3"))),
        ("an item without Referenced SOP Instance UID",
         _refusal(1, _action_information("1.2.3", (str(CT), "")))),
        ("a UID longer than 64 characters",
         _refusal(1, _action_information("1.2.3", (str(CT), "1." * 40)))),
        ("Action Information larger than",
         _refusal(1, b"\0" * (commit_request.REQUEST_BYTES_MAX + 1))),
        ("Action Information larger than", _refusal(1, bomb, deflated=True)),
    ]
    with pytest.raises(commit_request.Refused) as caught:
        commit_request.parse_request(many)
    cases.append(("More than 50,000 references", caught.value))
    for phrase, refused in cases:
        assert phrase in when[refused.status], (phrase, hex(refused.status), str(refused))
        assert len(commit_request.error_comment(str(refused))) <= (
            commit_request.ERROR_COMMENT_MAX)
    assert commit_request.error_comment("x" * 100).endswith("...")
    assert commit_request.ERROR_COMMENT_MAX == status.ERROR_COMMENT_LEN_MAX
    assert commit_request.read_request(1, ok, True, True, False).transaction_uid == "1.2.3"

    # what commitment.py refuses once the request reads well
    class Ledger:
        def __init__(self, fail: Exception | None = None) -> None:
            self.fail = fail

        def put(self, txn: Any) -> None:
            if self.fail is not None:
                raise self.fail

        def delete(self, txns: Any) -> int:
            return 0

        def close(self) -> None:
            pass

    def answer(ledger: Ledger, references_max: int) -> Dataset:
        archive: Any = SimpleNamespace(store=None)
        service = commitment.Commitment(archive, "PACSMESH", {}, 3600.0,
                                        ledger=cast(Any, ledger),
                                        references_max=references_max)
        event = SimpleNamespace(
            assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY",
                                                            address="10.0.0.9", port=104)),
            action_type=1, request=SimpleNamespace(ActionInformation=io.BytesIO(ok)),
            context=SimpleNamespace(transfer_syntax=UID("1.2.840.10008.1.2")))
        try:
            return service.handle_n_action(event)[0]
        finally:
            service._reports.shutdown()

    limit = answer(Ledger(), references_max=0)
    assert "more than 200,000 instances would be awaiting commitment" in when[limit.Status]
    assert "await commitment" in limit.ErrorComment
    stopping = answer(Ledger(commit_ledger.LedgerClosed("stopping")), references_max=10)
    assert "the node is stopping" in when[stopping.Status]
    assert answer(Ledger(), references_max=10).Status == commit_request.STATUS_SUCCESS


def test_storage_commitment_report_delivery(doc: dict[str, list[dict[str, str]]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The association a report goes out on (Table 4.2-4, read from what
    commit_delivery.py asks pynetdicom for) and the outbox's batches, delays and
    give-up time."""
    seen: dict[str, Any] = {}

    class FakeAE:
        def __init__(self, ae_title: str) -> None:
            seen["calling"] = ae_title

        def associate(self, host: str, port: int, *, contexts: list[Any], ae_title: str,
                      ext_neg: list[Any], evt_handlers: Any) -> Any:
            seen.update(address=(host, port), contexts=contexts, called=ae_title,
                        roles=ext_neg, timeouts={self.acse_timeout, self.dimse_timeout,
                                                 self.network_timeout})
            return SimpleNamespace(is_established=False)

        acse_timeout = dimse_timeout = network_timeout = 0.0

    monkeypatch.setattr(commit_delivery, "AE", FakeAE)
    with pytest.raises(ConnectionError):
        commit_delivery.send_to_destination("PACSMESH", "MODALITY", "10.0.0.9:104", [], [],
                                            lambda: False)
    assert (seen["calling"], seen["called"], seen["address"]) == (
        "PACSMESH", "MODALITY", ("10.0.0.9", 104))
    assert seen["timeouts"] == {commit_delivery.REPORT_TIMEOUT_S}
    [row] = doc["commitment-report-context"]
    [cx] = seen["contexts"]
    assert code(row["Abstract Syntax"]) == [str(cx.abstract_syntax)]
    assert cx.abstract_syntax == commit_delivery.STORAGE_COMMITMENT_PUSH
    assert row["Transfer Syntaxes"] == ", ".join(
        UID(ts).name for ts in cx.transfer_syntax) + " (one context)"
    [role] = seen["roles"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (
        commit_delivery.STORAGE_COMMITMENT_PUSH, False, True)
    assert row["Role"] == "SCP"
    assert row["Extended Negotiation"] == "SCP/SCU Role Selection: SCU role 0, SCP role 1"

    # the outbox: batches per association, the delays, the give-up time
    box = commit_outbox.Outbox()
    assert box.batch_max == commit_outbox.REPORTS_PER_ASSOCIATION_MAX
    assert box.keep_s == commit_outbox.REPORT_KEEP_S
    delays = [commit_outbox.retry_delay_s(n) for n in range(1, 12)]
    assert delays[0] == commit_outbox.RETRY_FIRST_S
    assert all(b == min(2 * a, commit_outbox.RETRY_MAX_S)
               for a, b in itertools.pairwise(delays))
    assert delays[-1] == commit_outbox.RETRY_MAX_S
    txn = commit_verdict.Transaction("1.2.3", "MODALITY", [], 10.0, 3610.0)
    assert commit_outbox.give_up_at(txn) == 3610.0 + commit_outbox.REPORT_KEEP_S
    service: Any = SimpleNamespace(destinations={"MODALITY": "10.0.0.9:104"})
    assert commitment.Commitment.route_of(service, txn).kind == commit_outbox.DESTINATION
    other = commit_verdict.Transaction("1.2.3", "CT1", [], 10.0, 3610.0, who="AE:CT1")
    assert commitment.Commitment.route_of(service, other) == commit_outbox.Route(
        commit_outbox.REQUESTER, "AE:CT1")


def test_version_label() -> None:
    """The document describes the version pyproject.toml names, which the README's
    changelog describes."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["version"]
    head = doc_text().splitlines()[2]
    assert head.endswith(f"· pacsmesh {version}"), head
    revisions = tables(doc_text())["revisions"]
    assert revisions[-1]["pacsmesh"] == version
    assert f"Document revision {revisions[-1]['Revision']} · {revisions[-1]['Date']} " in head
    assert [r["Revision"] for r in revisions] == [str(i) for i in range(1, len(revisions) + 1)]
    changelog = (ROOT / "README.md").read_text(encoding="utf-8").split("## Changelog", 1)[1]
    assert f"\n- {version}:" in changelog


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
                 "server.TIMEOUT_S", "commitment.REFERENCES_PENDING_MAX",
                 "commit_request.REFERENCES_PER_REQUEST_MAX", "commit_request.REQUEST_BYTES_MAX",
                 "commit_request.ERROR_COMMENT_MAX", "commit_outbox.REPORTS_PER_ASSOCIATION_MAX",
                 "commit_outbox.RETRY_FIRST_S", "commit_outbox.RETRY_MAX_S",
                 "commit_outbox.REPORT_KEEP_S", "commit_delivery.REPORT_TIMEOUT_S",
                 "commitment.REPORT_THREADS"):
        assert must in named, must


# Numbers the prose repeats from the code: (pattern, the values its groups must be)
PROSE_NUMBERS: list[tuple[str, tuple[float, ...]]] = [
    (r"At most ([\d,]+) are sent", (query.MATCHES_MAX,)),
    (r"[Mm]ore than ([\d,]+) matches", (query.MATCHES_MAX,)),
    (r"examines at most ([\d,]+) studies and matches at most ([\d,]+) studies",
     (candidates.STUDIES_EXAMINED_MAX, query.STUDIES_MATCHED_MAX)),
    (r"[Mm]ore than ([\d,]+) instances (?:are refused|selected)",
     (query.RETRIEVE_INSTANCES_MAX,)),
    (r"At most ([\d,]+) referenced instances are held", (commitment.REFERENCES_PENDING_MAX,)),
    (r"[Mm]ore than ([\d,]+) instances would be awaiting",
     (commitment.REFERENCES_PENDING_MAX,)),
    (r"at most ([\d,]+) references", (commit_request.REFERENCES_PER_REQUEST_MAX,)),
    (r"[Mm]ore than ([\d,]+) references", (commit_request.REFERENCES_PER_REQUEST_MAX,)),
    (r"Action Information larger than ([\d,]+) bytes", (commit_request.REQUEST_BYTES_MAX,)),
    (r"UID (?:may be )?longer than ([\d,]+) characters", (commit_request.UID_LENGTH_MAX,)),
    (r"Error Comment \(0000,0902\), at most ([\d,]+) characters",
     (commit_request.ERROR_COMMENT_MAX,)),
    (r"larger than ([\d,]+) MiB", (convert.CONVERT_BYTES_MAX >> 20,)),
    (r"At most ([\d,]+) conversions", (convert.CONVERSIONS_AT_ONCE,)),
    (r"idle for ([\d.]+) s", (server.TIMEOUT_S,)),
    (r"each response for ([\d.]+) s", (server.TIMEOUT_S,)),
    (r"times out after ([\d.]+) s", (server.TIMEOUT_S,)),
    (r"association time out after ([\d.]+) s", (commit_delivery.REPORT_TIMEOUT_S,)),
    (r"up to ([\d,]+) (?:reports per association|at a time)",
     (commit_outbox.REPORTS_PER_ASSOCIATION_MAX,)),
    (r"tried again after ([\d.]+) s, doubling after each failed attempt in a row up to "
     r"every ([\d.]+) min", (commit_outbox.RETRY_FIRST_S, commit_outbox.RETRY_MAX_S / 60)),
    (r"not delivered ([\d.]+) h after", (commit_outbox.REPORT_KEEP_S / 3600,)),
    (r"at most ([\d,]+) at once delivering", (commitment.REPORT_THREADS,)),
    (r"checks pending transactions every ([\d.]+) s", (commitment.POLL_S,)),
    (r"at most ([\d.]+) % of one core", (commitment.POLL_LOAD_MAX * 100,)),
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
