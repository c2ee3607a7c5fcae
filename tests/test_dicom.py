"""DICOM interoperability: real dcmtk clients (echoscu, storescu, findscu, getscu,
movescu, storescp) and pynetdicom as the Storage Commitment SCU, against real
node processes on loopback. Every wait is bounded."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from pacsmesh.sample import StudySpec, make_instance, study_uid, write_study
from tests.clusterproc import (
    CITIES,
    Cluster,
    api_locate,
    cluster_settings,
    holder_ids,
    started,
    wait_for,
)
from tests.conftest import require_tool
from tests.dicomproc import (
    CommitmentScu,
    dataset_digests,
    dcmtk_env,
    dicom_node,
    find,
    private_reason,
    send_partial_store,
    storescp,
    tool,
    wait_listening,
)
from tests.nodeproc import NodeProc, cli, cli_json, free_port

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
ALLOWED = ["STORESCU", "ECHOSCU", "FINDSCU", "GETSCU", "MOVESCU", "MODALITY"]
COMMITMENT_TIMEOUT_S = 3.0
MAX_ASSOCIATIONS = 5


@dataclass(frozen=True)
class Sample:
    uid: str
    files: list[Path]

    def digests(self) -> dict[str, bytes]:
        return dataset_digests(self.files)

    def sops(self) -> list[str]:
        return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in self.files]


def make_sample(root: Path, spec: StudySpec) -> Sample:
    return Sample(study_uid(spec), write_study(root / f"study{spec.study_index}", spec))


@dataclass
class Site:
    node: NodeProc
    port: int
    viewer_port: int
    work: Path
    a: Sample  # ALPHA^ANNE, CT, 2025-03-12, two series of three
    b: Sample  # BETA^BOB, MR, 2024-06-15, one series of four


def storescu(port: int, files: list[Path], aet: str = "STORESCU") -> str:
    res = tool("storescu", "-v", "-aet", aet, "-aec", "PACSMESH", "127.0.0.1", str(port), *files)
    assert res.returncode == 0, res.stdout
    return res.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One node with a DICOM listener, holding two small studies sent by storescu;
    killed (SIGKILL) right after storescu reported success, then restarted: what
    was acknowledged must have been durable."""
    for name in ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp"):
        require_tool(name)
    work = tmp_path_factory.mktemp("dicom-site")
    viewer_port = free_port()
    node, port = dicom_node(
        work, allowed_calling_aets=ALLOWED, destinations={"VIEWER": f"127.0.0.1:{viewer_port}"},
        max_associations=MAX_ASSOCIATIONS, commitment_timeout_s=COMMITMENT_TIMEOUT_S)
    a = make_sample(work, StudySpec(study_index=101, instances=6, series=2, rows=64, columns=64,
                                    patient_id="PMA00001", patient_name="ALPHA^ANNE",
                                    study_date="20250312", seed=11))
    b = make_sample(work, StudySpec(study_index=102, instances=4, rows=64, columns=64,
                                    patient_id="PMB00002", patient_name="BETA^BOB",
                                    modality="MR", study_date="20240615", seed=11))
    node.start()
    try:
        storescu(port, a.files)
        storescu(port, b.files)
        node.kill()  # no clean shutdown: only what was durable survives
        node.start()
        wait_listening(port)
        yield Site(node, port, viewer_port, work, a, b)
    finally:
        node.stop()


# ---- pure logic: matching and commitment verdicts (no processes) ----------------------


@pytest.mark.parametrize(("vr", "wanted", "value", "matches"), [
    ("PN", ("DOE*",), "DOE^JANE", True),
    ("PN", ("doe^jane",), "DOE^JANE", True),  # PN ignores case
    ("LO", ("pm*",), "PM0001", False),  # other VRs do not
    ("LO", ("PM?001",), "PM0001", True),
    ("UI", ("1.2.3", "1.2.4"), "1.2.4", True),  # a list of UIDs
    ("UI", ("1.2.*",), "1.2.3", False),  # no wildcards in UIDs
    ("DA", ("20250101-20251231",), "20250312", True),
    ("DA", ("-20241231",), "20250312", False),
    ("DA", ("20250312-",), "20250312", True),
    ("TM", ("09-12",), "123000", True),  # an upper bound covers its precision
    ("TM", ("09-12",), "130000", False),
    ("DA", ("20250101-",), "", False),  # an empty value matches no range
    ("CS", ("",), "CT", True),  # universal
])
def test_value_matching(vr: str, wanted: tuple[str, ...], value: str, matches: bool) -> None:
    from pacsmesh.node.dicom.query import Key, value_matches

    assert value_matches(Key("X", vr, wanted), value) is matches


