"""Text in the character set an instance or a query names: Specific Character Set
(0008,0005), PS3.3 C.12.1.1.2 and PS3.5 6.1.

pydicom holds the table of DICOM terms and the ISO 2022 escape handling
(`pydicom.charset`, `PersonName`); this module adds what the archive decides:

- decoding: a stored value is decoded with its own instance's set when the
  manifest is built, so every manifest and catalog record holds text (PN with
  each component group decoded separately, as escape sequences reset there);
- which sets can carry a value, for answering a query in its own set;
- which texts an older pacsmesh may have decoded wrongly (`maybe_misdecoded`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.valuerep import PersonName

LOGGER = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
# Characters that reset an ISO 2022 code extension in text VRs (PS3.5 6.1.2.5.3).
TEXT_DELIMITERS = frozenset({0x09, 0x0A, 0x0C, 0x0D})
# pydicom maps the default repertoire to Latin-1 (so stray high bytes still decode);
# a value we write in it must be plain ASCII, as the standard says.
DEFAULT_PY_ENCODING = "iso8859"


def terms_of(value: object) -> tuple[str, ...]:
    """The defined terms of a Specific Character Set value (str, list or raw bytes)."""
    if value is None:
        return ()
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        parts = value.split("\\")
    elif isinstance(value, Iterable):  # pydicom's MultiValue, a list
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    terms = tuple(p.strip(" \x00") for p in parts)
    return () if not any(terms) else terms


@functools.lru_cache(maxsize=256)
def encodings(terms: tuple[str, ...]) -> tuple[str, ...]:
    """Python codecs for the terms. Unknown terms become the default; cached, so pydicom
    warns once per term, not once per value (a whole archive may misspell one)."""
    return tuple(convert_encodings(list(terms) or [""]))


def decode(raw: bytes, terms: tuple[str, ...], vr: str) -> str:
    """One stored value as text, trailing padding removed. Never raises: bytes that do
    not decode in the named set come back with replacement characters."""
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return ""
    encs = list(encodings(terms))
    if b"\x1b" not in raw:  # no code extension: one codec for the whole value
        # (pydicom does the same, but warns on every bad value: we keep logs quiet)
        try:
            return raw.decode(encs[0]).strip()
        except UnicodeError:
            return raw.decode(encs[0], "replace").strip()
    try:  # escape sequences: pydicom switches codecs, per PN component group
        if vr == "PN":
            return str(PersonName(raw).decode(encs)).strip()
        return decode_bytes(raw, encs, set(TEXT_DELIMITERS)).strip()
    except (LookupError, ValueError) as exc:  # codec trouble pydicom does not catch
        LOGGER.debug("value undecodable in %s: %s", terms, exc)
        return raw.decode("latin-1").strip()


def _char_encodable(ch: str, py_encoding: str) -> bool:
    try:
        raw = ch.encode("ascii" if py_encoding == DEFAULT_PY_ENCODING else py_encoding)
    except (UnicodeError, LookupError):
        return False
    # DICOM's ISO_IR 13 is JIS X 0201 only: one byte, never the two-byte part of Shift JIS
    return not (py_encoding == "shift_jis" and len(raw) != 1)


def represents(terms: tuple[str, ...], value: str, vr: str) -> bool:
    """Can `value` be written in these sets and read back unchanged?"""
    if value.isascii():
        return True
    encs = encodings(terms)
    # checked per character first: pydicom warns, then writes '?', where no set fits
    if not all(any(_char_encodable(ch, e) for e in encs) for ch in value if not ch.isascii()):
        return False
    try:
        if vr == "PN":
            raw = PersonName(value).encode(list(encs))
        else:
            raw = encode_string(value, list(encs))
    except (UnicodeError, LookupError, ValueError):
        return False
    return decode(raw, terms, vr) == value.strip()


def response_terms(query_terms: tuple[str, ...], values: Sequence[tuple[str, str]]
                   ) -> tuple[str, ...]:
    """The Specific Character Set of a response holding `values` ((VR, text) pairs):
    the query's own when it can carry every value (the client asked in it, so it reads
    it), else UTF-8, which carries anything. ASCII-only answers keep the query's."""
    if all(v.isascii() for _, v in values):
        return query_terms
    if query_terms and all(represents(query_terms, v, vr) for vr, v in values):
        return query_terms
    return (UTF8,)


def maybe_misdecoded(text: str) -> bool:
    """Could an older pacsmesh have decoded this text with the wrong set? Before
    character sets were honoured, values were read as UTF-8 under ISO_IR 192 and as
    Latin-1 otherwise: a text holding something beyond printable ASCII (ISO 2022
    escapes included) but nothing beyond Latin-1 may be another set's bytes."""
    if text.isascii():
        return any(ch < " " for ch in text)
    return all(ord(ch) <= 0xFF for ch in text)
