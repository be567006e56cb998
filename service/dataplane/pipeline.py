"""The one pipeline every front door runs a call through (``DataPlane.infer``), whatever its protocol.

A door turns what it received into a :class:`Call`: the request as it came (bytes, a parsed body), the door's
*converter* (its protocol's request to the data plane's terms, :class:`Converted`: the drawings, the version asked
for, how many best classes the answer needs, and a bound on the answer's size), and what the wire already told it
(how many drawings, how many bytes). The pipeline then does, for every door alike:

1. **admission**, from the wire count, before anything is parsed: a call the batcher would refuse now, or one
   beyond ``max_preprocessing_calls``, costs nothing more;
2. **conversion** (parse and check), on the event loop only up to ``INLINE_PARSE_BYTES`` of request; a larger one
   on a preprocessing thread, and a JSON body over ``PROCESS_PARSE_BYTES`` first in a worker process (the door's
   ``pre_parse``: ``json.loads`` holds the GIL throughout);
3. the **answer bound**: an answer larger than ``max_message_bytes`` is refused before any work is done for it;
4. **version resolution**, once, in the door's words for an unknown version;
5. **preprocessing**: validation of what the converter did not check, decoding and rendering (worker processes
   under a time budget), on the same thread;
6. a stream's **answer window**, when the call is a stream message (``Call.reserve``);
7. the **batcher** and the **backend**; the door builds its answer from the :class:`Result`.

Canary routing and shadow calls (``service.dataplane.rollout``) are applied here, in :meth:`DataPlane.infer`,
between steps 4 and 7: every door's calls pass through it. A versionless call's version may be moved by the split
(its routing key read from the call's transport metadata, whatever the door), and a shadowed call's drawings are
queued for the candidate once its answer is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from doodle import decode_image
from service.backends import ANY_VERSION, Answered, ModelDescription
from service.core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.core.metrics import Metrics
from service.dataplane.batching import Batcher
from service.dataplane.rollout import Metadata, Rollout
from service.preprocess.decode import WorkerPool
from service.preprocess.validation import BitmapIn, ClassifyIn, ImageIn, Kind, Limits, render

#: Requests up to this size (serialized) are converted on the event loop; larger ones on a preprocessing thread
#: (a 4 MiB request of 65,536 strokes takes ~15 ms to count and ~8 ms to parse, and ~0.4 s to validate): what the
#: loop does for one call is bounded by this size, whatever the request and whichever door it came through.
INLINE_PARSE_BYTES = 64 * 1024
#: JSON bodies over this size are parsed in a worker process by the door's ``pre_parse`` (``json.loads`` takes
#: ~12 ms per MiB here, all of it holding the GIL); smaller ones on a thread, or inline up to INLINE_PARSE_BYTES.
PROCESS_PARSE_BYTES = 1024 * 1024

R = TypeVar("R")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us more per call
class Converted:
    """A door's request in the data plane's terms, checked as far as its protocol goes.

    ``drawings`` are either validated drawings to preprocess (``ClassifyIn``) or bitmaps [n, 28, 28, 1] as the
    model takes them. ``version`` is the one asked for (None: the default, or the backend's choice when the
    gateway is versionless). ``top_k``: the best classes the answer needs (None: every probability).
    ``answer_bytes``: the door's bound on its answer's size for this call, checked before any work is done.
    ``unknown_version`` words the NOT_FOUND for a version that is not served, as the door's protocol does.
    ``extra`` is what the door needs back to build its answer (its outputs, say)."""

    drawings: ClassifyIn | NDArray[np.uint8]
    version: int | None = None
    top_k: int | None = None
    answer_bytes: int = 0
    unknown_version: Callable[[int], ServiceError] | None = None
    extra: Any = None

    def kinds(self) -> list[Kind]:
        """Each drawing's input form."""
        d = self.drawings
        if not isinstance(d, ClassifyIn):
            return [Kind.BITMAP] * len(d)
        return [_kind(x) for x in d.drawings]


@dataclass
class Call(Generic[R]):
    """One inference call, as every door hands it to :meth:`DataPlane.infer`."""

    #: The request as the door received it: the serialized message, a JSON body, a parsed message.
    request: R
    #: The door's converter: ``request`` to :class:`Converted`, raising ServiceErrors in the door's words. Pure
    #: (no awaits, no shared state): the pipeline runs it on the loop or on a preprocessing thread.
    convert: Callable[[R], Converted]
    #: Drawings counted on the wire before parsing (admission); 1 where the wire does not say, so a call is
    #: refused unparsed whenever the batcher would refuse any.
    drawings: int = 1
    #: The request's size in bytes, which decides where it is converted.
    size_bytes: int = 0
    deadline_s: float | None = None
    #: The transport cancels the call at ``deadline_s`` (a unary gRPC door: gRPC cancels its handler then), so
    #: the pipeline sets no timer of its own for it.
    transport_deadline: bool = False
    #: For bodies over PROCESS_PARSE_BYTES: an awaitable that parses ``request`` in a worker process into what
    #: ``convert`` takes (the door's JSON to its protobuf bytes).
    pre_parse: Callable[[R], Awaitable[R]] | None = None
    #: For a stream message: waits until the stream's window has room for the answer's ``answer_bytes``.
    reserve: Callable[[int], Awaitable[None]] | None = None
    #: The call's transport metadata (gRPC metadata, HTTP headers), read for the routing key of a canary split.
    metadata: Metadata | None = None


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us more per call
class Result:
    """What the backend answered, the version that answered, and the converted call (for the door's answer)."""

    answered: Answered
    converted: Converted
    #: The images the backend was given [n, 28, 28, 1] (the JSON API can echo them back).
    images: NDArray[np.uint8]
    #: When the call entered the batcher and when the backend's answer came back (perf_counter_ns).
    infer_started_ns: int = 0
    infer_done_ns: int = 0

    @property
    def version(self) -> int:
        """The version that answered."""
        return self.answered.version


