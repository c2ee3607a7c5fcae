"""The DICOM Upper Layer (PS3.8 section 9) and DIMSE command sets (PS3.7 section 9,
implicit VR little endian): just what a Storage SCP needs, without IO.

fast_store.py receives C-STORE associations with it, because pynetdicom's
receive path polls (1 ms sleeps in two threads per association) and reads a PDU
4 KiB at a time: with a handler that does nothing it takes ~275 CT instances/s on
one association and ~250 on four on this machine, less than Orthanc stores.

Everything here is a pure function of bytes, so the fuzz tests can drive it;
every malformed input raises UlError with what was wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_HEADER = struct.Struct(">BxL")  # type, reserved, length
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 1

# Presentation context results (PS3.8 table 9-18)
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4
# A-ASSOCIATE-RJ (result, source, reason), as pynetdicom sends them
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognized
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider, local limit exceeded
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent, ACSE, protocol version

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101  # Command Data Set Type: none
VERIFICATION = "1.2.840.10008.1.1"


class UlError(Exception):
    """Bytes that are not what PS3.8 or PS3.7 allow here; says what."""


@dataclass
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRq:
    called_ae: str
    calling_ae: str
    contexts: list[ProposedContext]
    max_pdu: int = 0  # the largest PDU the requestor takes (0: no limit)
    implementation_class: str = ""
    implementation_version: str = ""
    # SCP/SCU role selection items ({SOP class: (scu, scp)}): a requestor that wants
    # to be a Storage SCP is retrieving (C-GET), not storing
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)
    extended: bool = False  # any item beyond the common ones (async window, identity...)
    raw_called: bytes = b" " * 16
    raw_calling: bytes = b" " * 16


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def _items(data: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """(item type, value) for the items of a variable field (1-byte type, reserved,
    2-byte length)."""
    pos = start
    while pos < len(data):
        if pos + 4 > len(data):
            raise UlError("truncated item header")
        kind, length = data[pos], int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 4 + length
        if end > len(data):
            raise UlError(f"item 0x{kind:02x} runs past the end of its PDU")
        yield kind, data[pos + 4:end]
        pos = end


def parse_associate_rq(body: bytes) -> AssociateRq:
    """An A-ASSOCIATE-RQ's body (the bytes after the 6-byte PDU header)."""
    if len(body) < 68:
        raise UlError(f"A-ASSOCIATE-RQ of {len(body)} bytes is too short")
    rq = AssociateRq(called_ae=body[4:20].decode("ascii", "replace").strip(),
                     calling_ae=body[20:36].decode("ascii", "replace").strip(),
                     contexts=[], raw_called=bytes(body[4:20]), raw_calling=bytes(body[20:36]))
    if not int.from_bytes(body[0:2], "big") & PROTOCOL_VERSION:
        raise UlError("protocol version 1 not supported by the requestor")
    for kind, value in _items(body, 68):
        if kind == 0x20:
            rq.contexts.append(_context(value))
        elif kind == 0x50:
            _user_information(rq, value)
        elif kind != 0x10:
            raise UlError(f"unknown item 0x{kind:02x} in A-ASSOCIATE-RQ")
    if not rq.contexts:
        raise UlError("A-ASSOCIATE-RQ proposes no presentation context")
    return rq


def _context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise UlError("truncated presentation context item")
    cx = ProposedContext(value[0], "", [])
    for kind, sub in _items(value, 4):
        if kind == 0x30:
            cx.abstract_syntax = _uid(sub)
        elif kind == 0x40:
            cx.transfer_syntaxes.append(_uid(sub))
        else:
            raise UlError(f"unknown sub-item 0x{kind:02x} in presentation context "
                          f"{cx.context_id}")
    if not cx.context_id % 2 or not cx.abstract_syntax or not cx.transfer_syntaxes:
        raise UlError(f"presentation context {cx.context_id} is malformed")
    return cx


def _user_information(rq: AssociateRq, value: bytes) -> None:
    for kind, sub in _items(value, 0):
        if kind == 0x51:
            if len(sub) != 4:
                raise UlError("maximum length item is not 4 bytes")
            rq.max_pdu = int.from_bytes(sub, "big")
        elif kind == 0x52:
            rq.implementation_class = _uid(sub)
        elif kind == 0x55:
            rq.implementation_version = sub.decode("ascii", "replace").strip()
        elif kind == 0x54:
            if len(sub) < 4:
                raise UlError("truncated role selection item")
            n = int.from_bytes(sub[0:2], "big")
            if len(sub) != n + 4:
                raise UlError("role selection item has the wrong length")
            rq.roles[_uid(sub[2:2 + n])] = (sub[2 + n], sub[3 + n])
        else:  # 0x53 async window, 0x56/0x57 extended negotiation, 0x58 user identity
            rq.extended = True


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(kind, len(body)) + body


