"""C-FIND across character sets, against a real node: instances in Latin-1, UTF-8
(Greek, Chinese), GB18030, ISO 2022 Japanese and Cyrillic sent by dcmtk's storescu
and `pacsmesh put`, plus two stored the way a version from before character sets
did (Latin-1 mojibake, re-decoded by the node). Queried with dcmtk's findscu and a
pynetdicom SCU, each in its own character set: exact names, wildcards, other case,
other component groups; every answer must read back as the right text."""

# Cyrillic and Greek capitals that look Latin are the point here
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from pacsmesh.node.store import Store
from tests.charsetfiles import JAPANESE, instance_bytes, store_legacy, uid_of
from tests.clusterproc import wait_for
from tests.conftest import require_tool
from tests.dicomproc import dicom_node, find, tool, wait_listening
from tests.nodeproc import NodeProc, cli

GREEK = "Παπαδόπουλος^Γιώργος"
SUZUKI = "Suzuki^Hanako=鈴木^花子=すずき^はなこ"
REPAIR_TIMEOUT_S = 20.0
# study index -> (patient name, Specific Character Set), sent by storescu
SENT = {51: ("Müller^Jürgen", "ISO_IR 100"), 52: (GREEK, "ISO_IR 192"),
        53: ("Wang^XiaoDong=王^小东", "ISO_IR 192"), 55: (JAPANESE, "\\ISO 2022 IR 87"),
        56: ("Иванов^Иван", "ISO_IR 144")}
PUT = (54, "Li^Na=李^娜", "GB18030")  # sent with `pacsmesh put`
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass
class Archive:
    node: NodeProc
    port: int
    work: Path

    def findscu(self, *keys: str, charset: str = "ISO_IR 192", model: str = "-S"
                ) -> list[Dataset]:
        level = "PATIENT" if model == "-P" else "STUDY"
        return find(self.port, self.work / "rsp", f"QueryRetrieveLevel={level}",
                    f"SpecificCharacterSet={charset}", "StudyInstanceUID", "PatientID",
                    *keys, model=model)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    for name in ("echoscu", "storescu", "findscu"):
        require_tool(name)
    work = tmp_path_factory.mktemp("dicom-charset")
    node, port = dicom_node(work, allowed_calling_aets=["STORESCU", "ECHOSCU", "FINDSCU",
                                                        "PYFIND"])
    store = Store(node.data_dir)  # what an older version stored: mojibake in manifests
    try:
        store_legacy(store, instance_bytes(41, "Петров^Пётр", "ISO_IR 144",
                                           patient_id="ПЕТ001"))
        store_legacy(store, instance_bytes(42, SUZUKI, "\\ISO 2022 IR 87"))
    finally:
        store.close()
    files = []
    for index, (name, charset) in SENT.items():
        path = work / "in" / f"{index}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(instance_bytes(index, name, charset,
                                        description="КТ ГРУДИ" if index == 56 else ""))
        files.append(path)
    put = work / "put" / "54.dcm"
    put.parent.mkdir()
    put.write_bytes(instance_bytes(*PUT))
    node.start()
    try:
        wait_listening(port)
        res = tool("storescu", "-aet", "STORESCU", "-aec", "PACSMESH", "127.0.0.1", str(port),
                   *files)
        assert res.returncode == 0, res.stdout
        assert cli("put", str(put), node=node.address).returncode == 0
        yield Archive(node, port, work)
    finally:
        node.stop()


def pyfind(archive: Archive, charset: list[str] | None, level: str = "STUDY",
           **keys: Any) -> list[Dataset]:
    """A pynetdicom C-FIND SCU whose identifier pydicom encodes in `charset`."""
    model = PATIENT_ROOT_FIND if level == "PATIENT" else STUDY_ROOT_FIND
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="PACSMESH")
    assert assoc.is_established
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = ""
    ds.PatientID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    try:
        out = []
        for status, identifier in assoc.send_c_find(ds, model):
            assert status is not None and int(status.Status) in (0x0000, 0xFF00, 0xFF01)
            if identifier is not None:
                out.append(identifier)
        return out
    finally:
        assoc.release()


def one(rsp: list[Dataset], index: int) -> Dataset:
    assert [str(r.StudyInstanceUID) for r in rsp] == [uid_of(index)]
    return rsp[0]


