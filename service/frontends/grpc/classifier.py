"""Thin gRPC handlers for ``quickdraw.v1.Classifier``: decode -> validate -> render -> batcher -> encode.

``Gateway`` is the data plane (it knows nothing about gRPC transport); ``ClassifierService`` adapts it to
gRPC and is the one place where errors become status codes with rich details, and where request latency is
recorded by method and code.

Out-of-class decision (issue 18): each prediction carries ``out_of_class`` (known = score >= threshold) when the
version that answered makes one (``ModelDescription.out_of_class``) and the backend gave its score
(``Answered.known``); otherwise it is left unset, as for every model exported before issue 18.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status
from numpy.typing import NDArray

from doodle import decode_image
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import ANY_VERSION, Answered, ModelDescription, OutOfClassInfo, Scores, TopK
from service.core.batching import Batcher
from service.core.errors import (
    Cancelled,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    to_rpc_status,
)
from service.core.metrics import Metrics
from service.core.streams import StreamSlots
from service.preprocess import wire
from service.preprocess.decode import WorkerPool
from service.preprocess.validation import BitmapIn, ClassifyIn, ImageIn, Kind, Limits, render, validate
from service.preprocess.wire import Wire

log = logging.getLogger(__name__)

#: Most stream messages handled at once per stream; beyond it the stream stops reading (flow control).
STREAM_WINDOW = 256
#: Most bytes of stream messages held at once per stream (requests read but not yet answered on the wire); a
#: message larger than this is still let in alone, so one stream holds at most max(this, max_message_bytes).
STREAM_WINDOW_BYTES = 4 * 1024 * 1024
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
#: Requests up to this size (serialized) are parsed and validated on the event loop; larger ones on a
#: preprocessing thread (a 4 MiB request of 65,536 strokes takes ~15 ms to count and ~8 ms to parse, and ~0.4 s to
#: validate): what the loop does for one call is bounded by this size, whatever the request.
INLINE_PARSE_BYTES = 64 * 1024
#: How close to its deadline a cancelled call counts as having run out of time, not as cancelled by its client.
DEADLINE_SLACK_S = 0.005
M = TypeVar("M", bound=Message)


def parse_message(cls: type[M], raw: Wire) -> M:
    """``raw`` parsed as a ``cls``; bytes that are not one are INVALID_ARGUMENT (a client fault), not UNKNOWN."""
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        reason = f"is not a valid {cls.DESCRIPTOR.full_name} in protobuf's wire format: {exc}"
        raise InvalidArgument([FieldViolation("", reason)], f"request {reason}") from None


def _kind(d: object) -> Kind:
    return Kind.BITMAP if isinstance(d, BitmapIn) else Kind.IMAGE if isinstance(d, ImageIn) else Kind.STROKES


@dataclass(frozen=True)
class Prepared:
    """A validated request, rendered: ``images`` [n, 28, 28, 1] uint8 are exactly what the backend is given."""

    images: NDArray[np.uint8]
    version: int
    top_k: int


class Gateway:
    """Classify requests: validate, render on a thread pool, batch, and build responses."""

    def __init__(
        self,
        model: ModelDescription,
        batcher: Batcher,
        limits: Limits,
        metrics: Metrics,
        backend_name: str,
        preprocess_threads: int = 2,
        decoder: WorkerPool | None = None,
        max_preprocessing_calls: int = 16,
        versionless: bool = False,
        renderer: WorkerPool | None = None,
    ) -> None:
        self.model = model
        #: Calls that name no version go to the backend as ``ANY_VERSION`` (it picks, and says which answered)
        #: rather than as the default version's number: see ``Backend`` (TF Serving replicas during a roll-out).
        self.versionless = versionless
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.backend_name = backend_name
        self._labels = list(model.labels)
        self._pool = ThreadPoolExecutor(max_workers=preprocess_threads, thread_name_prefix="preprocess")
        #: Decodes images in worker processes under a time budget (None: in the preprocessing thread itself).
        self.decoder = decoder
        #: Renders strokes in worker processes under a time budget (None: in the preprocessing thread itself).
        self.renderer = renderer
        #: Most calls handed to the preprocessing threads at once (running or waiting for a thread).
        self.max_preprocessing_calls = max_preprocessing_calls
        self._preprocessing = 0

    def _images(self, req: ClassifyIn, deadline_s: float | None = None) -> NDArray[np.uint8]:
        """Render every drawing; all decode errors are reported together.

        Stops once the caller's deadline has passed: a thread cannot be cancelled, and a request of many
        large drawings can take seconds to render, which nobody would be waiting for.
        """
        out = np.empty((len(req.drawings), 28, 28, 1), np.uint8)
        problems: list[Any] = []
        decode = decode_image if self.decoder is None else functools.partial(self.decoder.decode, deadline_s=deadline_s)
        draw = None if self.renderer is None else functools.partial(self.renderer.render, deadline_s=deadline_s)
        for i, d in enumerate(req.drawings):
            if deadline_s is not None and time.monotonic() >= deadline_s:
                raise DeadlineExceeded(f"deadline exceeded while rendering drawing {i} of {len(req.drawings)}")
            try:
                out[i, :, :, 0] = render(i, d, self.limits, decode, draw)
            except InvalidArgument as exc:
                problems.extend(exc.violations)
        if problems:
            raise InvalidArgument(problems)
        return out

    async def classify(self, request: pb.ClassifyRequest | Wire, deadline_s: float | None) -> pb.ClassifyResponse:
        """Answer one ClassifyRequest (``deadline_s`` on the monotonic clock)."""
        return await self.predict(await self.prepare(request, deadline_s), deadline_s)

    async def prepare(self, request: pb.ClassifyRequest | Wire, deadline_s: float | None = None) -> Prepared:
        """Validate a request and render its drawings: the first half of :meth:`classify`.

        ``request`` may be the serialized request as gRPC received it. On the event loop, only work bounded by a
        constant is done: its drawings are counted on the wire bytes' top level (``service.preprocess.wire``), and a
        call
        the batcher would refuse, or one beyond ``max_preprocessing_calls``, is refused before anything is
        parsed. A small request (``INLINE_PARSE_BYTES``) of bitmaps is then prepared inline; any other is
        counted in full, parsed, validated and rendered on a preprocessing thread.
        """
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        is_raw = isinstance(request, bytes | memoryview)
        if is_raw:
            n = wire.count_drawings(request, self.limits.max_drawings_per_request)  # type: ignore[arg-type]
            size = len(request)  # type: ignore[arg-type]
        else:
            n = len(request.drawings)  # type: ignore[union-attr]
            size = request.ByteSize()  # type: ignore[union-attr]
        self.batcher.admit(n)
        prepared: Prepared | None = None
        if size <= INLINE_PARSE_BYTES:
            prepared, kinds = self._prepare(request, deadline_s, False)
        if prepared is None:  # large, or not only bitmaps: parsing, validation and rendering go to a thread
            prepared, kinds = await self._offload(loop, request, deadline_s)
        m = self.metrics
        distinct = set(kinds)
        for kind in distinct:
            m.child(m.drawings, kind.value).inc(len(kinds) if len(distinct) == 1 else kinds.count(kind))
        kind_label = kinds[0].value if len(distinct) == 1 else "mixed"
        m.child(m.preprocess_latency, kind_label).observe(time.perf_counter() - t0)
        return prepared

    async def _offload(
        self, loop: asyncio.AbstractEventLoop, request: pb.ClassifyRequest | Wire, deadline_s: float | None
    ) -> tuple[Prepared, list[Kind]]:
        """:meth:`_prepare` on a preprocessing thread, if fewer than ``max_preprocessing_calls`` are there.

        A call counts until its thread is done with it, even when its caller has gone (a thread cannot be
        stopped; it stops at the next drawing once the deadline has passed).
        """
        if self._preprocessing >= self.max_preprocessing_calls:
            raise ResourceExhausted(
                f"{self._preprocessing} calls are being preprocessed, the limit of max_preprocessing_calls="
                f"{self.max_preprocessing_calls}; retry with backoff"
            )
        self._preprocessing += 1
        future = self._pool.submit(self._prepare, request, deadline_s, True)
        future.add_done_callback(lambda _: _call_soon(loop, self._preprocessed))
        prepared, kinds = await asyncio.wrap_future(future)
        assert prepared is not None
        return prepared, kinds

    def _preprocessed(self) -> None:
        self._preprocessing -= 1

    @property
    def preprocessing_calls(self) -> int:
        """Calls on (or waiting for) the preprocessing threads now."""
        return self._preprocessing

    def parse(self, raw: Wire) -> pb.ClassifyRequest:
        """A serialized ClassifyRequest, counted on the wire and then parsed; InvalidArgument if it cannot be."""
        lim = self.limits
        wire.check_classify(raw, lim.max_drawings_per_request, lim.max_strokes)
        return parse_message(pb.ClassifyRequest, raw)

    def _prepare(
        self, request: pb.ClassifyRequest | Wire, deadline_s: float | None, render_all: bool
    ) -> tuple[Prepared | None, list[Kind]]:
        """Parse (bytes), validate, check the version and render; without ``render_all`` only bitmap-only
        requests are rendered (784-byte copies: cheaper inline than a thread hop), others give (None, kinds)."""
        if render_all and deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlineExceeded("deadline exceeded while waiting for a preprocessing thread")
        message = self.parse(request) if isinstance(request, bytes | memoryview) else request
        req = validate(message, self.limits)
        if req.version is None:
            version = ANY_VERSION if self.versionless else self.model.default_version
        else:
            version = req.version
        if version != ANY_VERSION and version not in self.model.versions:
            raise NotFound(
                f"model {self.model.name!r} version {version} is not served; versions: "
                f"{', '.join(map(str, self.model.versions))}"
            )
        kinds = [_kind(d) for d in req.drawings]
        if not render_all and not all(k is Kind.BITMAP for k in kinds):
            return None, kinds
        return Prepared(self._images(req, deadline_s), version, req.top_k), kinds

    async def predict(self, prepared: Prepared, deadline_s: float | None) -> pb.ClassifyResponse:
        """Batch prepared images through the backend and build the answer: the second half of :meth:`classify`."""
        answered = await self._answer(prepared.images, prepared.version, deadline_s, prepared.top_k)
        return self._response(answered.scores, prepared.top_k, answered.version, answered.known)

    async def _answer(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None, top_k: int | None
    ) -> Answered:
        """Through the batcher; a call of several batches is pinned to the default version (its chunks could
        otherwise be answered by different versions while the backend's replicas disagree)."""
        if version == ANY_VERSION and len(images) > self.batcher.max_batch_size:
            version = self.model.default_version
        return await self.batcher.answer(images, version, deadline_s, top_k)

    async def predict_bitmaps(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None, top_k: int | None = None
    ) -> Scores:
        """:meth:`answer_bitmaps`' scores alone."""
        return (await self.answer_bitmaps(images, version, deadline_s, top_k)).scores

    async def answer_bitmaps(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None, top_k: int | None = None
    ) -> Answered:
        """Probabilities for already-valid bitmaps [n, 28, 28, 1] (TF Serving's Predict on the gateway), and the
        version that answered; with ``top_k``, possibly only the best ``top_k`` or more classes (a ``TopK``: see
        ``Batcher.answer``)."""
        m = self.metrics
        m.child(m.drawings, Kind.BITMAP.value).inc(len(images))
        return await self._answer(images, version, deadline_s, top_k)

    def _response(
        self, scores: Scores, k: int, version: int, known: NDArray[np.float32] | None = None
    ) -> pb.ClassifyResponse:
        top = scores if isinstance(scores, TopK) else TopK.of(scores, k)
        labels = self._labels
        predictions = [
            pb.Prediction(
                top=[pb.ScoredLabel(label=labels[j], score=v, index=j) for j, v in zip(idx, val, strict=True)]
            )
            for idx, val in zip(top.indices[:, :k].tolist(), top.scores[:, :k].tolist(), strict=True)
        ]
        ood = self.model.out_of_class.get(version)
        if known is not None and ood is not None:
            threshold = float(np.float32(ood.threshold))  # as the answer carries it: its own decision holds there
            for p, score in zip(predictions, known.tolist(), strict=True):
                p.out_of_class.CopyFrom(pb.OutOfClass(known=score >= threshold, score=score, threshold=threshold))
        return pb.ClassifyResponse(predictions=predictions, model_name=self.model.name, model_version=version)

    def model_info(self, max_message_bytes: int) -> pb.ModelInfo:
        """The GetModelInfo answer."""
        lim = self.limits
        return pb.ModelInfo(
            name=self.model.name,
            versions=list(self.model.versions),
            default_version=self.model.default_version,
            labels=self._labels,
            input_kinds=[k.value for k in Kind],
            limits=pb.Limits(
                max_drawings_per_request=lim.max_drawings_per_request,
                max_top_k=min(lim.max_top_k, len(self._labels)),
                max_strokes=lim.max_strokes,
                max_points=lim.max_points,
                max_raw_coordinate=lim.max_raw_coordinate,
                max_image_bytes=lim.max_image_bytes,
                max_image_pixels=lim.max_image_pixels,
                max_message_bytes=max_message_bytes,
            ),
            backend=self.backend_name,
            out_of_class=out_of_class_info(self.model.ood),
        )

    async def close(self) -> None:
        """Stop the decode and render workers, then the preprocessing threads (a render in progress finishes first),
        in threads: never on the event loop."""
        for pool in (self.decoder, self.renderer):
            if pool is not None:
                await asyncio.to_thread(pool.close)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def out_of_class_info(ood: OutOfClassInfo | None) -> pb.OutOfClassInfo | None:
    """A version's out-of-class decision as ModelInfo gives it (None: it makes none, the field stays unset)."""
    if ood is None:
        return None
    info = pb.OutOfClassInfo(score=ood.score, threshold=ood.threshold, method=ood.method, measured_on=ood.measured_on)
    if ood.known_kept is not None:
        info.known_kept = ood.known_kept
    return info


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` on ``loop`` from any thread (nothing once the loop is closed, at shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def service_error(exc: BaseException) -> ServiceError:
    """Any exception as a ServiceError: itself, CANCELLED, or INTERNAL (logged, details not leaked)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("the call was cancelled")
    log.exception("unexpected error", exc_info=exc)
    return ServiceError(f"internal error: {type(exc).__name__}")


class Observed:
    """One call (a unary call or a stream message): counted in flight, its latency recorded by method and code.

    A call cancelled at or after its deadline (``deadline_s``, monotonic; gRPC cancels the handler when the
    deadline passes) is recorded as DEADLINE_EXCEEDED; one cancelled before it, by its client, as CANCELLED.
    """

    def __init__(self, metrics: Metrics, method: str, deadline_s: float | None = None) -> None:
        self._metrics = metrics
        self._method = method
        self.code = "OK"
        self.fault = ""
        self.deadline_s = deadline_s

    def fail(self, error: ServiceError) -> None:
        """Record the call as answered with ``error`` (its code, and whose fault it was)."""
        self.code = error.code.name
        self.fault = error.fault

    def __enter__(self) -> Observed:
        self._t0 = time.perf_counter()
        self._metrics.inflight.inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            expired = self.deadline_s is not None and time.monotonic() >= self.deadline_s - DEADLINE_SLACK_S
            self.code, self.fault = ("DEADLINE_EXCEEDED" if expired else "CANCELLED"), "client"
        m = self._metrics
        m.inflight.dec()
        m.child(m.request_latency, self._method, self.code).observe(time.perf_counter() - self._t0)
        if self.code != "OK":
            m.child(m.errors, self._method, self.code, self.fault or "server").inc()


T = TypeVar("T")


def _unary(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Record latency by method and code, and turn ServiceErrors into rich gRPC statuses, in one place.

    For the methods of any servicer with a ``metrics`` attribute (this API's and TF Serving's on the gateway).
    """

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            with Observed(self.metrics, method, _deadline(context)) as call:
                try:
                    return await fn(self, request, context)
                except Exception as exc:
                    err = service_error(exc)
                    call.fail(err)
                    await context.abort_with_status(rpc_status.to_status(to_rpc_status(err)))
                    raise  # not reached: abort raises

        return handler

    return wrap


class GatewaySlot:
    """What every adapter (gRPC, TF Serving's API, HTTP) holds: the data plane, once the model is ready."""

    _gateway: Gateway | None = None

    @property
    def gateway(self) -> Gateway:
        """The data plane; Unavailable until the model is loaded."""
        if self._gateway is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self._gateway

    def attach(self, gateway: Gateway) -> None:
        """Start serving through a ready gateway."""
        self._gateway = gateway


class ClassifierService(GatewaySlot, pb_grpc.ClassifierServicer):
    """The gRPC adapter over ``Gateway``."""

    def __init__(
        self, metrics: Metrics, max_message_bytes: int, streams: StreamSlots, gateway: Gateway | None = None
    ) -> None:
        self.metrics = metrics
        self._gateway = gateway
        self._max_message_bytes = max_message_bytes
        #: The open-stream cap this door shares with every other streaming door (service.core.streams).
        self.streams = streams

    @_unary("Classify")
    async def Classify(
        self, request: pb.ClassifyRequest | bytes, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        """Classify a batch of drawings (``request`` as gRPC received it: bytes, see :func:`add_to_server`)."""
        return await self.gateway.classify(request, _deadline(context))

    @_unary("GetModelInfo")
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Describe the served model."""
        return self.gateway.model_info(self._max_message_bytes)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest | bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Answer each stream message as soon as it is ready; errors are per message, with its id.

        At most ``STREAM_WINDOW`` messages and ``STREAM_WINDOW_BYTES`` of them are held per stream, from the
        moment a message is read until its answer has been handed to gRPC: a client that stops reading its
        answers stops being read, and HTTP/2 flow control pushes back on it.
        """
        gateway = self._gateway
        refusal: ServiceError | None = None
        if gateway is None:
            refusal = Unavailable("the model is still loading; retry shortly")
        else:
            refusal = self.streams.refusal("ClassifyStream")
        if refusal is not None or gateway is None:
            refusal = refusal or Unavailable("the model is still loading; retry shortly")
            with Observed(self.metrics, "ClassifyStream") as call:
                call.fail(refusal)
            await context.abort_with_status(rpc_status.to_status(to_rpc_status(refusal)))
            return
        with self.streams.held():
            async for answer in self._stream(gateway, request_iterator, context):
                yield answer

    async def _stream(
        self, gateway: Gateway, request_iterator: AsyncIterator[pb.ClassifyStreamRequest | bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        metrics = self.metrics
        deadline = _deadline(context)

        async def one(msg: pb.ClassifyStreamRequest | bytes) -> pb.ClassifyStreamResponse:
            ident = ""
            with Observed(metrics, "ClassifyStream", deadline) as call:
                try:
                    if isinstance(msg, bytes):
                        raw_id, request = _stream_parts(msg)
                        ident = _utf8(raw_id, "id")
                    else:
                        ident, request = msg.id, msg.request
                    return pb.ClassifyStreamResponse(id=ident, response=await gateway.classify(request, deadline))
                except Exception as exc:
                    err = service_error(exc)
                    call.fail(err)
                    return pb.ClassifyStreamResponse(id=ident, error=to_rpc_status(err))

        def size_of(msg: pb.ClassifyStreamRequest | bytes) -> int:
            return len(msg) if isinstance(msg, bytes) else msg.ByteSize()

        async for answer in windowed_answers(request_iterator, size_of, one):
            yield answer


A = TypeVar("A")
R = TypeVar("R")


async def windowed_answers(
    request_iterator: AsyncIterator[A], size_of: Callable[[A], int], answer: Callable[[A], Awaitable[R]]
) -> AsyncIterator[R]:
    """A request stream's messages answered concurrently, each answer yielded once it is ready.

    At most ``STREAM_WINDOW`` messages and ``STREAM_WINDOW_BYTES`` (``size_of``) are held per stream, read but not
    yet answered on the wire (``ByteWindow``); reading waits for room. ``answer`` must answer every message,
    errors included (it must not raise). Used by ClassifyStream and the OIP's ModelStreamInfer.
    """
    answers: asyncio.Queue[tuple[R, int] | None] = asyncio.Queue()
    window = ByteWindow(STREAM_WINDOW, STREAM_WINDOW_BYTES)
    tasks: set[asyncio.Task[None]] = set()

    async def one(msg: A, size: int) -> None:
        answers.put_nowait((await answer(msg), size))  # bounded: the window holds this message until it is sent

    async def read() -> None:
        try:
            async for msg in request_iterator:
                size = size_of(msg)
                await window.acquire(size)
                task = asyncio.get_running_loop().create_task(one(msg, size))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            answers.put_nowait(None)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (item := await answers.get()) is not None:
            result, size = item
            yield result  # returns once gRPC has taken it (flow control permitting)
            await window.release(size)
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def _stream_parts(raw: Wire) -> tuple[bytes, Wire]:
    try:
        return wire.stream_parts(raw)
    except wire.Malformed:
        reason = f"is not a valid {pb.ClassifyStreamRequest.DESCRIPTOR.full_name} in protobuf's wire format"
        raise InvalidArgument([FieldViolation("", reason)], f"stream message {reason}") from None


def _utf8(raw: bytes, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument([FieldViolation(field, "is not valid UTF-8 (a proto3 string)")]) from None


class ByteWindow:
    """A per-stream window: at most ``count`` messages and ``size_bytes`` bytes held at once.

    A message larger than the whole byte window is let in alone (it is within max_message_bytes).
    """

    def __init__(self, count: int, size_bytes: int) -> None:
        self._count, self._bytes = count, size_bytes
        self._held_count = self._held_bytes = 0
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

    async def release(self, size: int) -> None:
        """A message's answer has been sent."""
        async with self._changed:
            self._held_count -= 1
            self._held_bytes -= size
            self._changed.notify_all()


def add_to_server(service: ClassifierService, server: grpc.aio.Server) -> None:
    """Register ``quickdraw.v1.Classifier``: Classify and ClassifyStream take their requests as bytes, so the
    gateway counts drawings and strokes on the wire before parsing (``service.preprocess.wire``)."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            service.Classify, request_deserializer=None, response_serializer=pb.ClassifyResponse.SerializeToString
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            service.ClassifyStream, request_deserializer=None,
            response_serializer=pb.ClassifyStreamResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
    }  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
