"""The upper layer codec of the fast C-STORE path (node/dicom/ul.py), without IO:
what pynetdicom encodes we parse, what we encode pynetdicom parses, and garbage
raises UlError (never anything else)."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pynetdicom import build_context, pdu, pdu_primitives

from pacsmesh.node.dicom import fast_store, ul
from tests.fuzz import fuzz, garbage

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def pynetdicom_rq(contexts: list[tuple[str, list[str]]], *, role: bool = False,
                  default_role: bool = False,
                  calling: str = "MODALITY", max_pdu: int = 16384) -> bytes:
    prim = pdu_primitives.A_ASSOCIATE()
    prim.application_context_name = ul.APPLICATION_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = "PACSMESH"
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    length = pdu_primitives.MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = pdu_primitives.ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.3.4"
    info: list[Any] = [length, impl]
    if role:
        item = pdu_primitives.SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid, item.scu_role, item.scp_role = CT, False, True
        info.append(item)
    if default_role:  # what some modalities send: "I am the SCU", the default anyway
        item = pdu_primitives.SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid, item.scu_role, item.scp_role = CT, True, False
        info.append(item)
    prim.user_information = info
    out = pdu.A_ASSOCIATE_RQ()
    out.from_primitive(prim)
    return bytes(out.encode())


def test_parses_what_pynetdicom_requests() -> None:
    raw = pynetdicom_rq([(CT, [EXPLICIT, IMPLICIT]), (MR, [JPEG_LS])], max_pdu=65536)
    rq = ul.parse_associate_rq(raw[6:])
    assert (rq.calling_ae, rq.called_ae, rq.max_pdu) == ("MODALITY", "PACSMESH", 65536)
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, CT, [EXPLICIT, IMPLICIT]), (3, MR, [JPEG_LS])]
    assert rq.implementation_class == "1.2.3.4"
    assert not rq.roles and not rq.extended


def test_a_retrieving_requester_is_not_for_the_fast_path() -> None:
    """A C-GET requester asks for the storage SCP role: pynetdicom serves it."""
    supported = frozenset({CT, MR})
    plain = ul.parse_associate_rq(pynetdicom_rq([(CT, [EXPLICIT])])[6:])
    getter = ul.parse_associate_rq(pynetdicom_rq([(CT, [EXPLICIT])], role=True)[6:])
    finder = ul.parse_associate_rq(pynetdicom_rq([("1.2.840.10008.5.1.4.1.2.2.1",
                                                   [EXPLICIT])])[6:])
    assert getter.roles == {CT: (0, 1)}
    assert fast_store.eligible(plain, supported)
    modality = ul.parse_associate_rq(pynetdicom_rq([(CT, [EXPLICIT])], default_role=True)[6:])
    assert modality.roles == {CT: (1, 0)} and fast_store.eligible(modality, supported)
    assert not fast_store.eligible(getter, supported)
    assert not fast_store.eligible(finder, supported)


def test_pynetdicom_reads_our_accept() -> None:
    rq = ul.parse_associate_rq(pynetdicom_rq([(CT, [IMPLICIT, EXPLICIT]), (MR, [JPEG_LS]),
                                              ("1.2.3.999", [EXPLICIT])])[6:])
    policy = fast_store.Policy(frozenset({CT, MR}), [EXPLICIT, IMPLICIT], frozenset(),
                               1 << 20, lambda: True, lambda: None)
    results = fast_store.negotiate(rq, policy)
    assert results == [(1, ul.ACCEPTANCE, EXPLICIT),  # our preference, not the order asked
                       (3, ul.TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEG_LS),
                       (5, ul.ABSTRACT_SYNTAX_NOT_SUPPORTED, EXPLICIT)]
    raw = ul.associate_ac(rq, results, 1 << 20, "1.2.826.0.1.3680043.9.3811.3.0.4", "X")
    ac = pdu.A_ASSOCIATE_AC()
    ac.decode(raw)
    prim = ac.to_primitive()
    got = [(cx.context_id, cx.result, cx.transfer_syntax[0])
           for cx in prim.presentation_context_definition_results_list]
    assert got == results
    assert prim.maximum_length_received == 1 << 20
    assert prim.calling_ae_title == "MODALITY"


def test_rejects_and_release_decode() -> None:
    rj = pdu.A_ASSOCIATE_RJ()
    rj.decode(ul.associate_rj(*ul.REJECT_LIMIT))
    assert (rj.result, rj.source, rj.reason_diagnostic) == ul.REJECT_LIMIT
    assert ul.release_rp() == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def test_pdvs_of_a_p_data_pdu() -> None:
    body = (struct.pack(">LBB", 6, 1, 0x03) + b"abcd"
            + struct.pack(">LBB", 3, 3, 0x00) + b"x"
            + struct.pack(">LBB", 2, 3, 0x02))
    assert [(p.context_id, p.command, p.last, body[p.start:p.end])
            for p in ul.pdvs(body)] == [(1, True, True, b"abcd"), (3, False, False, b"x"),
                                        (3, False, True, b"")]


def test_commands_round_trip_through_pydicom() -> None:
    raw = ul.response(ul.C_STORE_RSP, 7, CT, "1.2.3.4.5", 0xC000, "dataset is malformed")
    ds = read_dataset(DicomBytesIO(raw), is_implicit_VR=True,  # type: ignore[arg-type]
                      is_little_endian=True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xC000)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT, "1.2.3.4.5")
    assert ds.ErrorComment == "dataset is malformed"
    assert ds.CommandGroupLength == len(raw) - 12
    rq = Dataset()
    rq.AffectedSOPClassUID, rq.CommandField, rq.MessageID = CT, 1, 9
    rq.Priority, rq.CommandDataSetType, rq.AffectedSOPInstanceUID = 0, 0, "1.2.3"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    from pydicom.filewriter import write_dataset
    write_dataset(buf, rq)
    got = ul.parse_command(buf.getvalue())
    assert (got[0x0100], got[0x0110], got[0x0002], got[0x1000]) == (1, 9, CT, "1.2.3")


SEEDS = [pynetdicom_rq([(CT, [EXPLICIT, IMPLICIT])])[6:],
         pynetdicom_rq([(CT, [EXPLICIT])], role=True)[6:]]


@fuzz()
@given(garbage(SEEDS))
def test_garbage_requests_raise_ul_error_only(data: bytes) -> None:
    with contextlib.suppress(ul.UlError):
        ul.parse_associate_rq(data)


@fuzz()
@given(st.binary(max_size=512))
def test_garbage_pdus_and_commands_raise_ul_error_only(data: bytes) -> None:
    for parse in (ul.pdvs, ul.parse_command):
        with contextlib.suppress(ul.UlError):
            parse(data)


@pytest.mark.parametrize("body", [b"", b"\x00" * 5, b"\x00\x00\x00\x01\x01\x03"])
def test_short_or_empty_pdvs_are_refused(body: bytes) -> None:
    with pytest.raises(ul.UlError):
        ul.pdvs(body)


@pytest.mark.parametrize(("instance", "ae"), [
    ("1.2.826.0.1.3680043.10.1455.1.7.1.1.1", "STORESCU"),  # odd length UID
    ("1.2.826.0.1.3680043.10.1455.1.7.1.1.12", "CT1"),  # even; odd AE
    ("1.2.3", ""),  # no calling AE
])
def test_file_meta_is_what_pydicom_writes(instance: str, ae: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID
    from pynetdicom.dsutils import encode_file_meta

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(instance)
    meta.TransferSyntaxUID = UID(EXPLICIT)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.9.3811.3.0.4")
    meta.ImplementationVersionName = "PYNETDICOM_304"
    if ae:
        meta.SourceApplicationEntityTitle = ae
    assert ul.file_meta(CT, instance, EXPLICIT, "1.2.826.0.1.3680043.9.3811.3.0.4",
                        "PYNETDICOM_304", ae) == encode_file_meta(meta)
