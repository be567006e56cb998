"""Large JSON bodies parsed in worker processes, so that the event loop never waits for the GIL behind a parser.

``json.loads`` is one C call that holds the GIL throughout: measured on the 2-core development machine, a
16 MiB body (the JSON API's limit) of 345,600 long numbers took 194 ms, and the whole parse into a
ClassifyRequest (``service.frontends.http.server.parse_body``) 298 ms. On a thread, that would still stall the event
loop (and
with it grpc health) for the whole ``json.loads``. So a body over ``PROCESS_PARSE_BYTES`` is sent to a worker
process, which parses it exactly as ``parse_body`` does on the gateway and answers the request serialized as
protobuf; the gateway then handles those bytes as it handles a gRPC request's (counted on the wire, parsed and
validated on a preprocessing thread). Sending 16 MiB through a pipe and taking back at most
``max_message_bytes`` are copies, milliseconds each.

Workers come from the ``forkserver`` that ``service.preprocess.decode`` starts (nothing of the gateway's threads or
TensorFlow is forked) and are started with the HTTP server, before the first request.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from quickdraw_client.v1 import classifier_pb2 as pb
from service.core.errors import FieldViolation, InvalidArgument, PayloadTooLarge, ServiceError
from service.frontends.http.jsonbody import parse_body
from service.preprocess.validation import Limits
from service.runtime.lifetime import die_with_parent

log = logging.getLogger(__name__)


def parse_classify(raw: bytes, max_message_bytes: int, limits: Limits) -> tuple[str, Any, Any]:
    """In a worker: a ClassifyRequest body as ``("ok", serialized bytes, None)``, or its refusal as plain data
    (``("invalid", [(field, description)], message)`` or ``("too_large", message, None)``)."""
    try:
        message = parse_body(raw, pb.ClassifyRequest(), max_message_bytes, limits)
    except PayloadTooLarge as exc:
        return "too_large", exc.message, None
    except InvalidArgument as exc:
        return "invalid", [(v.field, v.description) for v in exc.violations], exc.message
    return "ok", message.SerializeToString(), None


def refusal(exc: ServiceError) -> tuple[str, Any, Any]:
    """A worker's refusal as plain data (ServiceErrors do not pickle): what :meth:`JsonParsePool.run` raises."""
    if isinstance(exc, PayloadTooLarge):
        return "too_large", exc.message, None
    if isinstance(exc, InvalidArgument):
        return "invalid", [(v.field, v.description) for v in exc.violations], exc.message
    raise exc


#: What a worker imports before the first request waits for it: the parsers of both JSON doors (by name: the
#: doors import this module, and a worker needs nothing else of them).
PRELOAD = ("service.frontends.http.jsonbody", "service.frontends.oip.http_api")


def _ready() -> bool:
    for name in PRELOAD:
        importlib.import_module(name)
    return True


class JsonParsePool:
    """``workers`` processes that turn large ClassifyRequest JSON bodies into protobuf bytes."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start every worker and wait until each has imported the parser (blocking: call it on a thread)."""
        ctx = multiprocessing.get_context("forkserver")
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=die_with_parent)
        for future in [self._pool.submit(_ready) for _ in range(self.workers)]:
            future.result(timeout=60)

    async def parse(self, raw: bytes, max_message_bytes: int, limits: Limits) -> bytes:
        """The body as a serialized ClassifyRequest; raises what ``parse_body`` would."""
        return await self.run(parse_classify, raw, max_message_bytes, limits)  # type: ignore[no-any-return]

    async def run(self, fn: Callable[..., tuple[str, Any, Any]], *args: Any) -> Any:
        """``fn(*args)`` in a worker: a module-level function that answers as :func:`parse_classify` does
        (``("ok", value, None)`` or a refusal as plain data, which this raises as its ServiceError)."""
        if self._pool is None:
            raise ServiceError("the JSON parse workers are not started")
        loop = asyncio.get_running_loop()
        kind, value, message = await loop.run_in_executor(self._pool, fn, *args)
        if kind == "too_large":
            raise PayloadTooLarge(value)
        if kind == "invalid":
            raise InvalidArgument([FieldViolation(f, d) for f, d in value], message)
        return value

    def close(self) -> None:
        """Stop the workers."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
