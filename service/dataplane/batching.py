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
- A batch whose callers all want no more than the backend's exported top-k outputs (``run_top_k``) asks the
  backend for those alone (TF Serving's ``output_filter``: less to send, decode and rank); one caller that
  needs probabilities makes it a probabilities batch for all, and the gateway ranks them.
- A batch holds one model version, at most ``max_batch_size`` drawings, and never splits a call's chunk.
  A call larger than ``max_batch_size`` is split into chunks that may travel in different batches.
- An item whose deadline has passed, or whose caller went away, is dropped before it costs a backend call.
- A failing batch fails only its own items. Every future is resolved exactly once.
- A backend that also scores how much each drawing looks like a known class (``Answered.known``, issue 18) has
  that score sliced per caller with the probabilities; without it (older models), callers get ``known`` None.
- Admission counts every batch's cost, failed and timed-out ones too (a timed-out batch costs what it ran), and
  the work already in flight (a batch running longer than recent ones raises the cost of every batch queued):
  a brownout raises the estimate before calls pile up behind it.
- A batch whose callers have all gone (cancelled, or answered at its timeout) has its backend call cancelled
  where that is possible: an asyncio task (TF Serving's RPC). A thread cannot be stopped.
- A batch that outlives ``backend_timeout_ms`` answers its callers with the timeout at once but keeps its slot
  until the backend's work has really ended (a TensorFlow thread returned): the backend never runs more batches
  than ``max_concurrent_batches``. After ``wedged_after_timeouts`` consecutive timeouts (a batch still running
  counts one more for each further ``backend_timeout_ms``), the backend is *wedged*: ``on_health`` reports it
  not ready, and not live either while such work still runs (the process must be restarted). A successful batch,
  or timed-out work that ends by itself, clears it. While every slot is held by such work, calls are refused
  with UNAVAILABLE instead of waiting.
- The collector is supervised, and ``fail`` lets the backend report the death of its own background tasks:
  either way the batcher reports not ready and not live, fails what is queued and refuses new calls with
  UNAVAILABLE naming what died.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from prometheus_client import Counter

from service.backends import ANY_VERSION, Answered, Scores, TopK
from service.core.errors import BackendError, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from service.core.metrics import Metrics

log = logging.getLogger(__name__)

#: How close to its deadline a cancelled call counts as expired (gRPC's clock and ours differ slightly).
DEADLINE_SLACK_S = 0.005

#: The backend call: uint8 images [n, 28, 28, 1], a model version and the batch's deadline (the latest of its
#: callers', on the monotonic clock; None when one has none) -> float32 probabilities [n, classes].
RunBatch = Callable[[NDArray[np.uint8], int, float | None], Awaitable[NDArray[np.float32]]]
#: The same call for the backend's top-k outputs only: -> ``TopK`` of its exported width.
RunTopK = Callable[[NDArray[np.uint8], int, float | None], Awaitable[TopK]]


@dataclass(eq=False)
class _Item:
    images: NDArray[np.uint8]
    version: int
    future: asyncio.Future[Answered]
    enqueued_s: float
    deadline_s: float | None
    #: The caller wants only its best ``top_k`` classes (None: it needs the probabilities).
    top_k: int | None = None
    #: Still counted in the queue (False once taken for a batch or dropped).
    queued: bool = True

    @property
    def n(self) -> int:
        return len(self.images)


@dataclass
class _Watch:
    """A dispatch task awaiting its backend coroutine: whether it still does, and whether it was cancelled because
    the batch's callers all left."""

    awaiting: bool = True
    fired: bool = False


class _Expiry:
    """The backend's timer of one idle-path call (``Batcher._alone``): what ``asyncio.timeout`` does there, without a
    loop timer of its own. A loop timer is created and cancelled per ``asyncio.timeout`` (~3 us with uvloop); the
    batcher's one timer (``Batcher._expire``) serves every such call in flight, each cancelled at its own ``when``."""

    __slots__ = ("cancelling", "fired", "task", "when")

    def __init__(self, task: asyncio.Task[Any], when: float) -> None:
        self.task = task
        self.when = when
        #: The task's cancellation requests when the call started (as ``asyncio.Timeout`` keeps them).
        self.cancelling = task.cancelling()
        self.fired = False

    def expired(self) -> bool:
        """Whether the timer cancelled the call (as ``asyncio.Timeout.expired``)."""
        return self.fired


@dataclass
class BatcherConfig:
    """The batcher's knobs (a subset of the service settings)."""

    max_batch_size: int = 128
    max_batch_delay_ms: float = 0.0
    max_concurrent_batches: int = 2
    max_queued_drawings: int = 4096
    backend_timeout_ms: float = 10_000.0
    max_queue_wait_ms: float = 0.0  # 0: admit while the queue has room
    wedged_after_timeouts: int = 3


@dataclass(frozen=True)
class BackendHealth:
    """What the batcher knows about its backend, for the health service: ``ready`` (take traffic) and ``live``
    (no need to restart the process), and why not."""

    ready: bool = True
    live: bool = True
    reason: str = ""


class Batcher:
    """Merge concurrent submissions into batches for ``run_batch``; see the module docstring for the rules."""

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatcherConfig,
        metrics: Metrics,
        backend_name: str = "backend",
        clock: Callable[[], float] = time.monotonic,
        run_top_k: RunTopK | None = None,
        top_k_width: int = 0,
    ) -> None:
        self._run_batch = run_batch
        #: The backend's top-k call and the width of what it gives (0: no such call).
        self._run_top_k = run_top_k
        self._top_k_width = top_k_width if run_top_k is not None else 0
        self._cfg = config
        self._metrics = metrics
        self._backend = backend_name
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._queued = 0
        #: Set when the collector may have work: a call queued, a slot freed while calls are queued, closing.
        self._wake = asyncio.Event()
        #: Backend slots free now (a batch holds one from when it is taken until its backend work has ended).
        self._free = config.max_concurrent_batches
        self._running: set[asyncio.Task[None]] = set()
        #: The backend's last call was a coroutine (TF Serving's RPC): idle calls then take ``_alone``.
        self._coroutines = False
        #: Batches run by their own caller (the idle fast path of ``answer``), and what close() waits on for them.
        self._inline = 0
        self._inline_done: asyncio.Future[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        #: Durations (s) of recent batches, whatever their outcome, near-full ones apart: the admission estimate.
        self._took_big: deque[float] = deque(maxlen=9)
        self._took_small: deque[float] = deque(maxlen=9)
        #: When each backend call in flight started (its slot is busy), by its future or coroutine.
        self._inflight: dict[Awaitable[Scores | Answered], float] = {}
        #: Consecutive backend timeouts (a batch still running counts again every backend_timeout_ms).
        self._timeouts = 0
        #: Timed-out batches whose backend work has not ended a timeout later (each holds its slot).
        self._stuck = 0
        #: What died (the collector, a backend's background task), once one has: the batcher then refuses calls.
        self._failed: str | None = None
        self._health = BackendHealth()
        #: The idle-path calls' backend timers (``_alone``), and the one loop timer due at the earliest of them.
        self._expiries: dict[_Expiry, None] = {}
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._expiry_when = 0.0
        #: Called with the new BackendHealth whenever it changes (the composition root sets health from it).
        self.on_health: Callable[[BackendHealth], None] | None = None

    @property
    def queued_drawings(self) -> int:
        """Drawings waiting now."""
        return self._queued

    @property
    def busy(self) -> bool:
        """Every backend slot is taken, or a full batch of callers' drawings is waiting: no room for optional work
        (shadow calls). A free slot with a few drawings queued is not busy: the collector is about to send them."""
        return self._free <= 0 or self._queued >= self._cfg.max_batch_size

    @property
    def refusing(self) -> bool:
        """Calls are refused now (closed, a dead task, a wedged backend)."""
        return self._closed or self._refusal() is not None

    @property
    def health(self) -> BackendHealth:
        """The backend's health as this batcher sees it now."""
        return self._health

    @property
    def max_batch_size(self) -> int:
        """Most drawings in one backend batch."""
        return self._cfg.max_batch_size

    def start(self) -> None:
        """Start the collector task (inside the running event loop); it is supervised: see ``fail``."""
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect(), name="batcher-collector")
            self._collector.add_done_callback(self._collector_done)

    async def submit(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None, top_k: int | None = None
    ) -> Scores:
        """:meth:`answer`'s scores alone."""
        return (await self.answer(images, version, deadline_s, top_k)).scores

    async def answer(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None, top_k: int | None = None,
        timed: bool = True, admitted: bool = False,
    ) -> Answered:
        """Queue a call's images and wait for their probabilities, in order, and the version that answered.

        ``version`` may be ``ANY_VERSION`` for a backend that picks versions itself; a call of more than one batch
        must then name one (its chunks could be answered by different versions during a roll-out).

        With ``top_k``, the caller wants only its best ``top_k`` classes: the answer may then be a ``TopK`` (at
        least ``top_k`` wide) instead of probabilities, when its batch can ask the backend for top-k alone (a call
        split over several batches always gets probabilities).

        ``deadline_s`` is on this batcher's clock (``time.monotonic``). Raises ResourceExhausted when the queue is
        full or the estimated wait too long, DeadlineExceeded when the deadline passes before dispatch, Unavailable
        once closed, failed or wedged, and BackendError when the batch fails. Cancelling the caller drops its
        queued items. ``timed`` False: the caller is cancelled at ``deadline_s`` anyway (gRPC cancels a unary
        handler at its deadline), so no timer of the batcher's own bounds the wait; the deadline still drops the
        call's items before they are sent, and sets the backend call's. ``admitted``: the caller has just made the
        :meth:`admit` check itself, with nothing awaited since (the data plane), so it is not made twice.
        """
        n = len(images)
        if version == ANY_VERSION and n > self._cfg.max_batch_size:
            raise ValueError("a call of more than one batch must name its version (see Batcher.answer)")
        if not admitted:
            self.admit(n)
        if n == 0:
            return Answered(np.zeros((0, 0), np.float32), version)
        loop = asyncio.get_running_loop()
        now = self._clock()
        size = self._cfg.max_batch_size
        idle = not self._queue and self._free > 0 and self._cfg.max_batch_delay_ms <= 0 and n <= size
        wants = top_k if top_k is not None and top_k <= self._top_k_width else None
        if idle and self._coroutines:
            return await self._alone(images, version, now, deadline_s, wants, timed)
        if n <= size:
            items = [_Item(images, version, loop.create_future(), now, deadline_s, wants)]
        else:
            items = [
                _Item(images[i : i + size], version, loop.create_future(), now, deadline_s) for i in range(0, n, size)
            ]
        self._queue.extend(items)
        self._queued += n
        self._metrics.queue_depth.set(self._queued)
        if idle:
            self._take_alone(items[0])
        elif self._free > 0 or self._cfg.max_batch_delay_ms > 0:
            self._wake.set()  # otherwise the next slot freed takes it: no collector wake-up for nothing
        try:
            # asyncio.timeout, not wait_for: no extra task per call on the hot path.
            when = None if deadline_s is None or not timed else loop.time() + (deadline_s - self._clock())
            async with asyncio.timeout_at(when):
                if len(items) == 1:
                    parts = [await items[0].future]
                else:
                    parts = await asyncio.gather(*(it.future for it in items))
        except TimeoutError:
            self._dropped("deadline").inc(self._unqueue(items))
            raise DeadlineExceeded("deadline exceeded while queued for the backend") from None
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client's deadline passes; count that as a deadline drop.
            expired = deadline_s is not None and self._clock() >= deadline_s - DEADLINE_SLACK_S
            self._dropped("deadline" if expired else "cancelled").inc(self._unqueue(items))
            raise
        finally:
            self._unqueue(items)
        if len(parts) == 1:
            return parts[0]
        scores = np.concatenate([p.scores for p in parts])  # type: ignore[misc]  # chunks: never TopK
        knowns = [p.known for p in parts]
        known = None if any(k is None for k in knowns) else np.concatenate(knowns)  # type: ignore[arg-type]
        return Answered(scores, parts[0].version, known)

    async def _alone(
        self, images: NDArray[np.uint8], version: int, now: float, deadline_s: float | None, top_k: int | None,
        timed: bool,
    ) -> Answered:
        """The idle fast path of ``answer`` for a backend whose calls are coroutines (TF Serving's RPCs): nothing
        queued, a slot free, no batch delay, so the call is a batch of its own at once, as the collector would make
        it, and its backend call is awaited in the caller's own task: no queue, no future, no collector wake-up.
        Calls arriving meanwhile queue, and the collector batches them. What ``_dispatch`` does for a batch, done
        for this one caller: the same slot, estimate, timeout, metrics and errors."""
        n = len(images)
        if deadline_s is not None and now >= deadline_s:  # dropped before it costs a backend call, as _take drops it
            self._dropped("deadline").inc(n)
            raise DeadlineExceeded("deadline exceeded while queued for the backend")
        self._free -= 1
        self._metrics.queue_wait.observe(0.0)  # once per batch, as _take: it waited for nothing
        started, t0 = self._begin(images, version, deadline_s, top_k is not None)
        self._inflight[started] = t0
        self._inline += 1
        outcome = "ok"
        released = False
        timeout_s = self._cfg.backend_timeout_ms / 1000.0
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # answer() is awaited in a task
        timer = self._expiry(loop, task, loop.time() + timeout_s)  # the backend's
        deadline = None  # the caller's, unless gRPC cancels it at its deadline (not timed)
        if timed and deadline_s is not None:
            deadline = asyncio.timeout_at(loop.time() + (deadline_s - self._clock()))
        try:
            try:
                if deadline is None:
                    got = await started
                else:
                    async with deadline:
                        got = await started
            finally:
                self._expiries.pop(timer, None)
            answered = self._answered(got, n, version)
            self._succeeded(n, t0)
            released = True
            return answered
        except (Exception, asyncio.CancelledError) as exc:
            self._learn(n, self._clock() - t0)  # failures cost time too: a brownout must show in the estimate
            if timer.fired and isinstance(exc, asyncio.CancelledError) and task.uncancel() > timer.cancelling:
                timer.fired = False  # cancelled from outside as well: that cancellation wins (as asyncio.Timeout)
            if isinstance(exc, asyncio.CancelledError) and not timer.fired and task.cancelling() > 0:
                outcome = "cancelled"  # the caller went away (gRPC cancelled it): its backend call with it
                raise
            if deadline is not None and deadline.expired() and not timer.expired():
                outcome = "cancelled"  # the caller's deadline passed: its backend call was cancelled for it
                raise DeadlineExceeded("deadline exceeded while queued for the backend") from None
            outcome = "error"
            if timer.expired():
                await self._outlive(started, timeout_s)
            raise self._failure(exc, n, timer) from None
        finally:
            self._inline -= 1
            if not self._inline and self._inline_done is not None and not self._inline_done.done():
                self._inline_done.set_result(None)
            self._ended(started, t0, outcome, released)

    def _expiry(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], when: float) -> _Expiry:
        """An idle-path call's backend timer, due at ``when`` (loop time); the batcher's loop timer is set for it
        unless one is due already at or before it (calls start in order, each for the same timeout)."""
        timer = _Expiry(task, when)
        self._expiries[timer] = None
        if self._expiry_handle is None or when < self._expiry_when:
            if self._expiry_handle is not None:
                self._expiry_handle.cancel()
            self._expiry_handle = loop.call_at(when, self._expire, when)
            self._expiry_when = when
        return timer

    def _expire(self, now: float) -> None:
        """The batcher's loop timer, due at ``now``: cancel every idle-path call due by then (at most one per backend
        slot is in flight), and set the timer again for the earliest one left."""
        self._expiry_handle = None
        later: float | None = None
        for timer in list(self._expiries):
            if timer.when <= now:
                del self._expiries[timer]
                timer.fired = True
                timer.task.cancel()
            elif later is None or timer.when < later:
                later = timer.when
        if later is not None:
            self._expiry_handle = asyncio.get_running_loop().call_at(later, self._expire, later)
            self._expiry_when = later

    def _take_alone(self, item: _Item) -> None:
        """An idle batcher (nothing else queued, a slot free, no batch delay) whose backend is not known to give
        coroutines (a thread's work, or before its first call): take the caller's own item as a batch now, as the
        collector would, and start it in a task of its own, with no collector wake-up. A dropped item (its deadline
        passed) has its future say so. A coroutine backend's idle calls take ``_alone`` instead."""
        self._free -= 1
        try:
            batch = self._take()
        except Exception as exc:  # the collector's work, done here: a failure is the collector's death
            self._release()
            self.fail("the batcher's collector", exc)
            refusal = self._refusal()
            if refusal is not None and not item.future.done():
                item.future.set_exception(refusal)
            return
        if not batch:
            self._release()
            return
        self._spawn(batch, *self._start(batch))

    def _spawn(
        self, batch: list[_Item], images: NDArray[np.uint8], started: Awaitable[Scores | Answered], t0: float
    ) -> None:
        """Run a batch in a task of its own (the collector's batches, and a thread's work)."""
        task = asyncio.get_running_loop().create_task(self._dispatch(batch, images, started, t0))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _release(self, hand_over: bool = False) -> None:
        """Free a backend slot; wake the collector when calls are waiting for one. ``hand_over`` (a batch that
        ended well, no batch delay): take the next batch and start it now, in the slot, as the collector would."""
        if hand_over and self._queue and self._cfg.max_batch_delay_ms <= 0:
            try:
                batch = self._take()
            except Exception as exc:  # the collector's work, done here: a failure is the collector's death
                batch = []
                self.fail("the batcher's collector", exc)
            if batch:
                self._spawn(batch, *self._start(batch))
                return
        self._free += 1
        if self._queue or self._closed:  # closing: the collector may wait for the queue to empty
            self._wake.set()

    def _dropped(self, reason: str) -> Counter:
        return self._metrics.child(self._metrics.dropped, reason)

    def admit(self, n: int) -> None:
        """Raise ResourceExhausted (or Unavailable once closed) now if a call of ``n`` drawings would be refused by
        :meth:`submit` at this moment: a cheap check for callers to make before they preprocess the call.

        :meth:`submit` makes the same checks, through this (the queue may have filled meanwhile).
        """
        if self._closed:
            raise Unavailable("the service is shutting down; retry on another replica")
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
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
        """How long a new call would wait for the backend work ahead of it (None until a batch ran or started).

        A batch's cost is mostly per batch on a GPU and grows with its size on a CPU; either way, the queue
        drains in full batches under load. With no full batch queued, a call joins the next batch: 0. Otherwise
        the estimate is (full batches queued x ``cost`` + the work left in flight) / slots, where ``cost`` is the
        median duration of recent near-full batches, failed and timed-out ones included, or longer when a batch
        in flight has already run longer (a brownout shows there first), and a batch in flight has ``cost``
        minus what it ran left.
        """
        took = self._took_big or self._took_small
        if not took and not self._inflight:
            return None
        ahead = self._queued // self._cfg.max_batch_size
        if ahead == 0:  # the common case: skip the rest on the hot path
            return 0.0
        now = self._clock()
        ran = [now - t0 for t0 in self._inflight.values()]
        cost = max([statistics.median(took) if took else 0.0, *ran])  # ran may be empty
        return (ahead * cost + sum(cost - r for r in ran)) / self._cfg.max_concurrent_batches

    def fail(self, what: str, exc: BaseException | None = None) -> None:
        """Report that ``what`` (a task the service cannot work without) died: log it, report not ready and not
        live, fail every queued call and refuse new ones with UNAVAILABLE naming it. Only the first one counts."""
        if self._failed is not None:
            return
        self._failed = f"{what} died" + (f" ({type(exc).__name__}: {exc})" if exc is not None else "")
        log.error("%s: failing queued calls and refusing new ones until the process restarts", self._failed,
                  exc_info=exc)  # fmt: skip
        self._report()

    def _refusal(self) -> Unavailable | None:
        """Why calls are refused now (a dead task, a wedged backend holding every slot), or None."""
        if self._failed is not None:
            return Unavailable(f"{self._failed}; this replica cannot serve until it restarts, retry on another")
        if self._stuck >= self._cfg.max_concurrent_batches and self._timeouts >= self._cfg.wedged_after_timeouts:
            return Unavailable(
                f"the backend is wedged: every backend slot ({self._stuck}) holds a batch that timed out after "
                f"backend_timeout_ms={self._cfg.backend_timeout_ms:g} and has not returned; retry on another replica"
            )
        return None

    def _report(self) -> None:
        """Recompute the backend's health; tell ``on_health`` when it changed; fail queued calls when refusing."""
        wedged = self._timeouts >= self._cfg.wedged_after_timeouts
        if self._failed is not None:
            health = BackendHealth(False, False, self._failed)
        elif wedged:
            still = f"; {self._stuck} still running a timeout later" if self._stuck else ""
            health = BackendHealth(False, self._stuck == 0, f"{self._timeouts} consecutive backend timeouts "
                                   f"(backend_timeout_ms={self._cfg.backend_timeout_ms:g}){still}")  # fmt: skip
        else:
            health = BackendHealth()
        if health != self._health:
            self._health = health
            if health.ready:
                log.warning("the backend is healthy again")
            else:
                log.warning("the backend is not %s: %s", "ready" if health.live else "ready nor live", health.reason)
            if self.on_health is not None:
                self.on_health(health)
        refusal = self._refusal()
        if refusal is not None:
            self._fail_queued(refusal)

    def _fail_queued(self, err: ServiceError) -> None:
        """Answer every queued item with ``err`` (counted as dropped, reason ``unavailable``)."""
        dropped = 0
        while self._queue:
            it = self._queue.popleft()
            if it.queued:
                it.queued = False
                self._queued -= it.n
                dropped += it.n
            if not it.future.done():
                it.future.set_exception(err)
        if dropped:
            self._dropped("unavailable").inc(dropped)
        self._metrics.queue_depth.set(self._queued)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        """The collector ended: expected once closed; otherwise it died, and the batcher fails."""
        if task.cancelled():
            if not self._closed:
                self.fail("the batcher's collector")
            return
        exc = task.exception()
        if exc is not None or not self._closed:
            self.fail("the batcher's collector", exc)

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
            # The slot is taken only once a batch can be: while idle, callers run their batches themselves.
            while not (self._queue and self._free > 0):
                if self._closed and not self._queue:
                    return
                self._wake.clear()
                await self._wake.wait()
            self._free -= 1
            if delay_s > 0 and not self._closed:
                until = self._queue[0].enqueued_s + delay_s
                while self._queued < self._cfg.max_batch_size and not self._closed:
                    left = until - self._clock()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                self._release()
                continue
            self._spawn(batch, *self._start(batch))

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
                self._dropped("deadline").inc(it.n)
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
        if batch:  # once per batch, not per drawing: its oldest drawing's wait
            self._metrics.queue_wait.observe(now - min(it.enqueued_s for it in batch))
        return batch

    def _start(self, batch: list[_Item]) -> tuple[NDArray[np.uint8], Awaitable[Scores | Answered], float]:
        """Start the backend call now, from the collector, not from a task that runs after everything else
        already scheduled (after a batch, that is every one of its callers' responses). A coroutine (TF Serving's
        call, its RPC started already) is awaited as it is by ``_dispatch``, with no task of its own; any other
        awaitable but a future is wrapped in a task."""
        images = batch[0].images if len(batch) == 1 else np.concatenate([it.images for it in batch])
        deadlines = [it.deadline_s for it in batch]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        started, t0 = self._begin(images, batch[0].version, deadline, all(it.top_k is not None for it in batch))
        return images, started, t0

    def _begin(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None, top_k_only: bool
    ) -> tuple[Awaitable[Scores | Answered], float]:
        """Count a batch in and start its backend call (for its top-k outputs alone when every caller wants only
        those and the backend gives them); returns the call, a coroutine or a future, and when it started."""
        self._metrics.batch_size.observe(len(images))
        self._metrics.batches_in_flight += 1
        t0 = self._clock()
        try:
            run = self._run_top_k if top_k_only and self._run_top_k is not None else self._run_batch
            started = run(images, version, deadline_s)  # type: ignore[misc]
            self._coroutines = asyncio.iscoroutine(started)
            if not self._coroutines:
                started = asyncio.ensure_future(started)
        except Exception as exc:  # a backend that fails before it starts fails this batch like any other
            started = asyncio.get_running_loop().create_future()
            started.set_exception(exc)
        return started, t0

    async def _dispatch(
        self,
        batch: list[_Item],
        images: NDArray[np.uint8],
        started: Awaitable[Scores | Answered],
        t0: float,
    ) -> None:
        """Await a batch's backend call, in a task of its own, and answer its callers."""
        n = len(images)
        timeout_s = self._cfg.backend_timeout_ms / 1000.0
        self._inflight[started] = t0
        task = asyncio.current_task()
        direct = asyncio.iscoroutine(started)
        watch: _Watch | None = None
        if direct:  # awaited in this task: cancelling this task cancels the call (the RPC)
            if task is not None:
                watch = _Watch()
                self._cancel_when_callers_gone(batch, task, watch)
        elif isinstance(started, asyncio.Task):
            self._cancel_when_callers_gone(batch, started)
        outcome = "ok"
        released = False
        timer = asyncio.timeout(timeout_s)  # no extra task or wake-up
        try:
            async with timer:
                if direct:
                    try:
                        got = await started
                    finally:
                        if watch is not None:
                            watch.awaiting = False
                else:
                    # shielded: at the timeout, a thread's future must stay pending until the thread really returns
                    got = await asyncio.shield(started)  # type: ignore[arg-type]
            answered = self._answered(got, n, batch[0].version)
            probs, version, known = answered.scores, answered.version, answered.known
            # Free the slot before answering: the next batch starts while this batch's callers are being
            # answered, so the backend does not sit idle in between.
            self._succeeded(n, t0)
            released = True
            start = 0
            for it in batch:
                if not it.future.done():
                    end = start + it.n
                    mine = None if known is None else known[start:end]
                    it.future.set_result(Answered(probs[start:end], version, mine))
                start += it.n
        except (Exception, asyncio.CancelledError) as exc:  # the batch failed: fail its own items, nothing else
            if watch is not None and watch.fired and task is not None:
                task.uncancel()  # our own cancel, for callers gone: not one from outside
            own_cancel = task is not None and task.cancelling() > 0
            outcome = "error"
            if isinstance(exc, asyncio.CancelledError) and not timer.expired() and not own_cancel and all(
                it.future.cancelled() for it in batch
            ):
                outcome = "cancelled"  # every caller went away, and the backend call was cancelled for it
            err = self._failure(exc, n, timer)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            self._learn(n, self._clock() - t0)  # failures cost time too: a brownout must show in the estimate
            if timer.expired():
                await self._outlive(started, timeout_s)
            if own_cancel:
                raise  # this task itself is being cancelled: its callers are answered, let it end
        finally:
            self._ended(started, t0, outcome, released)

    def _answered(self, got: Scores | Answered, n: int, version: int) -> Answered:
        """A batch's backend answer checked: ``n`` results (and known scores), and the version that answered."""
        if isinstance(got, Answered):
            probs, version, known = got.scores, got.version, got.known
        else:
            probs, known = got, None
        if len(probs) != n:
            raise BackendError(f"backend returned {len(probs)} results for {n} drawings")
        if known is not None and known.shape != (n,):
            raise BackendError(f"backend returned known scores of shape {list(known.shape)} for {n} drawings")
        return got if isinstance(got, Answered) else Answered(probs, version, known)

    def _succeeded(self, n: int, t0: float) -> None:
        """A batch ended well: learn its cost, clear the timeouts, and free its slot (the next batch starts now)."""
        self._learn(n, self._clock() - t0)
        if self._timeouts:
            self._timeouts = 0
            self._report()
        self._release(hand_over=True)

    def _failure(self, exc: BaseException, n: int, timer: asyncio.Timeout | _Expiry) -> ServiceError:
        """What a failed batch's callers get: its timeout, its cancellation, the backend's ServiceError, or any
        other exception as a BackendError (logged with its traceback)."""
        if timer.expired():
            return BackendError(
                f"backend batch of {n} timed out after backend_timeout_ms={self._cfg.backend_timeout_ms:g}"
            )
        if isinstance(exc, asyncio.CancelledError):
            return BackendError(f"backend call for a batch of {n} was cancelled")
        if isinstance(exc, ServiceError):
            return exc
        log.exception("backend batch of %d drawings failed", n, exc_info=exc)
        return BackendError(f"backend failed on a batch of {n} drawings: {exc}")

    def _ended(self, started: Awaitable[Scores | Answered], t0: float, outcome: str, released: bool) -> None:
        """Count a batch out, whatever its end: its latency by outcome, and its slot freed if not yet."""
        self._inflight.pop(started, None)
        m = self._metrics
        m.child(m.backend_latency, self._backend, outcome).observe(self._clock() - t0)
        m.batches_in_flight -= 1
        if not released:
            self._release()

    def _cancel_when_callers_gone(
        self, batch: list[_Item], started: asyncio.Task[Any], watch: _Watch | None = None
    ) -> None:
        """Cancel the backend call once every caller of the batch is gone (or answered at the timeout), when it
        is an asyncio task (a gRPC call: cancelling it cancels the RPC), or awaited by one (``started`` is then the
        dispatch task, cancelled only while ``watch`` says it awaits the call); a thread's work cannot be stopped."""
        left = len(batch)

        def one_done(_: asyncio.Future[Answered]) -> None:
            nonlocal left
            left -= 1
            if left == 0 and not started.done() and (watch is None or watch.awaiting):
                if watch is not None:
                    watch.fired = True
                    watch.awaiting = False
                started.cancel()

        for it in batch:
            it.future.add_done_callback(one_done)

    async def _outlive(self, started: Awaitable[Scores | Answered], timeout_s: float) -> None:
        """After a timeout (callers answered already): hold the slot until the backend's work has really ended.

        Counts one timeout now and one more for each further ``timeout_s`` the work runs (then it is stuck).
        Work that ends by itself, not by our cancelling it, shows that the backend is alive: the count resets.
        A coroutine awaited by the dispatch itself has ended already: the timeout cancelled it."""
        self._timeouts += 1
        self._report()
        if not asyncio.isfuture(started):
            return
        if isinstance(started, asyncio.Task):
            started.cancel()
        stuck = False
        try:
            while not (await asyncio.wait({started}, timeout=timeout_s))[0]:
                self._timeouts += 1
                if not stuck:
                    stuck = True
                    self._stuck += 1
                self._report()
        finally:
            if stuck:
                self._stuck -= 1
        if not started.cancelled():
            started.exception()  # retrieved: nobody waits for it any more
            log.warning("a timed-out backend batch ended after all, %.1f s after it started",
                        self._clock() - self._inflight.get(started, self._clock()))  # fmt: skip
            self._timeouts = 0
        self._report()

    async def close(self) -> None:
        """Stop accepting, dispatch what is queued, and wait for running batches to finish."""
        self._closed = True
        self._wake.set()
        if self._collector is not None:
            await asyncio.gather(self._collector, return_exceptions=True)  # it may have died already
        while self._running or self._inline:  # a batch that ends hands its slot to the next (a task of its own)
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            elif self._inline:  # batches their callers run themselves
                self._inline_done = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._inline_done)
        if self._expiry_handle is not None:  # no idle-path call is left for the backend's timer to watch
            self._expiry_handle.cancel()
            self._expiry_handle = None