def test_commitment_verdicts() -> None:
    from pacsmesh.node.dicom.commit_request import Reference
    from pacsmesh.node.dicom.commit_verdict import (
        EVENT_ALL_SUCCESS,
        EVENT_FAILURES,
        Transaction,
        event_report,
        judge,
    )

    stored = {"1.1": ("9.1", CT_IMAGE_STORAGE), "1.2": ("9.2", CT_IMAGE_STORAGE)}
    safe_studies = {"9.1"}

    def lookup(sop: str) -> tuple[str, str] | None:
        return stored.get(sop)

    def safety(sop: str) -> tuple[bool, str]:
        return (True, "") if stored[sop][0] in safe_studies else (False, "1 of 3 safe")

    refs = [Reference(CT_IMAGE_STORAGE, "1.1"), Reference(CT_IMAGE_STORAGE, "1.2"),
            Reference("1.2.840.10008.5.1.4.1.1.4", "1.1"), Reference(CT_IMAGE_STORAGE, "1.3")]
    txn = Transaction("7.7", "CT1", refs, 0.0, 10.0)
    assert not judge(txn, 5.0, lookup, safety)  # 1.2 and 1.3 may still become safe
    assert txn.safe == {refs[0]}
    safe_studies.add("9.2")
    assert not judge(txn, 6.0, lookup, safety)
    assert txn.safe == {refs[0], refs[1]}
    assert judge(txn, 10.0, lookup, safety)  # the deadline: 1.3 never arrived
    event, info = event_report(txn)
    assert event == EVENT_FAILURES
    assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [
        "1.1", "1.2"]
    failed = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID),
               int(i.FailureReason)) for i in info.FailedSOPSequence]
    assert failed == [("1.2.840.10008.5.1.4.1.1.4", "1.1", 0x0119),  # stored as CT, not MR
                      (CT_IMAGE_STORAGE, "1.3", 0x0112)]
    assert "not received" in private_reason(info.FailedSOPSequence[1])

    ok = Transaction("7.8", "CT1", refs[:2], 0.0, 10.0)
    assert judge(ok, 1.0, lookup, safety)  # all safe: reported before the deadline
    assert event_report(ok)[0] == EVENT_ALL_SUCCESS


# ---- C-ECHO and association policy ---------------------------------------------------------


def test_echo_and_unknown_calling_ae_is_rejected(site: Site) -> None:
    ok = tool("echoscu", "-aet", "ECHOSCU", "127.0.0.1", str(site.port))
    assert ok.returncode == 0, ok.stdout
    bad = tool("echoscu", "-aet", "INTRUDER", "127.0.0.1", str(site.port))
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stdout, bad.stdout


def test_association_limit_rejects_with_local_limit_exceeded(site: Site) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", site.port, ae_title="PACSMESH")
            for _ in range(MAX_ASSOCIATIONS)]
    try:
        assert all(a.is_established for a in held)
        over = tool("echoscu", "-aet", "ECHOSCU", "127.0.0.1", str(site.port))
        assert over.returncode != 0
        assert "Local Limit Exceeded" in over.stdout, over.stdout
    finally:
        for a in held:
            a.release()

    def echo_ok() -> bool:
        return tool("echoscu", "-aet", "ECHOSCU", "127.0.0.1", str(site.port)).returncode == 0

    wait_for(echo_ok, 10, "echo to work again once the associations are released")


# ---- C-STORE ---------------------------------------------------------------------------------


