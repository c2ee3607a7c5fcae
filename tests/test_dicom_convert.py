"""Lossless transfer-syntax conversion on C-GET and C-MOVE, with real clients against a
real node process: pynetdicom's getscu and movescu apps with their default contexts,
and dcmtk's getscu and movescu (to a dcmtk storescp) restricted to Implicit VR Little
Endian. One study per stored transfer syntax; every client retrieves all of them
once (module fixtures), then each (client, syntax) pair is checked on its own:
the pixel data decoded from what the client received equals the original's, the
syntax is the stored one when the client accepted it, and the archive's bytes are
unchanged. A lossy-compressed study is never decompressed: a client that accepts
only uncompressed syntaxes gets nothing, with the reason in the audit trail.

Test data: uncompressed syntaxes by pydicom; RLE Lossless, JPEG-LS Lossless and
JPEG 2000 Lossless by pydicom's Dataset.compress() (its own RLE encoder, pyjpegls,
pylibjpeg-openjpeg); JPEG Lossless Process 14 (and SV1) by gdcm, which pydicom has
no encoder for; JPEG Baseline (lossy) is pydicom's test file SC_rgb_jpeg_dcmtk.dcm.
The reference pixels are the arrays before any encoding, not a decoder's output.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file

from pacsmesh.node.dicom.convert import (
    ConversionError,
    choose,
    convert,
)
from pacsmesh.sample import StudySpec, make_instance, study_uid
from tests.conftest import require_tool
from tests.dicomproc import dataset_bytes, dicom_node, wait_listening
from tests.nodeproc import NodeProc, cli, free_port

VENV_BIN = Path(sys.executable).parent
INSTANCES = 2
LOSSY = uid.JPEGBaseline8Bit

SYNTAXES = [
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian, uid.RLELossless,
    uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEGLosslessSV1, uid.JPEGLossless,
]
SHORT: dict[str, str] = {
    uid.ImplicitVRLittleEndian: "implicit", uid.ExplicitVRLittleEndian: "explicit",
    uid.DeflatedExplicitVRLittleEndian: "deflated", uid.ExplicitVRBigEndian: "big-endian",
    uid.RLELossless: "rle", uid.JPEGLSLossless: "jpeg-ls", uid.JPEG2000Lossless: "j2k",
    uid.JPEGLosslessSV1: "jpeg-ll-sv1", uid.JPEGLossless: "jpeg-ll-p14",
    LOSSY: "jpeg-baseline",
}
CLIENTS = ["pynetdicom-getscu", "pynetdicom-movescu", "dcmtk-getscu-xi", "dcmtk-movescu-xi"]


# ---- pure logic -----------------------------------------------------------------------------


@pytest.mark.parametrize(("stored", "accepted", "want"), [
    (uid.ExplicitVRLittleEndian, [uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian],
     uid.ExplicitVRLittleEndian),  # as stored when accepted
    (uid.ExplicitVRLittleEndian, [uid.ImplicitVRLittleEndian], uid.ImplicitVRLittleEndian),
    (uid.JPEG2000Lossless, [uid.ExplicitVRBigEndian, uid.ImplicitVRLittleEndian,
                            uid.ExplicitVRLittleEndian], uid.ExplicitVRLittleEndian),
    (uid.RLELossless, [uid.ExplicitVRBigEndian], uid.ExplicitVRBigEndian),
    (uid.JPEGBaseline8Bit, [uid.JPEGBaseline8Bit], uid.JPEGBaseline8Bit),
])
def test_choose(stored: str, accepted: list[str], want: str) -> None:
    assert choose(stored, accepted) == want


@pytest.mark.parametrize(("stored", "accepted", "words"), [
    (uid.JPEGBaseline8Bit, [uid.ImplicitVRLittleEndian], "lossy"),
    (uid.JPEG2000, [uid.ExplicitVRLittleEndian], "lossy"),
    (uid.ExplicitVRLittleEndian, [uid.RLELossless], "never compressed"),
    (uid.JPEGLSLossless, [uid.JPEG2000Lossless], "never compressed"),
    (uid.ExplicitVRLittleEndian, [], "no presentation context"),
])
def test_choose_refuses_what_would_lose_or_compress(stored: str, accepted: list[str],
                                                    words: str) -> None:
    with pytest.raises(ConversionError, match=words):
        choose(stored, accepted)


def test_big_endian_refuses_unknown_vr_and_swaps_words() -> None:
    ds = make_instance(StudySpec(study_index=299, rows=8, columns=8), 1, 1)
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091010, "OW", b"\x01\x02\x03\x04")
    implicit = _part10(ds, uid.ImplicitVRLittleEndian)  # the private OW is read back as UN
    with pytest.raises(ConversionError, match="unknown VR"):
        convert(implicit, uid.ExplicitVRBigEndian)
    big = pydicom.dcmread(io.BytesIO(convert(_part10(ds, uid.ExplicitVRLittleEndian),
                                             uid.ExplicitVRBigEndian)))
    assert big.file_meta.TransferSyntaxUID == uid.ExplicitVRBigEndian
    assert np.array_equal(big.pixel_array, ds.pixel_array)
    assert big[0x00091010].value == b"\x02\x01\x04\x03"  # OW words in big-endian order


# ---- test data ------------------------------------------------------------------------------


def _part10(ds: Any, ts: str) -> bytes:
    """`ds` (uncompressed) written in an uncompressed syntax `ts`."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    if ts == uid.ExplicitVRLittleEndian:
        return out.getvalue()
    return convert(out.getvalue(), ts)


