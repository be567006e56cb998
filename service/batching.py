"""The dynamic batcher: merges drawings from concurrent calls into backend batches.

It owns a bounded queue, one collector task and a future per queued item, and it uses the monotonic clock.

- A call is refused at once (RESOURCE_EXHAUSTED) when its drawings do not fit in the queue, or when the work
  already queued would keep the backend busy for more than ``max_queue_wait_ms`` (estimated from the cost
  per drawing of recent batches): under overload, excess calls fail fast and admitted calls keep their
  latency, instead of every call waiting in a long queue. Callers never wait for room.
- When a backend slot is free, the collector dispatches whatever is queued at once, so an idle service adds
  no wait. While every slot is busy, drawings accumulate and the next free slot takes them together: that is
  where batching comes from under load. With ``max_batch_delay_ms`` > 0 a free slot also waits up to that
  long (from the oldest drawing's arrival) for a fuller batch.
- A batch holds one model version, at most ``max_batch_size`` drawings, and never splits a call's chunk.
  A call larger than ``max_batch_size`` is split into chunks that may travel in different batches.
- An item whose deadline has passed, or whose caller went away, is dropped before it costs a backend call.
- A failing batch fails only its own items. Every future is resolved exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.errors import BackendError, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)

#: How close to its deadline a cancelled call counts as expired (gRPC's clock and ours differ slightly).
DEADLINE_SLACK_S = 0.005

#: The backend call: uint8 images [n, 28, 28, 1], a model version and the batch's deadline (the latest of its
#: callers', on the monotonic clock; None when one has none) -> float32 probabilities [n, classes].
RunBatch = Callable[[NDArray[np.uint8], int, float | None], Awaitable[NDArray[np.float32]]]


@dataclass(eq=False)
class _Item:
    images: NDArray[np.uint8]
    version: int
    future: asyncio.Future[NDArray[np.float32]]
    enqueued_s: float
    deadline_s: float | None
    #: Still counted in the queue (False once taken for a batch or dropped).
    queued: bool = True

    @property
    def n(self) -> int:
        return len(self.images)


@dataclass
class BatcherConfig:
    """The batcher's knobs (a subset of the service settings)."""

    max_batch_size: int = 128
    max_batch_delay_ms: float = 0.0
    max_concurrent_batches: int = 2
    max_queued_drawings: int = 4096
    backend_timeout_ms: float = 10_000.0
    max_queue_wait_ms: float = 0.0  # 0: admit while the queue has room


