"""Synthetic DICOM studies for the demo, tests and benchmarks.

The pixels look like a CT slice (a body ellipse, organs, noise), not random bytes, so
compression and dedup figures measured on them mean something.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

# A fixed root keeps generated UIDs valid (digits and dots, <= 64 chars) and recognisable.
UID_ROOT = "1.2.826.0.1.3680043.10.1455"


@dataclass(frozen=True)
class StudySpec:
    """What one synthetic study looks like."""

    study_index: int = 1
    instances: int = 10
    rows: int = 512
    columns: int = 512
    series: int = 1
    patient_id: str = "PM000001"
    patient_name: str = "DOE^JANE"
    modality: str = "CT"
    study_date: str = "20260101"
    birth_date: str = "19700101"
    seed: int = 0
    # Noise (HU, sigma) outside the body too, as a real scanner's: 0 leaves the air
    # flat, which compresses ~3.3x and flatters compression; benchmarks use 12 (~2x,
    # like real CT)
    air_noise: float = 0.0


def study_uid(spec: StudySpec) -> str:
    return f"{UID_ROOT}.1.{spec.seed}.{spec.study_index}"


def _phantom(rows: int, cols: int, z: int, rng: np.random.Generator,
             air_noise: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    img = np.full((rows, cols), -1000.0, dtype=np.float32)  # air
    body = ((yy - cy) / (rows * 0.42)) ** 2 + ((xx - cx) / (cols * 0.46)) ** 2 <= 1
    img[body] = 40.0  # soft tissue
    shift = 8 * np.sin(z / 7.0)
    organs = ((-0.1, -0.18, 0.12, 60.0), (-0.1, 0.18, 0.12, 55.0), (0.15, 0.0, 0.06, 700.0))
    for oy, ox, r, hu in organs:
        organ = (yy - cy - oy * rows - shift) ** 2 + (xx - cx - ox * cols) ** 2 <= (r * rows) ** 2
        img[organ] = hu
    img += rng.normal(0, 12, size=img.shape).astype(np.float32) * body
    if air_noise:
        img += rng.normal(0, air_noise, size=img.shape).astype(np.float32) * ~body
    return np.clip(img + 1024, 0, 4095).astype(np.uint16)


def make_instance(spec: StudySpec, series_no: int, instance_no: int) -> Dataset:
    """Build one CT instance in memory (Part 10, explicit VR little endian)."""
    rng = np.random.default_rng(spec.seed * 1_000_003 + spec.study_index * 10_007 + instance_no)
    st_uid = study_uid(spec)
    se_uid = f"{st_uid}.{series_no}"
    sop_uid = f"{se_uid}.{instance_no}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = st_uid
    ds.SeriesInstanceUID = se_uid
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_name
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = "F"
    ds.StudyDate = spec.study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"ACC{spec.study_index:06d}"
    ds.StudyID = str(spec.study_index)
    ds.StudyDescription = "SYNTHETIC CT CHEST"
    ds.Modality = spec.modality
    ds.SeriesNumber = series_no
    ds.InstanceNumber = instance_no
    ds.ContentDate = spec.study_date
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_no)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.InstanceCreationDate = dt.date(2026, 1, 1).strftime("%Y%m%d")
    ds.PixelData = _phantom(spec.rows, spec.columns, instance_no, rng,
                            spec.air_noise).tobytes()
    return ds


def write_study(out_dir: Path, spec: StudySpec) -> list[Path]:
    """Write a study as out_dir/<series>/<n>.dcm; return the paths in order."""
    paths: list[Path] = []
    per_series = max(1, spec.instances // spec.series)
    n = 0
    for s in range(1, spec.series + 1):
        series_dir = out_dir / f"series{s}"
        series_dir.mkdir(parents=True, exist_ok=True)
        count = per_series if s < spec.series else spec.instances - n
        for i in range(1, count + 1):
            ds = make_instance(spec, s, i)
            path = series_dir / f"{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
            n += 1
    return paths