def charset_of(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet", [])
    return [value] if isinstance(value, str) else list(value)


def test_findscu_in_utf8_case_wildcards_and_groups(archive: Archive) -> None:
    q = archive.findscu
    ds = one(q("PatientName=müller*"), 51)  # other case, beyond ASCII
    assert str(ds.PatientName) == "Müller^Jürgen" and charset_of(ds) == ["ISO_IR 192"]
    assert str(one(q(f"PatientName={GREEK.upper()}"), 52).PatientName) == GREEK
    assert str(one(q("PatientName=王*"), 53).PatientName) == "Wang^XiaoDong=王^小东"
    assert str(one(q("PatientName=山?^太郎"), 55).PatientName) == JAPANESE  # `?`: a character
    one(q("PatientName===やまだ*"), 55)  # in place: the phonetic group only
    assert q("PatientName==やまだ*") == []  # ... not the ideographic one
    one(q("PatientName=*^иван"), 56)
    assert q("PatientName=müller") == []  # no wildcard: the whole group


def test_findscu_in_latin1_gets_latin1_or_utf8(archive: Archive) -> None:
    upper = "MÜLLER^JÜRGEN".encode("latin-1").decode("utf-8", "surrogateescape")  # raw argv
    ds = one(archive.findscu(f"PatientName={upper}", charset="ISO_IR 100"), 51)
    assert str(ds.PatientName) == "Müller^Jürgen" and charset_of(ds) == ["ISO_IR 100"]
    # Greek does not fit in Latin-1: the answer comes in UTF-8, and says so
    ds = one(archive.findscu("PatientID=PM00052", "PatientName", charset="ISO_IR 100"), 52)
    assert str(ds.PatientName) == GREEK and charset_of(ds) == ["ISO_IR 192"]


def test_pynetdicom_in_the_query_character_set(archive: Archive) -> None:
    ds = one(pyfind(archive, ["", "ISO 2022 IR 87"], PatientName="やまだ^たろう"), 55)
    assert str(ds.PatientName) == JAPANESE and charset_of(ds) == ["", "ISO 2022 IR 87"]
    ds = one(pyfind(archive, ["ISO_IR 144"], PatientName="иванов*", StudyDescription=""), 56)
    assert str(ds.PatientName) == "Иванов^Иван" and ds.StudyDescription == "КТ ГРУДИ"
    assert charset_of(ds) == ["ISO_IR 144"]
    ds = one(pyfind(archive, ["GB18030"], PatientName="李*"), 54)  # stored by `pacsmesh put`
    assert str(ds.PatientName) == "Li^Na=李^娜" and charset_of(ds) == ["GB18030"]
    ds = one(pyfind(archive, None, PatientID="PM00053", PatientName=""), 53)  # no set asked
    assert str(ds.PatientName) == "Wang^XiaoDong=王^小东" and charset_of(ds) == ["ISO_IR 192"]


def test_text_stored_by_an_older_version_is_found(archive: Archive) -> None:
    """The node re-reads the headers of instances stored as Latin-1 mojibake; then
    they match at every level, by name and by the (indexed) patient id."""
    wait_for(lambda: pyfind(archive, ["ISO_IR 144"], PatientName="петров*"),
             REPAIR_TIMEOUT_S, "legacy Cyrillic name re-decoded")
    ds = one(pyfind(archive, ["ISO_IR 144"], PatientID="ПЕТ001", PatientName=""), 41)
    assert str(ds.PatientName) == "Петров^Пётр" and ds.PatientID == "ПЕТ001"
    wait_for(lambda: archive.findscu("PatientName==鈴木^花子"), REPAIR_TIMEOUT_S,
             "legacy Japanese name re-decoded")
    (patient,) = archive.findscu("PatientName=すずき*", model="-P")
    assert str(patient.PatientName) == SUZUKI
    (image,) = find(archive.port, archive.work / "rsp", "QueryRetrieveLevel=IMAGE",
                    "SpecificCharacterSet=ISO_IR 192", f"StudyInstanceUID={uid_of(42)}",
                    "SeriesInstanceUID", "SOPInstanceUID", "PatientName=SUZUKI*")
    assert str(image.PatientName) == SUZUKI