class Batcher:
    """Merge concurrent submissions into batches for ``run_batch``; see the module docstring for the rules."""

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatcherConfig,
        metrics: Metrics,
        backend_name: str = "backend",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run_batch = run_batch
        self._cfg = config
        self._metrics = metrics
        self._backend = backend_name
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        #: Durations (s) of recent batches, near-full ones apart: the admission estimate.
        self._took_big: deque[float] = deque(maxlen=9)
        self._took_small: deque[float] = deque(maxlen=9)

    @property
    def queued_drawings(self) -> int:
        """Drawings waiting now."""
        return self._queued

    def start(self) -> None:
        """Start the collector task (inside the running event loop)."""
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect(), name="batcher-collector")

    async def submit(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> NDArray[np.float32]:
        """Queue a call's images and wait for their probabilities, in order.

        ``deadline_s`` is on this batcher's clock (``time.monotonic``). Raises ResourceExhausted when the
        queue is full, DeadlineExceeded when the deadline passes before dispatch, Unavailable once closed,
        and BackendError when the batch fails. Cancelling the caller drops its queued items.
        """
        if self._closed:
            raise Unavailable("the service is shutting down; retry on another replica")
        n = len(images)
        if n == 0:
            return np.zeros((0, 0), np.float32)
        if self._queued + n > self._cfg.max_queued_drawings:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"queue full: {self._queued} drawings waiting and this call adds {n}, over "
                f"max_queued_drawings={self._cfg.max_queued_drawings}; retry with backoff"
            )
        wait_s = self.estimated_wait_s()
        if wait_s is not None and wait_s * 1000.0 > self._cfg.max_queue_wait_ms > 0:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"overloaded: about {wait_s * 1000:.0f} ms of backend work is queued ahead of this call, over "
                f"max_queue_wait_ms={self._cfg.max_queue_wait_ms:g}; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = self._clock()
        size = self._cfg.max_batch_size
        items = [
            _Item(images[i : i + size], version, loop.create_future(), now, deadline_s) for i in range(0, n, size)
        ]
        self._queue.extend(items)
        self._queued += n
        self._metrics.queue_depth.set(self._queued)
        self._arrived.set()
        try:
            # asyncio.timeout, not wait_for: no extra task per call on the hot path.
            when = None if deadline_s is None else asyncio.get_running_loop().time() + (deadline_s - self._clock())
            async with asyncio.timeout_at(when):
                if len(items) == 1:
                    parts = [await items[0].future]
                else:
                    parts = await asyncio.gather(*(it.future for it in items))
        except TimeoutError:
            self._metrics.dropped.labels("deadline").inc(self._unqueue(items))
            raise DeadlineExceeded("deadline exceeded while queued for the backend") from None
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client's deadline passes; count that as a deadline drop.
            expired = deadline_s is not None and self._clock() >= deadline_s - DEADLINE_SLACK_S
            self._metrics.dropped.labels("deadline" if expired else "cancelled").inc(self._unqueue(items))
            raise
        finally:
            self._unqueue(items)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def admit(self, n: int) -> None:
        """Raise ResourceExhausted (or Unavailable once closed) now if a call of ``n`` drawings would be refused by
        :meth:`submit` at this moment: a cheap check for callers to make before they preprocess the call.

        The same checks as :meth:`submit` makes (which still makes them: the queue may fill meanwhile).
        """
        if self._closed:
            raise Unavailable("the service is shutting down; retry on another replica")
        if self._queued + n > self._cfg.max_queued_drawings:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"queue full: {self._queued} drawings waiting and this call adds {n}, over "
                f"max_queued_drawings={self._cfg.max_queued_drawings}; retry with backoff"
            )
        wait_s = self.estimated_wait_s()
        if wait_s is not None and wait_s * 1000.0 > self._cfg.max_queue_wait_ms > 0:
            self._metrics.rejected.inc()
            raise ResourceExhausted(
                f"overloaded: about {wait_s * 1000:.0f} ms of backend work is queued ahead of this call, over "
                f"max_queue_wait_ms={self._cfg.max_queue_wait_ms:g}; retry with backoff"
            )

    def estimated_wait_s(self) -> float | None:
        """How long a new call would wait for the full batches queued ahead of it (None until a batch ran).

        A batch's cost is mostly per batch on a GPU and grows with its size on a CPU; either way, the queue
        drains in full batches under load, so the estimate is (full batches queued) x (recent duration of a
        near-full batch) / (concurrent batches). Medians ignore one-off stalls.
        """
        took = self._took_big or self._took_small
        if not took:
            return None
        ahead = self._queued // self._cfg.max_batch_size
        if ahead == 0:  # the common case: skip the median on the hot path
            return 0.0
        return ahead * float(np.median(took)) / self._cfg.max_concurrent_batches

    def _learn(self, drawings: int, seconds: float) -> None:
        """Record a finished batch's duration, near-full batches (those that matter under load) apart."""
        (self._took_big if drawings * 2 >= self._cfg.max_batch_size else self._took_small).append(seconds)

    def _unqueue(self, items: list[_Item]) -> int:
        """Cancel a caller's unanswered items and free their queue room at once; returns drawings freed."""
        freed = 0
        for it in items:
            if not it.future.done():
                it.future.cancel()
            if it.queued:
                it.queued = False
                freed += it.n
        if freed:
            self._queued -= freed
            self._metrics.queue_depth.set(self._queued)
        return freed

    async def _collect(self) -> None:
        delay_s = self._cfg.max_batch_delay_ms / 1000.0
        while True:
            await self._slots.acquire()
            while not self._queue:
                if self._closed:
                    self._slots.release()
                    return
                self._arrived.clear()
                await self._arrived.wait()
            if delay_s > 0 and not self._closed:
                until = self._queue[0].enqueued_s + delay_s
                while self._queued < self._cfg.max_batch_size and not self._closed:
                    left = until - self._clock()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._dispatch(batch, *self._start(batch)))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Item]:
        """Pop up to max_batch_size drawings of one version, dropping expired and cancelled items."""
        now = self._clock()
        batch: list[_Item] = []
        total = 0
        version: int | None = None
        keep: deque[_Item] = deque()
        while self._queue:
            it = self._queue.popleft()
            if not it.queued or it.future.done():  # its caller went away and freed its room already
                continue
            if it.deadline_s is not None and now >= it.deadline_s:
                it.queued = False
                self._queued -= it.n
                self._metrics.dropped.labels("deadline").inc(it.n)
                it.future.set_exception(DeadlineExceeded("deadline exceeded while queued for the backend"))
                continue
            if version is None:
                version = it.version
            if it.version != version or total + it.n > self._cfg.max_batch_size:
                keep.append(it)
                if total + it.n > self._cfg.max_batch_size and it.version == version:
                    break  # FIFO within a version: do not let later items overtake this one
                continue
            batch.append(it)
            total += it.n
            it.queued = False
            self._queued -= it.n
        keep.extend(self._queue)
        self._queue = keep
        self._metrics.queue_depth.set(self._queued)
        for it in batch:
            self._metrics.queue_wait.observe(now - it.enqueued_s)
        return batch

    def _start(self, batch: list[_Item]) -> tuple[NDArray[np.uint8], asyncio.Future[NDArray[np.float32]], float]:
        """Start the backend call now, from the collector, not from a task that runs after everything else
        already scheduled (after a batch, that is every one of its callers' responses)."""
        images = batch[0].images if len(batch) == 1 else np.concatenate([it.images for it in batch])
        self._metrics.batch_size.observe(len(images))
        self._metrics.inflight_batches.inc()
        t0 = self._clock()
        deadlines = [it.deadline_s for it in batch]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            started = asyncio.ensure_future(self._run_batch(images, batch[0].version, deadline))
        except Exception as exc:  # a backend that fails before it starts fails this batch like any other
            started = asyncio.get_running_loop().create_future()
            started.set_exception(exc)
        return images, started, t0

    async def _dispatch(
        self, batch: list[_Item], images: NDArray[np.uint8], started: asyncio.Future[NDArray[np.float32]], t0: float
    ) -> None:
        outcome = "ok"
        released = False
        try:
            async with asyncio.timeout(self._cfg.backend_timeout_ms / 1000.0):  # no extra task or wake-up
                probs = await started
            if len(probs) != len(images):
                raise BackendError(f"backend returned {len(probs)} results for {len(images)} drawings")
            self._learn(len(images), self._clock() - t0)
            # Free the slot before answering: the collector wakes first and starts the next batch while this
            # batch's callers are being answered, so the backend does not sit idle in between.
            self._slots.release()
            released = True
            start = 0
            for it in batch:
                if not it.future.done():
                    it.future.set_result(probs[start : start + it.n])
                start += it.n
        except (Exception, asyncio.CancelledError) as exc:  # the batch failed: fail its own items, nothing else
            outcome = "error"
            if isinstance(exc, asyncio.CancelledError):
                err: ServiceError = BackendError(f"backend call for a batch of {len(images)} was cancelled")
            elif isinstance(exc, TimeoutError):
                err = BackendError(
                    f"backend batch of {len(images)} timed out after backend_timeout_ms={self._cfg.backend_timeout_ms}"
                )
            elif isinstance(exc, ServiceError):
                err = exc
            else:
                log.exception("backend batch of %d drawings failed", len(images))
                err = BackendError(f"backend failed on a batch of {len(images)} drawings: {exc}")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # this task itself is being cancelled: its callers are answered, let it end
        finally:
            self._metrics.backend_latency.labels(self._backend, outcome).observe(self._clock() - t0)
            self._metrics.inflight_batches.dec()
            if not released:
                self._slots.release()

    async def close(self) -> None:
        """Stop accepting, dispatch what is queued, and wait for running batches to finish."""
        self._closed = True
        self._arrived.set()
        if self._collector is not None:
            await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
