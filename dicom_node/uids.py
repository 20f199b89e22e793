"""Validation of DICOM UIDs received from peers (PS3.5 9.1)."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def is_valid_uid(value: object, *, strict: bool = False) -> bool:
    """Whether ``value`` is a UID safe to use as a key: digits and dots, at most 64 chars.

    Leading zeros in components are tolerated unless ``strict`` (some modalities send
    them); anything else (``/``, ``..``, NUL, spaces, letters) is refused.
    """
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    pattern = _UID_RE if strict else _LENIENT_UID_RE
    return pattern.fullmatch(value) is not None
