"""DIMSE response statuses with their reason in words (PS3.7 Annex C)."""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
ERROR_COMMENT_LEN_MAX = 64  # Error Comment (0000,0902) is LO


def status(code: int, comment: str = "") -> Dataset:
    """A response status carrying the reason in Error Comment (cut to fit)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:ERROR_COMMENT_LEN_MAX]
    return ds
