"""Lossless transfer-syntax conversion for C-GET and C-MOVE sub-operations.

An instance goes out as stored when the peer accepted its stored transfer syntax
for its SOP class. Otherwise `choose` picks a syntax the peer accepted that the
instance can reach without losing anything, and `convert` re-encodes a copy of
the spooled file in memory (the archive keeps the received bytes untouched):

- between the native syntaxes Explicit VR LE, Implicit VR LE, Deflated Explicit
  VR LE (a lossless deflate of the whole dataset) and Explicit VR Big Endian,
  preferred in that order (UNCOMPRESSED): explicit VR keeps every VR, implicit VR
  is the one every peer must take;
- from a lossless compressed syntax (JPEG Lossless Process 14 and its SV1 form,
  JPEG-LS Lossless, JPEG 2000 Lossless, RLE Lossless) by decoding the pixel data
  to one of those native syntaxes, values unchanged (pydicom then also sets the
  attributes that describe native pixel data: Photometric Interpretation, Planar
  Configuration, Number of Frames as needed).

Never: any lossy compression, and no encapsulated (compressed) pixel data made
here (a peer that accepts only such syntaxes for an uncompressed instance gets a
failed sub-operation; Deflated Explicit VR LE, a lossless deflate of the whole
dataset, is the one compressed target, for a peer that accepted nothing else),
and no decompression of lossy-compressed data (JPEG Baseline/Extended, JPEG-LS
Near-Lossless, JPEG 2000, ...): its decoded pixels are not what the modality
acquired, and an uncompressed copy would invite lossless handling downstream.
Such a sub-operation fails with the reason (ConversionError).

Decoders: python-gdcm for the JPEG family (JPEG Lossless, JPEG-LS, JPEG 2000),
pydicom's own RLE decoder; pinned by name, so another pydicom plugin installed
beside them never changes what a node sends. Lossy Image Compression (0028,2110)
and every other attribute are left as they are; the SOP Instance UID is kept
(the pixel values are identical, so it is the same instance, PS3.5 A.4).

Big Endian: the byte order of OB-free binary values (OW, OF, OL, OD, OV) is
swapped here, since pydicom only re-encodes the values it can parse; a dataset
with elements of unknown VR (UN) cannot be converted across byte orders (their
byte order is unknowable) and fails with that reason.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr, dcmwrite

IMPLICIT_LE = uid.ImplicitVRLittleEndian
EXPLICIT_LE = uid.ExplicitVRLittleEndian
DEFLATED_LE = uid.DeflatedExplicitVRLittleEndian
EXPLICIT_BE = uid.ExplicitVRBigEndian
# Targets of a conversion, best first.
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, EXPLICIT_BE)
# Lossless compressed syntaxes we decode, and the pydicom decoding plugin for each.
LOSSLESS_DECODERS = {
    uid.JPEGLossless: "gdcm",
    uid.JPEGLosslessSV1: "gdcm",
    uid.JPEGLSLossless: "gdcm",
    uid.JPEG2000Lossless: "gdcm",
    uid.RLELossless: "pydicom",
}
# Lossy compressed syntaxes: never decompressed (named so the reason can say so).
LOSSY = frozenset({
    uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000,
    uid.JPEG2000MC, uid.HTJ2K, uid.MPEG2MPML, uid.MPEG2MPHL, uid.MPEG4HP41,
    uid.MPEG4HP41BD, uid.HEVCMP51, uid.HEVCM10P51,
})
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

# Decoding is CPU-bound: at most this many conversions at once in a node, whatever
# the number of associations retrieving (each holds ~3x its instance in memory).
CONVERSIONS_AT_ONCE = 2
# Conversions happen in memory (~3x the instance); a larger instance goes out only in
# its stored syntax (retrieve.py says so in the sub-operation's failure).
CONVERT_BYTES_MAX = 256 << 20
_slots = threading.BoundedSemaphore(CONVERSIONS_AT_ONCE)


class ConversionError(Exception):
    """This instance cannot go out in any syntax the peer accepted; says why."""


def name(ts: str) -> str:
    return uid.UID(ts).name


def choose(stored: str, accepted: Iterable[str]) -> str:
    """The syntax to send an instance stored in `stored` to a peer that accepted
    `accepted` (for its SOP class, in our sending role): `stored` itself when it can,
    else the best lossless target. ConversionError when there is none."""
    offered = list(dict.fromkeys(accepted))
    if stored in offered:
        return stored
    if not offered:
        raise ConversionError("the peer accepted no presentation context for this SOP class")
    targets = [ts for ts in UNCOMPRESSED if ts in offered]
    theirs = ", ".join(name(ts) for ts in offered)
    if stored in LOSSY:
        raise ConversionError(f"stored lossy-compressed ({name(stored)}); the peer accepted "
                              f"only {theirs}, and lossy data is never decompressed")
    if stored not in UNCOMPRESSED and stored not in LOSSLESS_DECODERS:
        raise ConversionError(f"stored in {name(stored)}, which is not converted; the peer "
                              f"accepted only {theirs}")
    if not targets:
        raise ConversionError(f"the peer accepted only {theirs} (compressed): instances are "
                              "never compressed for sending")
    return targets[0]


def convert(part10: bytes, target: str) -> bytes:
    """A Part 10 file in `target`, from `part10` (a copy; never the stored bytes in
    place). The pixel values and every other value are unchanged."""
    with _slots:
        return _convert(part10, target)


def _convert(part10: bytes, target: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(part10))
    stored = ds.file_meta.TransferSyntaxUID
    if stored in LOSSLESS_DECODERS:
        try:
            # as_rgb=False: no colour-space conversion (it would round values)
            ds.decompress(as_rgb=False, generate_instance_uid=False,
                          decoding_plugin=LOSSLESS_DECODERS[stored])
        except Exception as exc:
            raise ConversionError(f"cannot decode its {name(stored)} pixel data: "
                                  f"{exc}") from exc
    elif stored not in UNCOMPRESSED:
        raise ConversionError(f"stored in {name(stored)}, which is not converted")
    source_little = uid.UID(stored).is_little_endian or stored in LOSSLESS_DECODERS
    target_little = uid.UID(target).is_little_endian
    if source_little != target_little:
        _swap_byte_order(ds, source_little)
    ds.file_meta.TransferSyntaxUID = uid.UID(target)
    out = io.BytesIO()
    try:
        dcmwrite(out, ds, enforce_file_format=True)
    except Exception as exc:
        raise ConversionError(f"cannot be encoded in {name(target)}: {exc}") from exc
    return out.getvalue()


def _swap_byte_order(ds: Dataset, source_little: bool) -> None:
    """Swap the byte order of the values pydicom writes as raw bytes (OW, OF, OL, OD,
    OV), in `ds` and its sequences; ConversionError for UN, whose order is unknown."""
    correct_ambiguous_vr(ds, source_little)  # e.g. Pixel Data "OB or OW" from implicit VR
    for elem in ds:  # iterating parses every raw element
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_byte_order(item, source_little)
        elif elem.VR == "UN" and elem.value:
            raise ConversionError(f"element {elem.tag} has an unknown VR (UN): its byte "
                                  "order cannot be converted")
        elif elem.VR in _SWAP_WIDTH and isinstance(elem.value, bytes) and elem.value:
            width = _SWAP_WIDTH[elem.VR]
            if len(elem.value) % width:
                raise ConversionError(f"element {elem.tag} ({elem.VR}) has an odd length")
            values: Any = np.frombuffer(elem.value, dtype=f"u{width}")
            elem.value = values.byteswap().tobytes()
