"""One reading of a version number written as text (the OIP's ``model_version``, its ``/versions/N`` route).

Python's ``int`` takes more than a version number: ``int("١") == 1`` (any Unicode digit), ``int("+1") == 1``,
``int("1_0") == 10``, and surrounding spaces. A version is ASCII digits and nothing else, within int64 as TF
Serving's ``model_spec.version`` is; every door that reads one as text uses :func:`parse_version`.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]{1,19}")
INT64_MAX = 2**63 - 1


def parse_version(text: str) -> int | None:
    """The version ``text`` names, or None when it is not ASCII digits within int64."""
    if _DIGITS.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= INT64_MAX else None
