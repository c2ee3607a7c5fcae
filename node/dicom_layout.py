"""Where things are in a DICOM Part 10 file, found by walking element headers.

The walk reads only element headers and a few small identity values, and seeks
over everything else, so it costs the same for a 500 KB slice and a 5 GB
multi-frame: that is what lets both the CLI and the node validate every file
before it is stored. pydicom would load what we skip.

What the walk proves: a 'DICM' Part 10 file with a file meta group and a
transfer syntax, whose every element (nested sequences included) fits in the
file, ending exactly at the end of the file, with valid study, series and SOP
instance UIDs. A truncated file fails here, with the offset where it breaks.
A deflated dataset (one zlib stream) is inflated as the walk goes, and walked up
to its Pixel Data.

Text values are decoded with the instance's own Specific Character Set (read
before them: (0008,0005) is the first text element), so manifests hold text in
any set, not bytes (node/charset.py).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Protocol

from pacsmesh.node import charset
from pacsmesh.node.errors import InvalidInstance
from pacsmesh.node.uids import uid_problem

PREAMBLE_LEN = 128
DEFLATED_TS = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")
IMPLICIT_LE_TS = "1.2.840.10008.1.2"
EXPLICIT_BE_TS = "1.2.840.10008.1.2.2"

UNDEFINED_LEN = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIM = 0xFFFEE00D
SEQ_DELIM = 0xFFFEE0DD
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double Float
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
INFLATE_READ = 64 << 10  # deflated bytes inflated per step of the walk
# What a deflated dataset may inflate to before its Pixel Data (or its end, with none):
# far past any real header, and well under a second of zlib.
INFLATED_MAX = 256 << 20
NESTING_DEPTH_MAX = 32  # real datasets nest a handful deep; more is malformed or hostile
ELEMENTS_MAX = 10_000_000  # bounds the walk: ~50x the fragments of the largest real multi-frame
VALUE_READ_MAX = 1024  # identity values are short; longer ones are skipped, not read

# Top-level attributes a manifest carries: tag -> manifest field name.
WANTED: dict[int, str] = {
    0x00080005: "specific_character_set",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080020: "study_date",
    0x00080030: "study_time",
    0x00080050: "accession_number",
    0x00080060: "modality",
    0x00081030: "study_description",
    0x0008103E: "series_description",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x00100030: "patient_birth_date",
    0x00100040: "patient_sex",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00200010: "study_id",
    0x00200011: "series_number",
    0x00200013: "instance_number",
}
# Wanted attributes whose value is text in the instance's character set, by VR; the
# others (UIDs, dates, code strings, numbers) are ASCII by definition.
TEXT_VRS: dict[int, str] = {
    0x00080050: "SH",  # accession number
    0x00081030: "LO",
    0x0008103E: "LO",
    0x00100010: "PN",
    0x00100020: "LO",  # patient id
    0x00200010: "SH",  # study id
}
TEXT_FIELDS = tuple(WANTED[tag] for tag in TEXT_VRS)
META_WANTED: dict[int, str] = {
    0x00020002: "media_storage_sop_class_uid",
    0x00020003: "media_storage_sop_instance_uid",
    0x00020010: "transfer_syntax_uid",
}
REQUIRED_UIDS = (
    ("sop_instance_uid", "SOP Instance UID (0008,0018)"),
    ("study_instance_uid", "Study Instance UID (0020,000D)"),
    ("series_instance_uid", "Series Instance UID (0020,000E)"),
)


@dataclass(frozen=True)
class Layout:
    size: int
    header_len: int  # bytes before the Pixel Data value; the whole size if there is none
    transfer_syntax_uid: str
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def sop_instance_uid(self) -> str:
        return self.attrs["sop_instance_uid"]

    @property
    def study_instance_uid(self) -> str:
        return self.attrs["study_instance_uid"]

    @property
    def series_instance_uid(self) -> str:
        return self.attrs["series_instance_uid"]


class BinaryIO(Protocol):
    """What the walk needs of a file: a local file, BytesIO, or chunks of the store."""

    def read(self, n: int = -1, /) -> bytes: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...


def _fmt_tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp = fp
        self.size = size
        self.elements = 0
        self.pixel_value_start: int | None = None
        self.stop_at_pixels = False
        self.charset: tuple[str, ...] = ()  # Specific Character Set, once read

    def more(self) -> bool:
        return self.fp.tell() < self.size

    def read_exact(self, n: int, what: str) -> bytes:
        pos = self.fp.tell()
        data = self.fp.read(n)
        if len(data) != n:
            raise InvalidInstance(
                f"truncated: {what} at byte {pos} needs {n} bytes, the file ends at {self.size}"
            )
        return data

    def skip(self, n: int, tag: int, pos: int) -> None:
        end = self.fp.tell() + n
        if end > self.size:
            raise InvalidInstance(
                f"truncated: element {_fmt_tag(tag)} at byte {pos} has a value of {n} bytes "
                f"ending at byte {end}, but the file ends at {self.size}"
            )
        self.fp.seek(end)

    def element_header(self, explicit: bool, big: bool) -> tuple[int, bytes, int, int]:
        """(tag, vr, length, position of the tag)."""
        self.elements += 1
        if self.elements > ELEMENTS_MAX:
            raise InvalidInstance(f"more than {ELEMENTS_MAX} elements: refusing to walk further")
        pos = self.fp.tell()
        raw = self.read_exact(8, "element header")
        e = ">" if big else "<"
        group, elem = struct.unpack(e + "HH", raw[:4])
        tag = (group << 16) | elem
        if group == 0xFFFE:  # items and delimiters never carry a VR
            return tag, b"", struct.unpack(e + "I", raw[4:])[0], pos
        if not explicit:
            return tag, b"", struct.unpack(e + "I", raw[4:])[0], pos
        vr = raw[4:6]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise InvalidInstance(
                f"malformed element {_fmt_tag(tag)} at byte {pos}: VR bytes {vr!r} are not a VR"
            )
        if vr in LONG_VRS:
            length = struct.unpack(e + "I", self.read_exact(4, "element length"))[0]
        else:
            length = struct.unpack(e + "H", raw[6:8])[0]
        return tag, vr, length, pos

    def walk_items(self, explicit: bool, big: bool, depth: int, owner: int, pos: int) -> None:
        """Walk the items of an undefined-length sequence up to its delimiter."""
        if depth > NESTING_DEPTH_MAX:
            raise InvalidInstance(
                f"sequences nested deeper than {NESTING_DEPTH_MAX} at byte {pos}")
        while True:
            tag, _, length, ipos = self.element_header(explicit=False, big=big)
            if tag == SEQ_DELIM:
                return
            if tag != ITEM:
                raise InvalidInstance(
                    f"malformed sequence {_fmt_tag(owner)} at byte {pos}: "
                    f"expected an item at byte {ipos}, found {_fmt_tag(tag)}"
                )
            if length == UNDEFINED_LEN:
                self.walk_dataset(explicit, big, depth + 1, until_item_delim=True)
            else:
                self.skip(length, tag, ipos)

    def walk_dataset(
        self,
        explicit: bool,
        big: bool,
        depth: int,
        until_item_delim: bool = False,
        attrs: dict[str, str] | None = None,
    ) -> None:
        while self.more():
            tag, vr, length, pos = self.element_header(explicit, big)
            if tag == ITEM_DELIM:
                if until_item_delim:
                    return
                raise InvalidInstance(f"stray item delimiter at byte {pos}")
            if depth == 0 and tag in PIXEL_TAGS and self.pixel_value_start is None:
                self.pixel_value_start = self.fp.tell()
                if self.stop_at_pixels:
                    return
            if length == UNDEFINED_LEN:
                # Undefined length: a sequence, encapsulated pixel data, or UN holding
                # an implicit-VR sequence (PS3.5 6.2.2).
                inner_explicit = explicit and vr != b"UN"
                self.walk_items(inner_explicit, big, depth, tag, pos)
                continue
            if attrs is not None and tag in WANTED and length <= VALUE_READ_MAX:
                value = self.read_exact(length, "element value")
                if tag == 0x00080005:
                    self.charset = charset.terms_of(value)
                attrs[WANTED[tag]] = _decode(value, self.charset, TEXT_VRS.get(tag, ""))
            else:
                self.skip(length, tag, pos)
        if until_item_delim:
            raise InvalidInstance(
                f"truncated: an item has no delimiter before the end ({self.size})")


def _decode(value: bytes, terms: tuple[str, ...], vr: str) -> str:
    if vr:
        return charset.decode(value, terms, vr)
    return value.rstrip(b"\x00 ").decode("latin-1").strip()


def _read_meta(w: _Walker) -> dict[str, str]:
    """The file meta group: always explicit VR little endian (PS3.10 7.1)."""
    meta: dict[str, str] = {}
    while w.fp.tell() < w.size:
        pos = w.fp.tell()
        peek = w.fp.read(2)
        w.fp.seek(pos)
        if len(peek) < 2 or struct.unpack("<H", peek)[0] != 0x0002:
            break
        tag, _, length, pos = w.element_header(explicit=True, big=False)
        if length == UNDEFINED_LEN:
            raise InvalidInstance(f"malformed file meta element {_fmt_tag(tag)} at byte {pos}")
        if tag in META_WANTED and length <= VALUE_READ_MAX:
            meta[META_WANTED[tag]] = _decode(w.read_exact(length, "file meta value"), (), "")
        else:
            w.skip(length, tag, pos)
    return meta


def scan(fp: BinaryIO, size: int) -> Layout:
    """Validate a Part 10 file and find its layout. Raises InvalidInstance with the reason."""
    if size == 0:
        raise InvalidInstance("empty file")
    head = fp.read(PREAMBLE_LEN + 4)
    if len(head) < PREAMBLE_LEN + 4 or head[PREAMBLE_LEN:] != b"DICM":
        raise InvalidInstance(
            "not a DICOM Part 10 file: no 'DICM' marker after the 128-byte preamble"
        )
    w = _Walker(fp, size)
    meta = _read_meta(w)
    ts = meta.get("transfer_syntax_uid", "")
    if not ts:
        raise InvalidInstance("file meta has no Transfer Syntax UID (0002,0010)")
    if problem := uid_problem(ts):
        raise InvalidInstance(f"Transfer Syntax UID {problem}")
    attrs: dict[str, str] = {}
    if ts in DEFLATED_TS:
        attrs = _deflated_attrs(fp, size)
        header_len = size
    else:
        explicit = ts != IMPLICIT_LE_TS
        big = ts == EXPLICIT_BE_TS
        explicit = explicit and _looks_explicit(fp)
        w.walk_dataset(explicit, big, depth=0, attrs=attrs)
        header_len = w.pixel_value_start if w.pixel_value_start is not None else size
    attrs.pop("specific_character_set", None)
    for key, name in REQUIRED_UIDS:
        value = attrs.get(key, "")
        if not value:
            raise InvalidInstance(f"no {name}")
        if problem := uid_problem(value):
            raise InvalidInstance(f"invalid {name}: {problem}")
    if (cls := attrs.get("sop_class_uid")) and (problem := uid_problem(cls)):
        raise InvalidInstance(f"invalid SOP Class UID (0008,0016): {problem}")
    return Layout(size=size, header_len=header_len, transfer_syntax_uid=ts, attrs=attrs)


def header_attrs(fp: BinaryIO, size: int) -> dict[str, str]:
    """The manifest attributes of an instance `scan` accepted once, read again: the walk
    stops at the Pixel Data, so only the header is read (for re-decoding text that an
    older version decoded with the wrong character set)."""
    head = fp.read(PREAMBLE_LEN + 4)
    if len(head) < PREAMBLE_LEN + 4 or head[PREAMBLE_LEN:] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 file")
    w = _Walker(fp, size)
    ts = _read_meta(w).get("transfer_syntax_uid", "")
    if ts in DEFLATED_TS:
        attrs = _deflated_attrs(fp, size)
    else:
        attrs = {}
        w.stop_at_pixels = True
        w.walk_dataset(ts != IMPLICIT_LE_TS and _looks_explicit(fp), ts == EXPLICIT_BE_TS,
                       depth=0, attrs=attrs)
    attrs.pop("specific_character_set", None)
    return attrs


def _looks_explicit(fp: BinaryIO) -> bool:
    """Some writers label an implicit-VR dataset as explicit; like pydicom, trust the
    bytes: if the first element has no VR letters, the dataset is implicit."""
    pos = fp.tell()
    raw = fp.read(6)
    fp.seek(pos)
    return len(raw) < 6 or (65 <= raw[4] <= 90 and 65 <= raw[5] <= 90)


def _deflated_attrs(fp: BinaryIO, size: int) -> dict[str, str]:
    """Deflated datasets are one raw deflate stream (PS3.5 A.5): walk it as it inflates,
    up to the Pixel Data. Inflating it whole first would let a small file take any
    amount of memory (deflate reaches ~1000:1)."""
    start = fp.tell()
    w = _InflatingWalker(_Inflating(fp, size - start))
    w.stop_at_pixels = True
    attrs: dict[str, str] = {}
    try:
        w.walk_dataset(explicit=True, big=False, depth=0, attrs=attrs)
    finally:
        fp.seek(start)
    return attrs


class _Inflating:
    """A deflated stream read forward as its inflated bytes, holding one step at a time."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self._fp, self._left = fp, size
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf, self._off = b"", 0  # inflated, not read yet: self._buf[self._off:]
        self._pos = 0  # inflated bytes read

    def tell(self) -> int:
        return self._pos

    def _fill(self, n: int) -> None:
        while len(self._buf) - self._off < n and not self._z.eof:
            data = self._z.unconsumed_tail
            if not data:
                data = self._fp.read(min(INFLATE_READ, self._left)) if self._left > 0 else b""
                self._left -= len(data)
                if not data:
                    return
            try:
                more = self._z.decompress(data, max(n, INFLATE_READ))
            except zlib.error as exc:
                raise InvalidInstance(f"deflated dataset does not inflate: {exc}") from exc
            self._buf, self._off = self._buf[self._off :] + more, 0
            if self._pos + len(self._buf) > INFLATED_MAX:
                raise InvalidInstance(
                    f"deflated dataset inflates past {INFLATED_MAX} bytes before its Pixel Data")

    def read(self, n: int = -1, /) -> bytes:
        n = INFLATED_MAX if n < 0 else n
        self._fill(n)
        out = self._buf[self._off : self._off + n]
        self._off += len(out)
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = 0, /) -> int:
        """Forward only (the walk never goes back); stops at the end of the stream."""
        while self._pos < offset and self.read(min(offset - self._pos, INFLATE_READ)):
            pass
        return self._pos

    def at_end(self) -> bool:
        self._fill(1)
        return self._off == len(self._buf)


class _InflatingWalker(_Walker):
    """The walk over an inflating stream, whose end is known only once it is reached."""

    def __init__(self, stream: _Inflating) -> None:
        super().__init__(stream, INFLATED_MAX)
        self.stream = stream

    def more(self) -> bool:
        return not self.stream.at_end()

    def read_exact(self, n: int, what: str) -> bytes:
        pos = self.fp.tell()
        data = self.fp.read(n)
        if len(data) != n:
            raise InvalidInstance(f"truncated: {what} at inflated byte {pos} needs {n} bytes, "
                                  f"the deflated dataset ends at {self.fp.tell()}")
        return data

    def skip(self, n: int, tag: int, pos: int) -> None:
        end = self.fp.tell() + n
        if self.fp.seek(end) != end:
            raise InvalidInstance(
                f"truncated: element {_fmt_tag(tag)} at inflated byte {pos} has a value of "
                f"{n} bytes ending at {end}, but the deflated dataset ends at {self.fp.tell()}")
