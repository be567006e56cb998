"""What every HTTP door reads from a request's headers the same way: the caller's deadline."""

from __future__ import annotations

import math
import time

from aiohttp import web

from service.core.errors import FieldViolation, InvalidArgument

#: The deadline header Google's JSON APIs read: seconds, a decimal number.
TIMEOUT_HEADER = "X-Server-Timeout"


def deadline(request: web.Request) -> float | None:
    """The deadline the ``X-Server-Timeout`` header sets, on the monotonic clock (None: no header)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument([FieldViolation(f"{TIMEOUT_HEADER} header", f"is {raw!r}; expected seconds > 0")])
    return time.monotonic() + seconds
