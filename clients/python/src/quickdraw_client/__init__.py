"""quickdraw-client: call the Quick, Draw! classification gateway from Python, without the server or TensorFlow.

    from quickdraw_client import QuickDrawClient, AsyncQuickDrawClient, ClientSecurity

- :class:`QuickDrawClient` (blocking) and :class:`AsyncQuickDrawClient` (asyncio): ``classify`` (one call,
  many drawings), ``classify_stream`` (numpy arrays, image bytes or strokes in; each with its result out, as
  soon as it is ready), ``model_info``; UNAVAILABLE retried under a budget, a deadline on every call.
- :class:`ClientSecurity`: TLS, mTLS and a bearer token.
- ``quickdraw_client.v1``: the generated ``quickdraw.v1`` protobuf and gRPC code, for anything else.
- The ``quickdraw`` script: ``quickdraw classify FILE...``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it; imported on first use (PEP 562), so that ``quickdraw_client.cli``
#: and ``quickdraw_client.security`` load no gRPC until a call needs it.
_HOME = {
    "AsyncQuickDrawClient": "aio",
    "DEFAULT_TIMEOUT_S": "client",
    "RETRY_THROTTLING": "client",
    "QuickDrawClient": "client",
    "build_request": "client",
    "describe_error": "client",
    "describe_status": "client",
    "retry_service_config": "client",
    "BITMAP_PIXELS": "drawings",
    "BITMAP_SIDE": "drawings",
    "DrawingLike": "drawings",
    "Result": "drawings",
    "StreamItem": "drawings",
    "to_drawing": "drawings",
    "ClientSecurity": "security",
}

__all__ = [
    "BITMAP_PIXELS",
    "BITMAP_SIDE",
    "DEFAULT_TIMEOUT_S",
    "RETRY_THROTTLING",
    "AsyncQuickDrawClient",
    "ClientSecurity",
    "DrawingLike",
    "QuickDrawClient",
    "Result",
    "StreamItem",
    "build_request",
    "describe_error",
    "describe_status",
    "retry_service_config",
    "to_drawing",
]

if TYPE_CHECKING:
    from quickdraw_client.aio import AsyncQuickDrawClient
    from quickdraw_client.client import (
        DEFAULT_TIMEOUT_S,
        RETRY_THROTTLING,
        QuickDrawClient,
        build_request,
        describe_error,
        describe_status,
        retry_service_config,
    )
    from quickdraw_client.drawings import BITMAP_PIXELS, BITMAP_SIDE, DrawingLike, Result, StreamItem, to_drawing
    from quickdraw_client.security import ClientSecurity


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'quickdraw_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"quickdraw_client.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
