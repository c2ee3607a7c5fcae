"""What a Storage Commitment N-ACTION may ask, read from its bytes with bounded cost.

A request is refused, with a status and an Error Comment a person can act on,
when it is not a commitment request, has no Transaction UID or references, names
a UID longer than 64 characters (PS3.5 6.2), or is too big: more than
`REFERENCES_PER_REQUEST_MAX` references, or Action Information larger than
`REQUEST_BYTES_MAX` once inflated. The size is checked before pydicom parses
anything, and a deflated request is inflated only up to that size: a small
compressed request must not expand into gigabytes of UIDs.

Free of IO: bytes in, references or `Refused` out.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode

ACTION_REQUEST_COMMITMENT = 1

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_RESOURCE_LIMITATION = 0x0213

UID_LENGTH_MAX = 64  # PS3.5 6.2, VR UI
# One request per study is the usual practice; the largest studies have a few
# thousand instances, tens of thousands in rare cases. Beyond this the requester
# must split the request (the refusal says so).
REFERENCES_PER_REQUEST_MAX = 50_000
# A reference encodes in at most 160 bytes (item header and two 64-character UIDs),
# so this admits any request within the reference limit, and bounds what pydicom
# parses (a few seconds of one association's thread).
REQUEST_BYTES_MAX = REFERENCES_PER_REQUEST_MAX * 160 + 4096
ERROR_COMMENT_MAX = 64  # (0000,0902) is LO


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


class Refused(Exception):
    """The requester's fault: `status` for the N-ACTION response, the message in words."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Request:
    transaction_uid: str
    references: list[Reference]


def read_request(action_type: int | None, raw: bytes, implicit_vr: bool, little_endian: bool,
                 deflated: bool) -> Request:
    """The request in an N-ACTION's Action Information bytes, as encoded in its
    presentation context's transfer syntax; `Refused` says what is wrong."""
    if action_type != ACTION_REQUEST_COMMITMENT:
        raise Refused(STATUS_NO_SUCH_ACTION, f"no action type {action_type}")
    if len(raw) > REQUEST_BYTES_MAX:
        raise _too_big(len(raw))
    if deflated:
        raw = _inflate(raw)
        implicit_vr, little_endian = False, True  # Deflated Explicit VR Little Endian
    if not raw:
        raise Refused(STATUS_INVALID_ARGUMENT, "no Action Information")
    try:
        info = decode(BytesIO(raw), implicit_vr, little_endian)
        return parse_request(info)
    except Refused:
        raise
    except Exception as exc:  # pydicom raises many kinds on bytes that do not decode
        raise Refused(STATUS_INVALID_ARGUMENT, f"Action Information does not decode: {exc}"
                      ) from exc


def parse_request(info: Dataset) -> Request:
    """The request in a decoded Action Information; `Refused` says what is wrong."""
    uid = _uid(info.get("TransactionUID", ""), "Transaction UID (0008,1195)")
    if not uid:
        raise Refused(STATUS_INVALID_ARGUMENT, "Transaction UID (0008,1195) is missing")
    items = info.get("ReferencedSOPSequence") or []
    if len(items) > REFERENCES_PER_REQUEST_MAX:
        raise Refused(STATUS_RESOURCE_LIMITATION,
                      f"{len(items)} references, at most {REFERENCES_PER_REQUEST_MAX} per "
                      "request: split it")
    refs = []
    for item in items:
        sop = _uid(item.get("ReferencedSOPInstanceUID", ""), "a Referenced SOP Instance UID")
        if not sop:
            raise Refused(STATUS_INVALID_ARGUMENT,
                          "a Referenced SOP Sequence item has no SOP Instance UID")
        refs.append(Reference(_uid(item.get("ReferencedSOPClassUID", ""),
                                   "a Referenced SOP Class UID"), sop))
    if not refs:
        raise Refused(STATUS_INVALID_ARGUMENT, "Referenced SOP Sequence (0008,1199) is empty")
    return Request(uid, list(dict.fromkeys(refs)))


def error_comment(why: str) -> str:
    """`why` cut to what (0000,0902) holds; the log and audit trail keep it whole."""
    return why if len(why) <= ERROR_COMMENT_MAX else why[:ERROR_COMMENT_MAX - 3] + "..."


def _uid(value: object, what: str) -> str:
    uid = str(value).strip().rstrip("\x00")
    if len(uid) > UID_LENGTH_MAX:
        raise Refused(STATUS_INVALID_ARGUMENT, f"{what} is longer than {UID_LENGTH_MAX} "
                                               "characters")
    return uid


def _inflate(raw: bytes) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, REQUEST_BYTES_MAX + 1)
    except zlib.error as exc:
        raise Refused(STATUS_INVALID_ARGUMENT, f"deflated Action Information does not "
                                               f"inflate: {exc}") from exc
    if len(out) > REQUEST_BYTES_MAX:
        raise Refused(STATUS_RESOURCE_LIMITATION, f"over {REQUEST_BYTES_MAX} bytes of Action "
                                                  "Information inflated: split it")
    return out


def _too_big(size: int) -> Refused:
    return Refused(STATUS_RESOURCE_LIMITATION,
                   f"{size} bytes of Action Information, at most {REQUEST_BYTES_MAX}: split it")
