"""DICOM UID validation. UIDs become path components on restore, so nothing else
may pass: digits and dots only, no empty component, at most 64 characters."""

from __future__ import annotations

import re

UID_LEN_MAX = 64
# PS3.5 9.1 forbids leading zeros in components, but real modalities emit them;
# they are still path-safe, so we accept them rather than refuse patient data.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def uid_problem(value: str) -> str | None:
    """Why `value` is not a valid UID, or None if it is."""
    if not value:
        return "is empty"
    if len(value) > UID_LEN_MAX:
        return f"is {len(value)} characters long (at most {UID_LEN_MAX})"
    if not _UID_RE.fullmatch(value):
        shown = value if len(value) <= UID_LEN_MAX else value[:UID_LEN_MAX] + "..."
        return f"{shown!r} has characters other than digits and single dots"
    return None


def is_valid_uid(value: str) -> bool:
    return uid_problem(value) is None
