"""A 2 GB instance (a breast tomosynthesis object of 4,000 512x512 frames) crosses
DICOM both ways with the node's memory bounded: in by dcmtk's storescu (received
into a spool file, stored a chunk at a time), out by dcmtk's getscu (read into a
spool file, sent from it), byte for byte, with the node's peak RSS under 300 MB."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.conftest import require_tool
from tests.dicomproc import dicom_node, tool, wait_listening

FRAMES = 4000
ROWS = COLUMNS = 512
FRAME_BYTES = ROWS * COLUMNS * 2
PIXEL_BYTES = FRAMES * FRAME_BYTES  # 2,097,152,000
TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"  # Breast Tomosynthesis Image Storage
RSS_MAX_BYTES = 300 << 20
TIMEOUT_S = 600


def write_big(path: Path) -> tuple[str, str]:
    """The file; (its study UID, its SOP Instance UID). Frames are mostly zero with a
    few bytes of their own, so no two 1 MiB chunks are alike (nothing dedups) yet the
    test does not spend its time compressing noise."""
    sop, study = generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(TOMOSYNTHESIS)
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = TOMOSYNTHESIS, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BIG^TOMO", "BIG0001", "MG"
    ds.StudyDate, ds.InstanceNumber, ds.SeriesNumber = "20251201", 1, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.save_as(path, enforce_file_format=True)
    frame = bytearray(FRAME_BYTES)
    rng = os.urandom(FRAMES * 64)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, PIXEL_BYTES))
        for i in range(FRAMES):
            frame[0:8] = i.to_bytes(8, "little")
            frame[4096:4160] = rng[i * 64:(i + 1) * 64]
            f.write(frame)
    return study, sop


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")



@pytest.fixture
def big_file(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    path = tmp_path / "tomo.dcm"
    study, sop = write_big(path)
    yield path, study, sop


def test_a_2_gb_instance_in_and_out_in_bounded_memory(tmp_path: Path,
                                                      big_file: tuple[Path, str, str]) -> None:
    storescu, getscu = require_tool("storescu"), require_tool("getscu")
    path, study, _sop = big_file
    node, port = dicom_node(tmp_path / "node")
    node.start()
    try:
        wait_listening(port)
        assert node.proc is not None
        sent = tool(storescu, "-R", "-aet", "MODALITY", "127.0.0.1", str(port), path,
                    timeout_s=TIMEOUT_S)
        assert sent.returncode == 0, sent.stdout[-2000:]
        after_store = peak_rss(node.proc.pid)
        spool = node.data_dir / "dicom-tmp"
        assert not spool.exists() or not any(spool.iterdir()), "a spool file was left behind"

        out = tmp_path / "out"
        out.mkdir()
        got = tool(getscu, "-S", "-aet", "VIEWER", "-od", out, "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                   "127.0.0.1", str(port), timeout_s=TIMEOUT_S)
        assert got.returncode == 0, got.stdout[-2000:]
        after_get = peak_rss(node.proc.pid)
        (received,) = list(out.iterdir())
        assert received.stat().st_size >= PIXEL_BYTES
        assert digest_dataset(received) == digest_dataset(path)
        print(f"node peak RSS: {after_store >> 20} MB after C-STORE, {after_get >> 20} MB "
              "after C-GET")
        assert after_store < RSS_MAX_BYTES, f"peak RSS {after_store >> 20} MB receiving"
        assert after_get < RSS_MAX_BYTES, f"peak RSS {after_get >> 20} MB sending"
    finally:
        node.stop()


def digest_dataset(path: Path) -> str:
    """The hash of a Part 10 file's dataset (after its file meta), read in blocks."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    h = blake3.blake3()  # 2 GB twice: blake2b took ~5 s of the test
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(8 << 20):
            h.update(block)
    return str(h.hexdigest())