def _kind(d: object) -> Kind:
    return Kind.BITMAP if isinstance(d, BitmapIn) else Kind.IMAGE if isinstance(d, ImageIn) else Kind.STROKES


class DataPlane:
    """Admission, conversion, preprocessing, versions and the batcher, for every door (see the module)."""

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
        max_answer_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.model = model
        #: Calls that name no version go to the backend as ``ANY_VERSION`` (it picks, and says which answered)
        #: rather than as the default version's number: see ``Backend`` (TF Serving replicas during a roll-out).
        self.versionless = versionless
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.backend_name = backend_name
        #: The largest answer any door may build (its transport's max_message_bytes).
        self.max_answer_bytes = max_answer_bytes
        self._pool = ThreadPoolExecutor(max_workers=preprocess_threads, thread_name_prefix="preprocess")
        #: Decodes images in worker processes under a time budget (None: in the preprocessing thread itself).
        self.decoder = decoder
        #: Renders strokes in worker processes under a time budget (None: in the preprocessing thread itself).
        self.renderer = renderer
        #: Most calls off the loop at once (parsing in a process, or on or waiting for a preprocessing thread).
        self.max_preprocessing_calls = max_preprocessing_calls
        self._preprocessing = 0
        #: The roll-out plan in force (canary split, shadow), when one is configured; None: neither.
        self.rollout: Rollout | None = None
        #: The drawings counter and preprocessing histogram of bitmaps, bound once.
        self._bitmap_children = (metrics.child(metrics.drawings, Kind.BITMAP.value),
                                 metrics.child(metrics.preprocess_latency, Kind.BITMAP.value))  # fmt: skip

    # --- the pipeline ------------------------------------------------------------------------------------------

    async def infer(self, call: Call[Any]) -> Result:
        """Run one call through the pipeline (see the module); raises ServiceErrors for the door to map."""
        t0 = time.perf_counter()
        self.batcher.admit(call.drawings)
        converted: Converted | None = None
        version = 0
        images: NDArray[np.uint8] | None = None
        if call.size_bytes <= INLINE_PARSE_BYTES:
            converted, version = self._convert(call.convert, call.request)
            if _inline(converted):
                images = self._images(converted, call.deadline_s)
        # admitted for these drawings already, with nothing awaited since: the batcher need not check again
        admitted = images is not None and call.reserve is None and len(images) <= call.drawings
        if images is None:
            converted, version, images = await self._offload(call, converted, version)
        assert converted is not None
        m = self.metrics
        kinds = converted.kinds()
        if not isinstance(converted.drawings, ClassifyIn):  # bitmaps (the commonest call): children bound once
            drawings, preprocessed = self._bitmap_children
            drawings.inc(len(kinds))
            preprocessed.observe(time.perf_counter() - t0)
        else:
            distinct = set(kinds)
            for kind in distinct:
                m.child(m.drawings, kind.value).inc(len(kinds) if len(distinct) == 1 else kinds.count(kind))
            kind_label = kinds[0].value if len(distinct) == 1 else "mixed"
            m.child(m.preprocess_latency, kind_label).observe(time.perf_counter() - t0)
        if call.reserve is not None:
            await call.reserve(converted.answer_bytes)
        top_k = converted.top_k
        rollout = self.rollout
        shadow = None
        if rollout is not None:
            if converted.version is None:
                version = rollout.route(self.model, call.metadata, version)
            shadow = rollout.shadow
            if shadow is not None and shadow.wants(len(images)):
                top_k = None  # the comparison needs the stable version's probabilities
            else:
                shadow = None
        started = time.perf_counter_ns()
        answered = await self._answer(images, version, call.deadline_s, top_k, call.transport_deadline, admitted)
        m.health.record(answered, images, kinds)  # model health (issue 26): plain counts, ~1 us
        done = time.perf_counter_ns()
        if shadow is not None:
            shadow.offer(images, answered, self.model, (done - started) / 1e9)
        return Result(answered, converted, images, started, done)

    def _convert(self, convert: Callable[[R], Converted], request: R) -> tuple[Converted, int]:
        """The door's converter, the answer bound, then the version (both before any preprocessing)."""
        converted = convert(request)
        if converted.answer_bytes > self.max_answer_bytes:
            raise PayloadTooLarge(
                f"the answer to this call would take about {converted.answer_bytes} bytes, over the limit of "
                f"max_message_bytes={self.max_answer_bytes}; ask for fewer drawings, classes or outputs per call"
            )
        return converted, self.resolve(converted.version, converted.unknown_version)

    async def _offload(
        self, call: Call[Any], converted: Converted | None, version: int
    ) -> tuple[Converted, int, NDArray[np.uint8]]:
        """Conversion (unless done) and preprocessing on a preprocessing thread, after a worker process's parse for a
        large JSON body, if fewer than ``max_preprocessing_calls`` calls are off the loop.

        A call counts until its thread is done with it, even when its caller has gone (a thread cannot be
        stopped; it stops at the next drawing once the deadline has passed)."""
        if self._preprocessing >= self.max_preprocessing_calls:
            raise ResourceExhausted(
                f"{self._preprocessing} calls are being preprocessed, the limit of max_preprocessing_calls="
                f"{self.max_preprocessing_calls}; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        self._preprocessing += 1
        try:
            request = call.request
            if converted is None and call.pre_parse is not None and call.size_bytes > PROCESS_PARSE_BYTES:
                request = await call.pre_parse(request)
        except BaseException:
            self._preprocessing -= 1
            raise
        future = self._pool.submit(self._prepare, call, request, converted, version)
        future.add_done_callback(lambda _: _call_soon(loop, self._preprocessed))
        return await asyncio.wrap_future(future)

    def _prepare(
        self, call: Call[Any], request: Any, converted: Converted | None, version: int
    ) -> tuple[Converted, int, NDArray[np.uint8]]:
        """On a preprocessing thread: convert (unless done on the loop), then render every drawing."""
        if call.deadline_s is not None and time.monotonic() >= call.deadline_s:
            raise DeadlineExceeded("deadline exceeded while waiting for a preprocessing thread")
        if converted is None:
            converted, version = self._convert(call.convert, request)
        return converted, version, self._images(converted, call.deadline_s)

    def _preprocessed(self) -> None:
        self._preprocessing -= 1

    def _images(self, converted: Converted, deadline_s: float | None) -> NDArray[np.uint8]:
        """Every drawing rendered; all decode errors are reported together.

        Stops once the caller's deadline has passed: a thread cannot be cancelled, and a request of many
        large drawings can take seconds to render, which nobody would be waiting for.
        """
        req = converted.drawings
        if not isinstance(req, ClassifyIn):
            return req
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

    # --- versions ----------------------------------------------------------------------------------------------

    def resolve(self, asked: int | None, unknown: Callable[[int], ServiceError] | None = None) -> int:
        """The version a call asked for, or the default (``ANY_VERSION`` when the backend chooses); NOT_FOUND (in
        the words of ``unknown``, when given) for one that is not served."""
        model = self.model
        if asked is None:
            return ANY_VERSION if self.versionless else model.default_version
        if asked not in model.versions:
            if unknown is not None:
                raise unknown(asked)
            raise NotFound(
                f"model {model.name!r} version {asked} is not served; versions: {', '.join(map(str, model.versions))}"
            )
        return asked

    async def _answer(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None, top_k: int | None,
        transport_deadline: bool = False, admitted: bool = False,
    ) -> Answered:
        """Through the batcher; a call of several batches is pinned to the default version (its chunks could
        otherwise be answered by different versions while the backend's replicas disagree)."""
        if version == ANY_VERSION and len(images) > self.batcher.max_batch_size:
            version = self.model.default_version
        return await self.batcher.answer(images, version, deadline_s, top_k, timed=not transport_deadline,
                                         admitted=admitted)  # fmt: skip

    async def close(self) -> None:
        """Stop the decode and render workers, then the preprocessing threads (a render in progress finishes first),
        in threads: never on the event loop."""
        for pool in (self.decoder, self.renderer):
            if pool is not None:
                await asyncio.to_thread(pool.close)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def _inline(converted: Converted) -> bool:
    """Whether preprocessing stays on the loop: bitmaps only (784-byte copies: cheaper inline than a thread hop)."""
    d = converted.drawings
    return not isinstance(d, ClassifyIn) or all(isinstance(x, BitmapIn) for x in d.drawings)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` on ``loop`` from any thread (nothing once the loop is closed, at shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


class DataPlaneSlot:
    """What every door holds: the data plane, once the model is ready."""

    _plane: DataPlane | None = None

    @property
    def plane(self) -> DataPlane:
        """The data plane; Unavailable until the model is loaded."""
        if self._plane is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self._plane

    @property
    def attached(self) -> bool:
        """Whether the data plane is ready."""
        return self._plane is not None

    def attach(self, plane: DataPlane) -> None:
        """Start serving through a ready data plane."""
        self._plane = plane
