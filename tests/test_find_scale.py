"""C-FIND with dcmtk's findscu against a real node holding thousands of studies:
keys with an index (PatientID, AccessionNumber, StudyDate) and one without
(PatientName with wildcards) answer exactly the studies a brute-force match names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.catalogfill import Synth, filled_data_dir, synth_studies
from tests.conftest import require_tool
from tests.dicomproc import dicom_node, find, wait_listening
from tests.nodeproc import NodeProc

STUDIES = 6000


@dataclass
class Archive:
    node: NodeProc
    port: int
    work: Path
    studies: list[Synth]

    def uids(self, keep: Callable[[Synth], bool]) -> set[str]:
        return {s.study_uid for s in self.studies if keep(s)}

    def find_uids(self, *keys: str, level: str = "STUDY") -> list[str]:
        rsp = find(self.port, self.work / "rsp", f"QueryRetrieveLevel={level}",
                   "StudyInstanceUID", *keys)
        return [str(ds.StudyInstanceUID) for ds in rsp]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    require_tool("findscu")
    work = tmp_path_factory.mktemp("find-scale")
    studies = synth_studies(STUDIES, seed=4, patients=600)
    node, port = dicom_node(work, allowed_calling_aets=["FINDSCU", "ECHOSCU"])
    filled_data_dir(node.data_dir, studies)
    node.start()
    try:
        wait_listening(port)
        yield Archive(node, port, work, studies)
    finally:
        node.stop()


def test_find_by_patient_id(archive: Archive) -> None:
    patient = archive.studies[10].patient_id
    got = archive.find_uids(f"PatientID={patient}", "PatientName")
    want = archive.uids(lambda s: s.patient_id == patient)
    assert len(got) == len(set(got)) and set(got) == want and len(want) > 3
    assert archive.find_uids("PatientID=NOBODY") == []
    other = archive.studies[20].patient_id
    got = archive.find_uids(f"PatientID={patient}\\{other}")  # a list of values
    assert set(got) == want | archive.uids(lambda s: s.patient_id == other)


def test_find_by_accession_number(archive: Archive) -> None:
    s = archive.studies[4321]
    rsp = find(archive.port, archive.work / "rsp", "QueryRetrieveLevel=STUDY",
               f"AccessionNumber={s.accession}", "StudyInstanceUID", "PatientID", "StudyDate",
               "ModalitiesInStudy")
    (only,) = rsp
    assert (only.StudyInstanceUID, only.PatientID, only.StudyDate, only.ModalitiesInStudy) == (
        s.study_uid, s.patient_id, s.study_date, s.modality)


def test_find_by_study_date_and_range(archive: Archive) -> None:
    day = archive.studies[7].study_date
    assert set(archive.find_uids(f"StudyDate={day}")) == archive.uids(
        lambda s: s.study_date == day)
    got = archive.find_uids("StudyDate=20220301-20220315", "ModalitiesInStudy=MR")
    assert set(got) == archive.uids(
        lambda s: "20220301" <= s.study_date <= "20220315" and s.modality == "MR")


def test_find_patient_level_and_name_wildcards(archive: Archive) -> None:
    s = archive.studies[99]
    (patient,) = find(archive.port, archive.work / "rsp", "QueryRetrieveLevel=PATIENT",
                      f"PatientID={s.patient_id}", "PatientName",
                      "NumberOfPatientRelatedStudies", model="-P")
    assert int(patient.NumberOfPatientRelatedStudies) == len(
        archive.uids(lambda x: x.patient_id == s.patient_id))
    # no index for names: a bounded scan, here over all 6000 studies
    prefix = s.patient_name[:-1]
    got = archive.find_uids(f"PatientName={prefix.lower()}*")
    assert set(got) == archive.uids(lambda x: x.patient_name.startswith(prefix))
