"""What every gRPC door shares: the unary wrapper (latency by method and code, ServiceErrors as rich statuses),
the caller's deadline, parsing a request the door took as bytes, and the windowed answering of a request stream
(ClassifyStream and the OIP's ModelStreamInfer) with its open-stream cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from service.core.calls import Observed, service_error
from service.core.errors import FieldViolation, InvalidArgument, Unavailable, to_rpc_status
from service.core.metrics import Metrics
from service.core.streams import StreamSlots
from service.preprocess.wire import Wire

#: Most stream messages handled at once per stream; beyond it the stream stops reading (flow control).
STREAM_WINDOW = 256
#: Most bytes held at once per stream: of requests read but not yet answered on the wire, and of their answers
#: (each message holds the larger of its own size and its answer's bound, ``Converted.answer_bytes``). A message
#: larger than this is still let in alone, so one stream holds at most max(this, max_message_bytes).
STREAM_WINDOW_BYTES = 4 * 1024 * 1024
M = TypeVar("M", bound=Message)
T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
#: A stream message's hold on its window for its answer: ``await reserve(answer_bytes)``.
Reserve = Callable[[int], Awaitable[None]]


def parse_message(cls: type[M], raw: Wire) -> M:
    """``raw`` parsed as a ``cls``; bytes that are not one are INVALID_ARGUMENT (a client fault), not UNKNOWN."""
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        reason = f"is not a valid {cls.DESCRIPTOR.full_name} in protobuf's wire format: {exc}"
        raise InvalidArgument([FieldViolation("", reason)], f"request {reason}") from None


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the monotonic clock (None: it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def unary(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Record latency by method and code, and turn ServiceErrors into rich gRPC statuses, in one place.

    For the methods of any servicer with a ``metrics`` attribute (every gRPC door).
    """

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            with Observed(self.metrics, method, deadline(context)) as call:
                try:
                    return await fn(self, request, context)
                except Exception as exc:
                    err = service_error(exc)
                    call.fail(err)
                    await context.abort_with_status(rpc_status.to_status(to_rpc_status(err)))
                    raise  # not reached: abort raises

        return handler

    return wrap


async def refuse_stream(
    metrics: Metrics, method: str, streams: StreamSlots, ready: bool, context: grpc.aio.ServicerContext
) -> bool:
    """Refuse a new stream (and return True) while the model loads or when every stream slot is taken, before
    reading any of it: the open-stream cap every streaming door shares."""
    refusal = Unavailable("the model is still loading; retry shortly") if not ready else streams.refusal(method)
    if refusal is None:
        return False
    with Observed(metrics, method) as call:
        call.fail(refusal)
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(refusal)))
    return True


async def windowed_answers(
    request_iterator: AsyncIterator[A], size_of: Callable[[A], int],
    answer: Callable[[A, Reserve], Awaitable[R]],
) -> AsyncIterator[R]:  # fmt: skip
    """A request stream's messages answered concurrently, each answer yielded once it is ready.

    At most ``STREAM_WINDOW`` messages and ``STREAM_WINDOW_BYTES`` are held per stream, read but not yet answered
    on the wire (``ByteWindow``): each message holds its size (``size_of``) from when it is read, and the bound of
    its answer from when the data plane knows it (``answer``'s second argument, the pipeline's ``Call.reserve``);
    reading waits for room. ``answer`` must answer every message, errors included (it must not raise).
    """
    answers: asyncio.Queue[tuple[R, list[int]] | None] = asyncio.Queue()
    window = ByteWindow(STREAM_WINDOW, STREAM_WINDOW_BYTES)
    tasks: set[asyncio.Task[None]] = set()

    async def one(msg: A, held: list[int]) -> None:
        async def reserve(answer_bytes: int) -> None:
            extra = answer_bytes - held[0]
            if extra > 0:
                await window.grow(extra)
                held[0] += extra
                held[1] = 1

        answers.put_nowait((await answer(msg, reserve), held))  # bounded: the window holds it until it is sent

    async def read() -> None:
        try:
            async for msg in request_iterator:
                size = size_of(msg)
                await window.acquire(size)
                task = asyncio.get_running_loop().create_task(one(msg, [size, 0]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            answers.put_nowait(None)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (item := await answers.get()) is not None:
            result, held = item
            yield result  # returns once gRPC has taken it (flow control permitting)
            await window.release(held[0], grown=bool(held[1]))
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class ByteWindow:
    """A per-stream window: at most ``count`` messages and ``size_bytes`` bytes held at once.

    A message larger than the whole byte window is let in alone (it is within max_message_bytes), and so is an
    answer: a message may grow past the window when no other message holds room for its answer (so one of
    them always can, and answers drain the window).
    """

    def __init__(self, count: int, size_bytes: int) -> None:
        self._count, self._bytes = count, size_bytes
        self._held_count = self._held_bytes = self._grown = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        """Wait until the message fits."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._held_count < self._count
                and (self._held_bytes + size <= self._bytes or self._held_count == 0)
            )
            self._held_count += 1
            self._held_bytes += size

    async def grow(self, extra: int) -> None:
        """Wait until a held message's answer fits: ``extra`` bytes more than it holds already."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._held_bytes + extra <= self._bytes or self._grown == 0)
            self._held_bytes += extra
            self._grown += 1

    async def release(self, size: int, grown: bool = False) -> None:
        """A message's answer (it held ``size`` bytes in all; ``grown``: some of them for its answer) has been
        sent."""
        async with self._changed:
            self._grown -= grown
            self._held_count -= 1
            self._held_bytes -= size
            self._changed.notify_all()