def _gdcm_encode(src: Path, dst: Path, ts: str) -> None:
    import gdcm

    codes: dict[str, Any] = {uid.JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
             uid.JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14}
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(codes[ts]))
    change.SetInput(reader.GetImage())
    assert change.Change(), ts
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), dst


def write_instance(spec: StudySpec, n: int, ts: str, out: Path) -> np.ndarray:
    """One CT instance of `spec` stored in `ts` at `out`; its pixels before encoding."""
    ds = make_instance(spec, 1, n)
    original = ds.pixel_array.copy()
    if ts in (uid.JPEGLosslessSV1, uid.JPEGLossless):
        plain = out.with_suffix(".plain")
        ds.save_as(plain, enforce_file_format=True)
        _gdcm_encode(plain, out, ts)
        plain.unlink()
    elif uid.UID(ts).is_compressed:
        ds.compress(ts, generate_instance_uid=False)
        ds.save_as(out, enforce_file_format=True)
    else:
        out.write_bytes(_part10(ds, ts))
    stored = pydicom.dcmread(out)
    assert stored.file_meta.TransferSyntaxUID == ts
    return original


@dataclass
class Archive:
    node: NodeProc
    port: int
    pyn_store_port: int  # pynetdicom movescu's own Storage SCP (AE STORESCP)
    dcmtk_store_port: int  # dcmtk storescp +xi (AE IMPLICIT)
    files: dict[str, list[Path]]  # stored syntax -> the files put
    pixels: dict[str, np.ndarray]  # SOP Instance UID -> pixels before encoding
    study_syntax: dict[str, str]  # study UID -> stored syntax
    work: Path

    def studies(self) -> str:
        return "\\".join(self.study_syntax)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    work = tmp_path_factory.mktemp("convert")
    pyn_port, dcmtk_port = free_port(), free_port()
    node, port = dicom_node(work, destinations={"STORESCP": f"127.0.0.1:{pyn_port}",
                                                "IMPLICIT": f"127.0.0.1:{dcmtk_port}"})
    files: dict[str, list[Path]] = {}
    pixels: dict[str, np.ndarray] = {}
    studies: dict[str, str] = {}
    for i, ts in enumerate(SYNTAXES):
        spec = StudySpec(study_index=300 + i, instances=INSTANCES, rows=64, columns=64,
                         patient_id=f"CONV{i:04d}", seed=5)
        folder = work / "in" / SHORT[ts]
        folder.mkdir(parents=True)
        studies[study_uid(spec)] = ts
        for n in range(1, INSTANCES + 1):
            path = folder / f"{n}.dcm"
            pixels[f"{study_uid(spec)}.1.{n}"] = write_instance(spec, n, ts, path)
            files.setdefault(ts, []).append(path)
    lossy = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # type: ignore[arg-type]
    (work / "in" / "lossy").mkdir()
    files[LOSSY] = [Path(shutil.copy(lossy, work / "in" / "lossy" / "1.dcm"))]
    studies[str(pydicom.dcmread(lossy, stop_before_pixels=True).StudyInstanceUID)] = LOSSY
    node.start()
    try:
        cli("put", str(work / "in"), node=node.address, check=True)
        yield Archive(node, port, pyn_port, dcmtk_port, files, pixels, studies, work)
    finally:
        node.stop()


# ---- the clients ----------------------------------------------------------------------------


def _dcmtk(name: str) -> str:
    return require_tool(name)


def _run(*args: str | Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
                          env={**os.environ, "TCP_NODELAY": "1"}, check=False)


def _keys(a: Archive) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={a.studies()}"]


