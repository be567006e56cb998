"""The Python client, as the server package has always named it: a re-export of the client distribution.

The implementation lives in ``clients/python`` (package ``quickdraw_client``, installable without the server or
TensorFlow: ``pip install ./clients/python``); this module only gives its names their old import path, so
``from service.client import QuickDrawClient`` and ``from quickdraw_client import QuickDrawClient`` are the same
class. See ``quickdraw_client`` for the blocking and asyncio clients, the stream helper, retries and TLS.
"""

from __future__ import annotations

from quickdraw_client.aio import AsyncQuickDrawClient
from quickdraw_client.client import (
    DEFAULT_TIMEOUT_S,
    RETRY_THROTTLING,
    QuickDrawClient,
    build_request,
    channel_options,
    describe_error,
    describe_status,
    retry_service_config,
)
from quickdraw_client.drawings import DrawingLike, Result, StreamItem, StrokeList, to_drawing
from quickdraw_client.security import ClientSecurity

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RETRY_THROTTLING",
    "AsyncQuickDrawClient",
    "ClientSecurity",
    "DrawingLike",
    "QuickDrawClient",
    "Result",
    "StreamItem",
    "StrokeList",
    "build_request",
    "channel_options",
    "describe_error",
    "describe_status",
    "retry_service_config",
    "to_drawing",
]