def associate_ac(rq: AssociateRq, results: list[tuple[int, int, str]], max_pdu: int,
                 implementation_class: str, implementation_version: str) -> bytes:
    """The A-ASSOCIATE-AC for `rq`: `results` are (context id, result, transfer syntax)
    in the order proposed; `max_pdu` is the largest PDU we take."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for context_id, result, ts in results:
        items.append(_item(0x21, bytes((context_id, 0, result, 0))
                           + _item(0x40, ts.encode())))
    user = (_item(0x51, max_pdu.to_bytes(4, "big"))
            + _item(0x52, implementation_class.encode())
            + _item(0x55, implementation_version.encode()))
    items.append(_item(0x50, user))
    head = (PROTOCOL_VERSION.to_bytes(2, "big") + b"\x00\x00" + rq.raw_called
            + rq.raw_calling + b"\x00" * 32)
    return _pdu(ASSOCIATE_AC, head + b"".join(items))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes((0, result, source, reason)))


def release_rp() -> bytes:
    return _pdu(RELEASE_RP, b"\x00" * 4)


def abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    """A-ABORT; by default from the service provider, reason not specified."""
    return _pdu(ABORT, bytes((0, 0, source, reason)))


@dataclass(frozen=True)
class Pdv:
    context_id: int
    command: bool  # a command fragment (else data set)
    last: bool  # the last fragment of its command or data set
    start: int  # the fragment's bytes are body[start:end] of its P-DATA-TF
    end: int


def pdvs(body: bytes | bytearray | memoryview) -> list[Pdv]:
    """The presentation data values of a P-DATA-TF body, as offsets (no copies)."""
    out = []
    pos, size = 0, len(body)
    while pos < size:
        if pos + 6 > size:
            raise UlError("truncated PDV item header")
        length = int.from_bytes(body[pos:pos + 4], "big")
        if length < 2 or pos + 4 + length > size:
            raise UlError(f"PDV item of {length} bytes does not fit its PDU")
        control = body[pos + 5]
        out.append(Pdv(body[pos + 4], bool(control & 1), bool(control & 2), pos + 6,
                       pos + 4 + length))
        pos += 4 + length
    if not out:
        raise UlError("P-DATA-TF without a PDV")
    return out


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF carrying a whole command set (ours are far below any PDU limit)."""
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03)  # command, last
    return _pdu(P_DATA_TF, pdv + command)


# ---- DIMSE command sets: implicit VR little endian, group 0000 ------------------------------

_ELEMENT = struct.Struct("<HHL")
_US = {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1031}  # unsigned shorts we read


def parse_command(data: bytes | bytearray) -> dict[int, int | str]:
    """Element number -> value of a command set (group 0000 only; US as int, the rest
    as stripped text)."""
    out: dict[int, int | str] = {}
    pos, size = 0, len(data)
    while pos < size:
        if pos + 8 > size:
            raise UlError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > size:
            raise UlError(f"command element ({group:04x},{element:04x}) is malformed")
        value = bytes(data[pos:pos + length])
        pos += length
        if element in _US:
            if length != 2:
                raise UlError(f"command element (0000,{element:04x}) is not 2 bytes")
            out[element] = int.from_bytes(value, "little")
        elif element != 0x0000:
            out[element] = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return out


def _text(element: int, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    if len(raw) % 2:
        raw += pad
    return _ELEMENT.pack(0x0000, element, len(raw)) + raw


def _us(element: int, value: int) -> bytes:
    return _ELEMENT.pack(0x0000, element, 2) + value.to_bytes(2, "little")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str,
              implementation_class: str, implementation_version: str,
              source_ae: str) -> bytes:
    """A File Meta Information group (PS3.10 7.1, explicit VR little endian), the same
    bytes pydicom's writer makes for these values (what pynetdicom's path stores),
    without building a Dataset: that took ~0.5 ms per C-STORE."""
    body = [struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _meta_element(0x0002, b"UI", _even(sop_class, b"\x00")),
            _meta_element(0x0003, b"UI", _even(sop_instance, b"\x00")),
            _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", _even(implementation_class, b"\x00")),
            _meta_element(0x0013, b"SH", _even(implementation_version, b" "))]
    if source_ae:
        body.append(_meta_element(0x0016, b"AE", _even(source_ae, b" ")))
    rest = b"".join(body)
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(rest)) + rest


def response(command_field: int, message_id: int, sop_class: str, sop_instance: str,
             status: int, comment: str = "") -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set."""
    body = [_text(0x0002, sop_class, b"\x00"), _us(0x0100, command_field),
            _us(0x0120, message_id), _us(0x0800, NO_DATASET), _us(0x0900, status)]
    if comment:
        body.append(_text(0x0902, comment[:64], b" "))
    if sop_instance:
        body.append(_text(0x1000, sop_instance, b"\x00"))
    rest = b"".join(body)
    return _ELEMENT.pack(0x0000, 0x0000, 4) + len(rest).to_bytes(4, "little") + rest