def test_stored_as_received_with_a_valid_file_meta(site: Site, tmp_path: Path) -> None:
    for sample in (site.a, site.b):
        cli("get", sample.uid, "--out", str(tmp_path), node=site.node.address, check=True)
        restored = sorted((tmp_path / sample.uid).glob("*/*.dcm"))
        assert dataset_digests(restored) == sample.digests()
        for f in restored:
            raw = f.read_bytes()
            assert raw[128:132] == b"DICM"
            group_len = struct.unpack("<I", raw[140:144])[0]
            assert raw[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
            _, offset = split_dataset(f)
            assert offset == 144 + group_len, "file meta group length is wrong"
            ds = pydicom.dcmread(f)
            meta = ds.file_meta
            assert meta.TransferSyntaxUID == EXPLICIT_LE  # what was negotiated and sent
            assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert str(meta.SourceApplicationEntityTitle).strip() == "STORESCU"
            assert meta.ImplementationClassUID


@pytest.mark.parametrize("commitment", [False, True], ids=["storage-only", "mixed"])
def test_a_modality_stating_its_scu_role_can_store(site: Site, commitment: bool) -> None:
    """Some modalities send a role selection item saying they are the SCU (the
    default). Both receive paths accept it: the storage-only one, and pynetdicom's
    for an association that also proposes Storage Commitment."""
    from pynetdicom import build_role

    spec = StudySpec(study_index=109 + commitment, instances=1, rows=16, columns=16)
    ds = make_instance(spec, 1, 1)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    if commitment:
        ae.add_requested_context("1.2.840.10008.1.20.1")
    assoc = ae.associate("127.0.0.1", site.port, ae_title="PACSMESH",
                         ext_neg=[build_role(CT_IMAGE_STORAGE, scu_role=True)])
    try:
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000, status
    finally:
        assoc.release()
    assert find(site.port, site.work / f"find-role-{commitment}", "QueryRetrieveLevel=IMAGE",
                f"SOPInstanceUID={ds.SOPInstanceUID}", model="-P")


def test_four_concurrent_associations(site: Site, study_dir: Path) -> None:
    files = sorted(study_dir.rglob("*.dcm"))
    groups = [files[i::4] for i in range(4)]
    procs = [subprocess.Popen(
        ["storescu", "-aet", "STORESCU", "127.0.0.1", str(site.port), *map(str, g)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env()) for g in groups]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rsp = find(site.port, site.work / "find-conc", "QueryRetrieveLevel=STUDY",
               f"StudyInstanceUID={uid}", "NumberOfStudyRelatedInstances")
    assert [int(r.NumberOfStudyRelatedInstances) for r in rsp] == [len(files)]


def test_unknown_sop_class_is_rejected_at_association(site: Site) -> None:
    ds = make_instance(StudySpec(study_index=103, instances=1, rows=16, columns=16), 1, 1)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.3.4.5.6.7")
    path = site.work / "unknown-class.dcm"
    ds.save_as(path, enforce_file_format=True)
    res = tool("storescu", "-aet", "STORESCU", "127.0.0.1", str(site.port), path)
    assert res.returncode != 0
    assert "No presentation context" in res.stdout, res.stdout
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.3.4.5.6.7")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", site.port, ae_title="PACSMESH")
    try:
        assert assoc.is_established
        (rejected,) = assoc.rejected_contexts
        assert rejected.abstract_syntax == "1.2.3.4.5.6.7"
        assert rejected.result == 0x03  # abstract syntax not supported
    finally:
        assoc.release()


def test_malformed_datasets_are_refused_and_not_stored(site: Site) -> None:
    spec = StudySpec(study_index=104, instances=1, rows=16, columns=16)
    no_study = make_instance(spec, 1, 1)
    del no_study.StudyInstanceUID
    path = site.work / "no-study.dcm"
    no_study.save_as(path, enforce_file_format=True)
    res = tool("storescu", "-v", "-aet", "STORESCU", "127.0.0.1", str(site.port), path)
    assert "Error: CannotUnderstand" in res.stdout, res.stdout

    # a dataset cut off in its pixel data, sent byte for byte as the file has it
    whole = make_instance(spec, 1, 2)
    cut = site.work / "cut.dcm"
    whole.save_as(cut, enforce_file_format=True)
    cut.write_bytes(cut.read_bytes()[:-100])
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", site.port, ae_title="PACSMESH")
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, do not re-encode
    try:
        status = assoc.send_c_store(cut)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
        assoc.release()
    assert status.Status == 0xC000
    assert "truncated" in str(status.ErrorComment)
    for sop in (no_study.SOPInstanceUID, whole.SOPInstanceUID):
        assert not find(site.port, site.work / "find-bad", "QueryRetrieveLevel=IMAGE",
                        f"SOPInstanceUID={sop}", model="-P")


def test_peer_dropping_the_association_mid_transfer(site: Site) -> None:
    spec = StudySpec(study_index=105, instances=1, rows=256, columns=256)
    ds = make_instance(spec, 1, 1)
    path = site.work / "dropped.dcm"
    ds.save_as(path, enforce_file_format=True)
    send_partial_store(site.port, path)
    ok = tool("echoscu", "-aet", "ECHOSCU", "127.0.0.1", str(site.port))
    assert ok.returncode == 0, ok.stdout
    assert not find(site.port, site.work / "find-drop", "QueryRetrieveLevel=IMAGE",
                    f"SOPInstanceUID={ds.SOPInstanceUID}", model="-P")
    assert site.node.proc is not None and site.node.proc.poll() is None


# ---- C-FIND ------------------------------------------------------------------------------------


def _uids(rsp: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(keyword, "")) for r in rsp}