def retrieve(a: Archive, client: str, out: Path) -> str:
    """Run `client` against the archive for every study; its output."""
    out.mkdir(parents=True)
    host = ["127.0.0.1", str(a.port)]
    if client == "pynetdicom-getscu":
        res = _run(VENV_BIN / "getscu", "-S", "-od", out, *_keys(a), *host)
    elif client == "pynetdicom-movescu":
        res = _run(VENV_BIN / "movescu", "-S", "--store", "--store-port", str(a.pyn_store_port),
                   "--store-aet", "STORESCP", "-aem", "STORESCP", "-od", out, *_keys(a), *host)
    elif client == "dcmtk-getscu-xi":
        res = _run(_dcmtk("getscu"), "-S", "+xi", "-aet", "GETSCU", "-od", out, *_keys(a),
                   *host)
    else:
        storescp = _dcmtk("storescp")
        proc = subprocess.Popen([storescp, "+xi", "-aet", "IMPLICIT", "-od", str(out),
                                 str(a.dcmtk_store_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
        try:
            wait_listening(a.dcmtk_store_port)
            res = _run(_dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aem", "IMPLICIT",
                       *_keys(a), *host)
        finally:
            proc.terminate()
            proc.wait(10)
    return res.stdout


@dataclass
class Received:
    output: str
    by_sop: dict[str, Path]


_received: dict[str, Received] = {}


def received(a: Archive, client: str) -> Received:
    """What `client` got, retrieved once per module."""
    if client not in _received:
        out = a.work / "out" / client
        output = retrieve(a, client, out)
        by_sop = {}
        for f in sorted(p for p in out.iterdir() if p.is_file()):
            by_sop[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f
        _received[client] = Received(output, by_sop)
    return _received[client]


def _sops(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


# ---- conversions, client by client and syntax by syntax ------------------------------------


@pytest.mark.parametrize("ts", SYNTAXES, ids=[SHORT[t] for t in SYNTAXES])
@pytest.mark.parametrize("client", CLIENTS)
def test_lossless_syntaxes_reach_every_client(archive: Archive, client: str, ts: str) -> None:
    got = received(archive, client)
    # pynetdicom's movescu SCP accepts every syntax: it gets what is stored. The others
    # accept only uncompressed syntaxes, Implicit VR LE first (pynetdicom's getscu) or
    # only (dcmtk +xi): they get Implicit VR LE, converted unless stored so.
    want_ts = ts if client == "pynetdicom-movescu" else uid.ImplicitVRLittleEndian
    for path, sop in zip(archive.files[ts], _sops(archive.files[ts]), strict=True):
        assert sop in got.by_sop, f"{sop} ({SHORT[ts]}) not received:\n{got.output}"
        ds = pydicom.dcmread(got.by_sop[sop])
        # dcmtk's getscu writes what it received in Explicit VR LE whatever came over the
        # wire (it accepted only Implicit VR LE, so that is what was sent)
        rewritten = client == "dcmtk-getscu-xi"
        written_ts = uid.ExplicitVRLittleEndian if rewritten else want_ts
        assert ds.file_meta.TransferSyntaxUID == written_ts
        assert np.array_equal(ds.pixel_array, archive.pixels[sop])
        original = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert ds.get("LossyImageCompression") == original.get("LossyImageCompression")
        if want_ts == ts and not rewritten:  # as stored: the very bytes
            assert dataset_bytes(got.by_sop[sop]) == dataset_bytes(path)


@pytest.mark.parametrize("client", CLIENTS)
def test_lossy_data_is_never_decompressed(archive: Archive, client: str) -> None:
    """JPEG Baseline goes out as stored or not at all, with the reason audited."""
    got = received(archive, client)
    sop = _sops(archive.files[LOSSY])[0]
    if client == "pynetdicom-movescu":  # it accepts JPEG Baseline
        assert dataset_bytes(got.by_sop[sop]) == dataset_bytes(archive.files[LOSSY][0])
        return
    assert sop not in got.by_sop
    audit = cli("audit", "--limit", "1000", node=archive.node.address, check=True).stdout
    assert "lossy data is never decompressed" in audit, audit


def test_the_archive_keeps_the_bytes_it_received(archive: Archive, tmp_path: Path) -> None:
    for client in CLIENTS:  # every conversion has run by now
        received(archive, client)
    for study, ts in archive.study_syntax.items():
        out = tmp_path / SHORT[ts]
        cli("get", study, "--out", str(out), node=archive.node.address, check=True)
        got = {f.read_bytes() for f in out.rglob("*.dcm")}
        assert got == {f.read_bytes() for f in archive.files[ts]}, SHORT[ts]