def test_find_study_level_wildcards_ranges_and_lists(site: Site) -> None:
    out = site.work / "find-study"
    a, b = site.a.uid, site.b.uid

    def study(*keys: str) -> list[Dataset]:
        return find(site.port, out, "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                    "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                    "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                    "NumberOfStudyRelatedSeries", *keys)

    (only_a,) = study("PatientName=ALPHA*")
    assert str(only_a.StudyInstanceUID) == a
    assert str(only_a.PatientName) == "ALPHA^ANNE" and only_a.PatientID == "PMA00001"
    assert only_a.StudyDate == "20250312" and only_a.StudyTime == "120000"
    assert only_a.ModalitiesInStudy == "CT"
    assert int(only_a.NumberOfStudyRelatedInstances) == 6
    assert int(only_a.NumberOfStudyRelatedSeries) == 2
    assert only_a.RetrieveAETitle == "PACSMESH"
    assert _uids(study("PatientName=*a^*")) & {a, b} == {a, b}  # PN ignores case
    assert _uids(study("PatientName=B?TA^BOB")) == {b}
    assert _uids(study("StudyDate=20250101-20251231")) == {a}
    assert _uids(study("StudyDate=-20241231")) == {b}
    assert _uids(study("StudyDate=20240615")) == {b}
    assert _uids(study(f"StudyInstanceUID={a}\\{b}")) == {a, b}
    assert _uids(study("ModalitiesInStudy=MR", "PatientID=PMB*")) == {b}
    assert study("PatientID=NOBODY") == []


def test_find_patient_series_and_image_levels(site: Site) -> None:
    out = site.work / "find-levels"
    (patient,) = find(site.port, out, "QueryRetrieveLevel=PATIENT", "PatientID=PMA*",
                      "PatientName", "NumberOfPatientRelatedStudies",
                      "NumberOfPatientRelatedInstances", model="-P")
    assert patient.PatientID == "PMA00001" and str(patient.PatientName) == "ALPHA^ANNE"
    assert int(patient.NumberOfPatientRelatedStudies) == 1
    assert int(patient.NumberOfPatientRelatedInstances) == 6

    series = find(site.port, out, "QueryRetrieveLevel=SERIES",
                  f"StudyInstanceUID={site.a.uid}", "SeriesInstanceUID", "Modality",
                  "SeriesNumber", "NumberOfSeriesRelatedInstances")
    assert sorted(int(s.SeriesNumber) for s in series) == [1, 2]
    assert {s.Modality for s in series} == {"CT"}
    assert [int(s.NumberOfSeriesRelatedInstances) for s in series] == [3, 3]

    first_series = f"{site.a.uid}.1"
    sops = [s for s in site.a.sops() if s.startswith(first_series + ".")]
    images = find(site.port, out, "QueryRetrieveLevel=IMAGE",
                  f"StudyInstanceUID={site.a.uid}", f"SeriesInstanceUID={first_series}",
                  f"SOPInstanceUID={sops[0]}\\{sops[2]}", "SOPClassUID", "InstanceNumber")
    assert _uids(images, "SOPInstanceUID") == {sops[0], sops[2]}
    assert {i.SOPClassUID for i in images} == {CT_IMAGE_STORAGE}
    wildcard = find(site.port, out, "QueryRetrieveLevel=IMAGE",
                    f"StudyInstanceUID={site.a.uid}", "SeriesInstanceUID",
                    "SOPInstanceUID", "InstanceNumber=2")
    assert len(wildcard) == 2  # instance 2 of each series


# ---- C-GET and C-MOVE --------------------------------------------------------------------------


def getscu(port: int, uid: str, out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    res = tool("getscu", "-S", "-aet", "GETSCU", "-od", out, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(port))
    assert res.returncode == 0, res.stdout
    return dataset_digests(sorted(p for p in out.iterdir() if p.is_file()))


def test_getscu_retrieves_byte_identical_datasets(site: Site, tmp_path: Path) -> None:
    assert getscu(site.port, site.a.uid, tmp_path / "get") == site.a.digests()


def test_movescu_to_a_configured_destination(site: Site, tmp_path: Path) -> None:
    received = tmp_path / "viewer"
    second = f"{site.a.uid}.2"
    with storescp(received, "VIEWER", site.viewer_port):
        res = tool("movescu", "-S", "-aet", "MOVESCU", "-aem", "VIEWER",
                   "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={site.a.uid}",
                   "-k", f"SeriesInstanceUID={second}", "127.0.0.1", str(site.port))
        assert res.returncode == 0, res.stdout
    got = dataset_digests(sorted(received.iterdir()))
    want = {sop: d for sop, d in site.a.digests().items() if sop.startswith(second + ".")}
    assert len(want) == 3 and got == want

    nowhere = tool("movescu", "-v", "-S", "-aet", "MOVESCU", "-aem", "NOWHERE",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={site.a.uid}",
                   "127.0.0.1", str(site.port))
    assert "MoveDestinationUnknown" in nowhere.stdout, nowhere.stdout


def test_compressed_data_is_stored_and_sent_as_received(site: Site, tmp_path: Path) -> None:
    """RLE Lossless in, RLE Lossless kept (never transcoded in the archive), RLE out to
    a requester that accepts it; one that accepts only uncompressed syntaxes gets a
    decoded copy with the very same pixel values."""
    spec = StudySpec(study_index=108, instances=2, rows=64, columns=64)
    files = []
    pixels = {}
    for i in (1, 2):
        ds = make_instance(spec, 1, i)
        pixels[str(ds.SOPInstanceUID)] = ds.pixel_array.copy()
        ds.compress(RLE_LOSSLESS, generate_instance_uid=False)
        files.append(tmp_path / f"rle{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    res = tool("storescu", "-xr", "-aet", "STORESCU", "127.0.0.1", str(site.port), *files)
    assert res.returncode == 0, res.stdout
    want = dataset_digests(files)
    uid = study_uid(spec)
    cli("get", uid, "--out", str(tmp_path / "restored"), node=site.node.address, check=True)
    restored = sorted((tmp_path / "restored" / uid).glob("*/*.dcm"))
    assert dataset_digests(restored) == want
    assert {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in restored} == {RLE_LOSSLESS}

    out = tmp_path / "get-rle"
    out.mkdir()
    got = tool("getscu", "-S", "+xr", "-aet", "GETSCU", "-od", out, "-k",
               "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1",
               str(site.port))
    assert got.returncode == 0, got.stdout
    assert dataset_digests(sorted(out.iterdir())) == want

    plain = tmp_path / "get-plain"
    plain.mkdir()
    got = tool("getscu", "-S", "-aet", "GETSCU", "-od", plain, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(site.port))
    assert got.returncode == 0, got.stdout
    decoded = [pydicom.dcmread(f) for f in sorted(plain.iterdir())]
    assert len(decoded) == 2
    for ds in decoded:
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, pixels[str(ds.SOPInstanceUID)])


# ---- Storage Commitment --------------------------------------------------------------------------


def test_commitment_fails_with_a_reason_when_copies_cannot_be_safe(site: Site) -> None:
    """A lone node can never hold 3 copies 250 miles apart: after the timeout the
    report lists every instance as failed, with the reason in words. The requester's
    AE is not in [dicom.destinations], so the report comes on its own association."""
    sops = site.b.sops()
    refs = [(CT_IMAGE_STORAGE, s) for s in sops] + [(CT_IMAGE_STORAGE, "1.2.3.999")]
    started_at = time.monotonic()
    with CommitmentScu("MODALITY") as scu:
        status = scu.request(site.port, refs, "1.2.826.0.1.3680043.10.1455.9.1",
                             keep_open_s=COMMITMENT_TIMEOUT_S + 10)
        assert status == 0x0000
        report = scu.wait(1)
    assert time.monotonic() - started_at >= COMMITMENT_TIMEOUT_S - 0.5
    assert report.how == "same association" and report.event_type == 2
    assert "ReferencedSOPSequence" not in report.info
    failed = {str(i.ReferencedSOPInstanceUID): i for i in report.info.FailedSOPSequence}
    assert set(failed) == {*sops, "1.2.3.999"}
    for sop in sops:
        assert failed[sop].FailureReason == 0x0110
        reason = private_reason(failed[sop])
        assert "not safe within 3 s" in reason and "of 3 safe copies" in reason, reason
    assert failed["1.2.3.999"].FailureReason == 0x0112
    assert "not received" in private_reason(failed["1.2.3.999"])


# ---- resources and lifecycle -------------------------------------------------------------------


def test_full_disk_answers_out_of_resources(tmp_path: Path) -> None:
    require_tool("storescu")
    node, port = dicom_node(tmp_path, node={"capacity_bytes": 1_000_000})
    spec = StudySpec(study_index=106, instances=2, rows=64, columns=64)
    files = write_study(tmp_path / "study", spec)
    node.start()
    try:
        res = tool("storescu", "-v", "127.0.0.1", str(port), *files)
        assert "OutOfResources" in res.stdout, res.stdout
        assert cli_json("ls", node=node.address)["studies"] == []
    finally:
        node.stop()


def test_dicom_port_in_use_stops_the_node(tmp_path: Path) -> None:
    node, port = dicom_node(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        node.start(wait=False)
        assert node.proc is not None
        try:
            code = node.proc.wait(30)
        finally:
            node.stop()
    assert code != 0
    lines = [ln for ln in node.log().splitlines() if ln.startswith("pacsmesh node:")]
    assert lines == [f"pacsmesh node: cannot listen for DICOM on 127.0.0.1:{port}: "
                     "Address already in use"], node.log()


# ---- across sites --------------------------------------------------------------------------------


def test_commitment_means_safe_and_any_site_serves_the_study(tmp_path: Path) -> None:
    """Chicago and Denver are in every valid replica set of a study (Boston and New
    York are 190 miles apart, so only one of them can be), so after a study sent to
    Chicago is safe, one of Boston/New York holds none of it: that one must still
    serve it over C-GET, fetching from its peers."""
    for name in ("storescu", "getscu"):
        require_tool(name)
    scu_port = free_port()
    c = Cluster(tmp_path)
    ports: dict[str, int] = {}
    seed = ""
    for node_id, city in (("chicago", "Chicago"), ("boston", "Boston"),
                          ("newyork", "New York"), ("denver", "Denver")):
        lat, lon = CITIES[city]
        dests = {"COMMITSCU": f"127.0.0.1:{scu_port}"} if node_id == "chicago" else {}
        member, port = dicom_node(tmp_path, node_id, city, lat, lon,
                                  cluster=cluster_settings(seeds=[seed] if seed else []),
                                  destinations=dests)
        seed = seed or member.address
        c.members.append(member)
        ports[node_id] = port
    sample = make_sample(tmp_path, StudySpec(study_index=107, instances=6, rows=64,
                                             columns=64, seed=12))
    with started(c), CommitmentScu("COMMITSCU", listen_port=scu_port) as scu:
        c.wait_converged()
        chicago = c.by_id("chicago")
        storescu(ports["chicago"], sample.files)
        refs = [(CT_IMAGE_STORAGE, s) for s in sample.sops()]
        assert scu.request(ports["chicago"], refs, "1.2.826.0.1.3680043.10.1455.9.2") == 0
        report = scu.wait(45)
        located = api_locate(chicago.address, sample.uid)
        assert located.safe, located  # reported success only once safe
        assert report.how == "new association" and report.event_type == 1
        assert "FailedSOPSequence" not in report.info
        committed = {str(i.ReferencedSOPInstanceUID) for i in report.info.ReferencedSOPSequence}
        assert committed == set(sample.sops())

        holders = holder_ids(located)
        (outsider,) = {"boston", "newyork"} - holders
        local = cli_json("ls", "--local", node=c.by_id(outsider).address)["studies"]
        assert sample.uid not in {s["study_uid"] for s in local}
        got = getscu(ports[outsider], sample.uid, tmp_path / "from-outsider")
        assert got == sample.digests()
