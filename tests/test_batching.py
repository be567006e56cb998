"""Unit tests for the dynamic batcher (``service.dataplane.batching``): pure asyncio, no gRPC and no TensorFlow.

The model backend is replaced by :class:`FakeBackend`, which records every batch it is given and answers with
probabilities derived from the input, so each test can check that a caller gets back exactly its own rows, in
order. Every test runs on a fake clock (``tests/fakeclock.py``): the loop jumps to its next timer instead of
sleeping, so durations are exact and nothing depends on how busy the machine is; the batcher's clock is the
loop's. Each test's coroutine runs under a fake-time bound, and pytest-timeout bounds it in real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from fakeclock import now, run_on_fake_clock
from numpy.typing import NDArray

from service.backends import TopK
from service.core.errors import BackendError, DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from service.core.metrics import Metrics
from service.dataplane.batching import BackendHealth, Batcher, BatcherConfig

pytestmark = pytest.mark.timeout(10)

#: Fake seconds a test may run.
TEST_TIMEOUT_S = 60.0
#: One column per possible drawing id (the uint8 pixel value that tags a drawing), plus one for the version.
NUM_COLUMNS = 257
MARKER = 250  # a drawing id that makes the fake backend fail


@dataclass
class Call:
    """One batch the fake backend received."""

    size: int
    version: int
    ids: list[int]


@dataclass
class FakeBackend:
    """A stand-in for the model backend (the ``run_batch`` the batcher calls); it never touches a model.

    It records every call (batch size, version, drawing ids), can hold the first ``gate_calls`` batches until
    ``gate`` is set, can sleep ``delay_s``, fails batches that contain the drawing id ``fail_on``, and returns
    ``expected(ids, version)``: a one-hot row per drawing at its id, with the version in the last column.
    """

    gate: asyncio.Event | None = None
    gate_calls: int = 1
    delay_s: float = 0.0
    fail_on: int | None = None
    fail_with: BaseException | None = None
    drop_a_row: bool = False
    calls: list[Call] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    cancelled: int = 0

    async def __call__(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> NDArray[np.float32]:
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
        ids = [int(v) for v in images[:, 0, 0, 0]]
        self.calls.append(Call(len(images), version, ids))
        self.deadlines.append(deadline_s)
        try:
            if self.gate is not None and len(self.calls) <= self.gate_calls:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_on is not None and self.fail_on in ids:
            raise self.fail_with or RuntimeError(f"fake backend failure on drawing {self.fail_on}")
        probs = expected(ids, version)
        return probs[:-1] if self.drop_a_row else probs

    @property
    def seen_ids(self) -> list[int]:
        return [i for c in self.calls for i in c.ids]


def images_for(ids: Iterable[int]) -> NDArray[np.uint8]:
    """Drawings [n, 28, 28, 1], drawing i filled with the value ids[i] (its tag)."""
    ids = list(ids)
    out = np.empty((len(ids), 28, 28, 1), np.uint8)
    for i, v in enumerate(ids):
        out[i] = v
    return out


def expected(ids: Iterable[int], version: int) -> NDArray[np.float32]:
    ids = list(ids)
    probs = np.zeros((len(ids), NUM_COLUMNS), np.float32)
    probs[np.arange(len(ids)), ids] = 1.0
    probs[:, -1] = version
    return probs


def make(backend: FakeBackend, **cfg: Any) -> tuple[Batcher, Metrics]:
    config = BatcherConfig(**cfg)
    metrics = Metrics(config.max_batch_size)
    batcher = Batcher(backend, config, metrics, backend_name="fake", clock=asyncio.get_running_loop().time)
    batcher.start()
    return batcher, metrics


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a test's coroutine on the fake clock."""
    run_on_fake_clock(coro_fn, TEST_TIMEOUT_S)


async def until(predicate: Callable[[], bool], steps: int = 1000) -> None:
    """Let the loop run ready callbacks (no time passes) until ``predicate()`` holds."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition not reached within {steps} loop steps")


def assert_error(exc: BaseException, cls: type[ServiceError], code: grpc.StatusCode, message: str) -> None:
    """``exc`` is exactly that error: its class, gRPC code and message."""
    assert type(exc) is cls, repr(exc)
    assert isinstance(exc, ServiceError) and exc.code == code and exc.message == message, (exc.code, str(exc))


class Snapshot:
    """Every metric sample at one moment; ``delta`` is how much one changed since (the test's own calls)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect()
                       for s in f.samples}  # fmt: skip

    def delta(self, name: str, **labels: str) -> float:
        key = (f"quickdraw_{name}", tuple(sorted(labels.items())))
        return sample(self.metrics, name, **labels) - self.values.get(key, 0.0)


def spawn(batcher: Batcher, ids: list[int], version: int = 1, deadline_s: float | None = None) -> asyncio.Task:
    return asyncio.create_task(batcher.submit(images_for(ids), version, deadline_s))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"quickdraw_{name}", labels or None)
    return 0.0 if value is None else value


# 1. An idle service adds no wait.


def test_idle_single_submit_dispatches_immediately() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, _ = make(backend, max_batch_delay_ms=0)
        for tag in (7, 8, 9):
            t0 = now()
            probs = await batcher.submit(images_for([tag]), 3)
            assert now() == t0, f"an idle batcher waited {now() - t0:.3f} s (fake clock) for one drawing"
            np.testing.assert_array_equal(probs, expected([tag], 3))
        assert [(c.size, c.version) for c in backend.calls] == [(1, 3)] * 3
        await batcher.close()

    run(main)


# 2. Under load, queued drawings are merged into the next free slot's batch.


def test_calls_queued_behind_a_busy_slot_are_merged() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, metrics = make(backend, max_batch_size=32, max_concurrent_batches=1)
        before = Snapshot(metrics)
        first = spawn(batcher, [0])
        await until(lambda: len(backend.calls) == 1)
        waiting = {i: spawn(batcher, [i]) for i in range(1, 21)}
        await until(lambda: batcher.queued_drawings == 20)
        assert len(backend.calls) == 1  # nothing else dispatched while the only slot is busy
        backend.gate.set()
        np.testing.assert_array_equal(await first, expected([0], 1))
        for i, task in waiting.items():
            np.testing.assert_array_equal(await task, expected([i], 1))
        sizes = [c.size for c in backend.calls]
        assert sizes == [1, 20]
        assert backend.calls[1].ids == list(range(1, 21))  # FIFO
        assert before.delta("batch_size_drawings_count") == 2
        assert before.delta("batch_size_drawings_sum") == 21
        assert before.delta("batch_size_drawings_bucket", le="1.0") == 1
        assert before.delta("batch_size_drawings_bucket", le="16.0") == 1
        assert before.delta("batch_size_drawings_bucket", le="32.0") == 2
        assert sample(metrics, "queue_depth_drawings") == 0  # a gauge: its value now, not a change
        await batcher.close()

    run(main)


def test_merged_batches_never_exceed_max_batch_size() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, _ = make(backend, max_batch_size=8, max_concurrent_batches=1)
        first = spawn(batcher, [0])
        await until(lambda: len(backend.calls) == 1)
        calls = [[3 * k + 1, 3 * k + 2, 3 * k + 3] for k in range(7)]  # 7 calls of 3 drawings
        tasks = [spawn(batcher, ids) for ids in calls]
        await until(lambda: batcher.queued_drawings == 21)
        backend.gate.set()
        await first
        for ids, task in zip(calls, tasks, strict=True):
            np.testing.assert_array_equal(await task, expected(ids, 1))
        assert all(c.size <= 8 for c in backend.calls)
        assert [c.size for c in backend.calls[1:]] == [6, 6, 6, 3]  # 3+3 fit in 8, a third call does not
        assert backend.seen_ids == list(range(22))
        await batcher.close()

    run(main)


# 3. With max_batch_delay_ms > 0, a free slot waits for a fuller batch.


def test_batch_delay_merges_calls_arriving_within_the_delay() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, _ = make(backend, max_batch_delay_ms=100, max_concurrent_batches=2)
        t0 = now()
        tasks = []
        for i in range(5):
            tasks.append(spawn(batcher, [i]))
            await asyncio.sleep(0.005)
        for i, task in enumerate(tasks):
            np.testing.assert_array_equal(await task, expected([i], 1))
        assert [c.size for c in backend.calls] == [5]
        assert now() - t0 == pytest.approx(0.1)  # the first drawing's arrival + max_batch_delay_ms, exactly
        await batcher.close()

    run(main)


def test_batch_delay_ends_early_when_the_batch_is_full() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, _ = make(backend, max_batch_size=4, max_batch_delay_ms=1000)
        t0 = now()
        tasks = [spawn(batcher, [i]) for i in range(4)]
        await asyncio.gather(*tasks)
        assert now() == t0  # full at once: no delay at all
        assert [c.size for c in backend.calls] == [4]
        await batcher.close()

    run(main)


# 4. max_batch_size is respected; a call larger than it is split into chunks and reassembled in order.


def test_large_call_is_split_into_chunks_and_reassembled_in_order() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, _ = make(backend, max_batch_size=4, max_concurrent_batches=2)
        ids = list(range(100, 110))
        probs = await batcher.submit(images_for(ids), 2)
        np.testing.assert_array_equal(probs, expected(ids, 2))
        assert sorted(c.size for c in backend.calls) == [2, 4, 4]
        assert all(c.size <= 4 for c in backend.calls)
        assert sorted(backend.seen_ids) == ids
        await batcher.close()

    run(main)


def test_top_k_is_exactly_a_stable_descending_sort_cut_at_k() -> None:
    """TopK.of (a partition, then a sort of k) agrees with a full stable sort, ties at the k-th score included."""
    rng = np.random.default_rng(7)
    ties = np.array([[0.5, 0.2, 0.2, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5, 0.2]], np.float32)
    cases = [rng.random((50, 29), dtype=np.float32), np.round(rng.random((50, 29)), 1).astype(np.float32),
             np.zeros((3, 29), np.float32), ties,
             # large enough to be partitioned first (PARTITION_FROM), with and without ties at the k-th score
             rng.random((64, 345), dtype=np.float32),
             np.round(rng.random((64, 345)), 2).astype(np.float32)]  # fmt: skip
    for probs in cases:
        for k in [*range(0, 7), probs.shape[1] - 1, probs.shape[1], probs.shape[1] + 1]:
            top = TopK.of(probs, k)
            want = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(top.indices, want)
            np.testing.assert_array_equal(top.scores, np.take_along_axis(probs, want, axis=1))
    assert TopK.of(ties, 2).indices.tolist() == [[0, 1], [3, 1]]


def test_top_k_callers_get_the_backends_top_k_alone_unless_one_in_the_batch_needs_probabilities() -> None:
    """A batch of callers who all want no more than the backend's top-k width goes to ``run_top_k``; one caller
    wanting more (or probabilities), or a call split into chunks, makes it a probabilities batch."""

    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        top_k_batches: list[int] = []

        async def run_top_k(images: NDArray[np.uint8], version: int, deadline_s: float | None = None) -> TopK:
            top_k_batches.append(len(images))
            return TopK.of(await backend(images, version, deadline_s), 3)

        config = BatcherConfig(max_batch_size=4, max_concurrent_batches=1)
        batcher = Batcher(backend, config, Metrics(4), "fake", clock=asyncio.get_running_loop().time,
                          run_top_k=run_top_k, top_k_width=3)  # fmt: skip
        batcher.start()
        first = asyncio.create_task(batcher.submit(images_for([1]), 1, top_k=3))  # held by the gate
        await until(lambda: len(backend.calls) == 1)
        # queued behind it: two top-k callers, one batch; then a caller wanting 4 with one wanting 2: probabilities
        both = [asyncio.create_task(batcher.submit(images_for([i]), 1, top_k=2)) for i in (2, 3)]
        await until(lambda: batcher.queued_drawings == 2)
        assert backend.gate is not None
        backend.gate.set()
        got = await first
        # the fake's rows: 1.0 at the drawing's id and at the last column (the version), 0 elsewhere
        assert isinstance(got, TopK) and got.indices.tolist() == [[1, NUM_COLUMNS - 1, 0]] and got.scores[0, 0] == 1.0
        for i, task in zip((2, 3), both, strict=True):
            top = await task
            assert isinstance(top, TopK) and top.indices[0, 0] == i
        assert top_k_batches == [1, 2]
        backend.gate = asyncio.Event()
        backend.gate_calls = len(backend.calls) + 1
        held = asyncio.create_task(batcher.submit(images_for([4]), 1))
        await until(lambda: len(backend.calls) == 3)
        mixed = [asyncio.create_task(batcher.submit(images_for([i]), 1, top_k=k)) for i, k in ((5, 4), (6, 2))]
        await until(lambda: batcher.queued_drawings == 2)
        backend.gate.set()
        np.testing.assert_array_equal(await held, expected([4], 1))
        for i, task in zip((5, 6), mixed, strict=True):
            np.testing.assert_array_equal(await task, expected([i], 1))
        split = await batcher.submit(images_for(range(10, 16)), 1, top_k=2)  # 6 drawings: chunks of 4 and 2
        np.testing.assert_array_equal(split, expected(range(10, 16), 1))
        assert top_k_batches == [1, 2] and [c.size for c in backend.calls] == [1, 2, 1, 2, 4, 2]
        await batcher.close()

    run(main)


# 5. The queue is bounded; a call that does not fit is refused at once.


def test_full_queue_refuses_at_once_and_earlier_calls_complete() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, metrics = make(backend, max_queued_drawings=5, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1, 2])
        await until(lambda: len(backend.calls) == 1)  # dispatched: no longer queued
        b = spawn(batcher, [3, 4, 5])
        await until(lambda: batcher.queued_drawings == 3)
        t0 = now()
        with pytest.raises(ResourceExhausted) as info:
            await batcher.submit(images_for([6, 7, 8]), 1)
        assert now() == t0  # refused while the backend is still blocked: the caller did not wait for room
        assert_error(info.value, ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     "queue full: 3 drawings waiting and this call adds 3, over max_queued_drawings=5; retry with "
                     "backoff")  # fmt: skip
        assert before.delta("rejected_requests_total") == 1
        c = spawn(batcher, [9, 10])  # exactly fills the queue: accepted
        await until(lambda: batcher.queued_drawings == 5)
        backend.gate.set()
        np.testing.assert_array_equal(await a, expected([1, 2], 1))
        np.testing.assert_array_equal(await b, expected([3, 4, 5], 1))
        np.testing.assert_array_equal(await c, expected([9, 10], 1))
        assert 6 not in backend.seen_ids
        assert before.delta("rejected_requests_total") == 1
        await batcher.close()

    run(main)


# 6. An item whose deadline passes while queued is dropped before it reaches the backend.


def test_expired_item_raises_deadline_exceeded_and_never_reaches_backend() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, metrics = make(backend, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        late = spawn(batcher, [2, 3], deadline_s=now() + 0.03)
        on_time = spawn(batcher, [4], deadline_s=now() + 5.0)
        no_deadline = spawn(batcher, [5])
        await asyncio.sleep(0.06)
        backend.gate.set()
        with pytest.raises(DeadlineExceeded) as info:
            await late
        assert_error(info.value, DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED,
                     "deadline exceeded while queued for the backend")  # fmt: skip
        np.testing.assert_array_equal(await a, expected([1], 1))
        np.testing.assert_array_equal(await on_time, expected([4], 1))
        np.testing.assert_array_equal(await no_deadline, expected([5], 1))
        assert 2 not in backend.seen_ids and 3 not in backend.seen_ids
        assert before.delta("dropped_drawings_total", reason="deadline") == 2
        assert before.delta("dropped_drawings_total", reason="cancelled") == 0
        await batcher.close()

    run(main)


def test_backend_gets_the_latest_deadline_of_its_batch() -> None:
    """A batch must not outlive its last caller, nor cut short any of them: the latest deadline wins."""

    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, _ = make(backend, max_concurrent_batches=1)
        first = spawn(batcher, [1], deadline_s=now() + 5.0)
        await until(lambda: len(backend.calls) == 1)
        soon, later = now() + 3.0, now() + 7.0
        b = spawn(batcher, [2], deadline_s=soon)
        c = spawn(batcher, [3], deadline_s=later)
        d = spawn(batcher, [4])  # a caller with no deadline
        await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(first, b, c, d)
        assert [c.ids for c in backend.calls] == [[1], [2, 3, 4]]
        assert backend.deadlines[0] is not None and backend.deadlines[1] is None
        e = spawn(batcher, [5], deadline_s=soon)
        f = spawn(batcher, [6], deadline_s=later)
        await asyncio.gather(e, f)
        assert backend.deadlines[-1] == later
        await batcher.close()

    run(main)


def test_admission_counts_work_in_flight_and_refuses_at_once_over_max_queue_wait() -> None:
    """Overload: once full batches are queued and the work ahead exceeds max_queue_wait_ms, new calls fail fast."""

    async def main() -> None:
        backend = FakeBackend(delay_s=0.04)
        batcher, metrics = make(backend, max_batch_size=4, max_concurrent_batches=1, max_queue_wait_ms=25.0)
        before = Snapshot(metrics)
        assert batcher.estimated_wait_s() is None
        await batcher.submit(images_for([1, 2, 3, 4]), 1)  # a full batch: 40 ms exactly
        assert batcher.estimated_wait_s() == 0.0  # nothing queued
        backend.delay_s = 0.0
        backend.gate, backend.gate_calls = asyncio.Event(), len(backend.calls) + 1
        running = spawn(batcher, [5])  # occupies the only slot
        await until(lambda: len(backend.calls) == 2)
        queued = [spawn(batcher, [6, 7, 8])]
        await until(lambda: batcher.queued_drawings == 3)
        assert batcher.estimated_wait_s() == 0.0  # no full batch queued: a call joins the next batch
        await asyncio.sleep(0.01)
        queued.append(spawn(batcher, [9]))  # admitted; now a full batch is queued
        await until(lambda: batcher.queued_drawings == 4)
        assert batcher.estimated_wait_s() == pytest.approx(0.04 + 0.03)  # the queued batch, and 30 ms in flight
        t0 = now()
        with pytest.raises(ResourceExhausted) as info:
            await batcher.submit(images_for([10]), 1)
        assert now() == t0  # at once
        assert_error(info.value, ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     "overloaded: about 70 ms of backend work is queued ahead of this call, over max_queue_wait_ms=25; "
                     "retry with backoff")  # fmt: skip
        await asyncio.sleep(0.09)  # the batch in flight overruns (100 ms so far): a brownout
        assert batcher.estimated_wait_s() == pytest.approx(0.1)  # a batch costs at least 100 ms now
        with pytest.raises(ResourceExhausted) as info:
            await batcher.submit(images_for([11]), 1)
        assert_error(info.value, ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     "overloaded: about 100 ms of backend work is queued ahead of this call, over "
                     "max_queue_wait_ms=25; retry with backoff")  # fmt: skip
        assert before.delta("rejected_requests_total") == 2
        backend.gate.set()
        np.testing.assert_array_equal(await running, expected([5], 1))
        for ids, t in zip(([6, 7, 8], [9]), queued, strict=True):
            np.testing.assert_array_equal(await t, expected(ids, 1))  # the admitted calls are all answered
        assert 10 not in backend.seen_ids and 11 not in backend.seen_ids
        await batcher.close()

    run(main)


def test_estimate_with_full_batches_queued_and_none_in_flight() -> None:
    """Between the arrival of calls and their dispatch, full batches can be queued with nothing in flight (every
    call is one with max_batch_size=1): the estimate is the queued batches at the learned cost. (It raised a
    TypeError there once, an INTERNAL for every caller: ``make bench`` found it.)"""

    async def main() -> None:
        backend = FakeBackend(delay_s=0.02)
        batcher, _ = make(backend, max_batch_size=1, max_concurrent_batches=1, max_queue_wait_ms=0.0)
        await batcher.submit(images_for([1]), 1)  # learns 20 ms a batch
        batcher._queued = 3  # three one-drawing calls have arrived and the collector has not run yet
        assert batcher.estimated_wait_s() == pytest.approx(3 * 0.02)
        batcher._queued = 0
        await batcher.close()

    run(main)


def test_admission_learns_from_timed_out_and_failed_batches() -> None:
    """Only successes used to count: a brownout of timeouts and failures left the estimate at its old, fast value."""

    async def main() -> None:
        backend = FakeBackend(delay_s=0.01, fail_on=MARKER)
        batcher, _ = make(backend, max_batch_size=4, max_concurrent_batches=1, backend_timeout_ms=50)
        await batcher.submit(images_for([1, 2, 3, 4]), 1)  # 10 ms
        backend.delay_s = 1.0
        for ids in ([5, 6, 7, 8], [9, 10, 11, 12]):
            with pytest.raises(BackendError) as info:
                await batcher.submit(images_for(ids), 1)
            assert_error(info.value, BackendError, grpc.StatusCode.INTERNAL,
                         "backend batch of 4 timed out after backend_timeout_ms=50")  # fmt: skip
        backend.delay_s = 0.04
        with pytest.raises(BackendError) as info:
            await batcher.submit(images_for([MARKER, 13, 14, 15]), 1)
        assert_error(info.value, BackendError, grpc.StatusCode.INTERNAL,
                     f"backend failed on a batch of 4 drawings: fake backend failure on drawing {MARKER}")  # fmt: skip
        backend.delay_s = 0.0
        backend.gate, backend.gate_calls = asyncio.Event(), len(backend.calls) + 1
        running = spawn(batcher, [16])
        await until(lambda: len(backend.calls) == 5)
        queued = spawn(batcher, [17, 18, 19, 20])
        await until(lambda: batcher.queued_drawings == 4)
        # durations 10, 50, 50 and 40 ms: a batch costs the median, 45 ms; one queued, and all of one in flight
        assert batcher.estimated_wait_s() == pytest.approx(0.045 * 2)
        backend.gate.set()
        await running
        np.testing.assert_array_equal(await queued, expected([17, 18, 19, 20], 1))
        await batcher.close()

    run(main)


def test_settings_refuse_a_queue_smaller_than_one_request() -> None:
    """Such a queue would refuse every full-size call with RESOURCE_EXHAUSTED, forever."""
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError) as info:
        Settings(max_queued_drawings=100, max_drawings_per_request=256)
    assert "max_queued_drawings (100) must be at least max_drawings_per_request (256)" in str(info.value)
    assert Settings(max_queued_drawings=256, max_drawings_per_request=256).max_queued_drawings == 256


# 7. A cancelled caller's items are dropped before dispatch.


def test_cancelled_caller_items_never_reach_backend() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, metrics = make(backend, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        gone = spawn(batcher, [2, 3, 4])
        stays = spawn(batcher, [5])
        await until(lambda: batcher.queued_drawings == 4)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queued_drawings == 1  # the cancelled call's room is freed at once, not at the next batch
        backend.gate.set()
        np.testing.assert_array_equal(await a, expected([1], 1))
        np.testing.assert_array_equal(await stays, expected([5], 1))
        assert backend.seen_ids == [1, 5]
        assert before.delta("dropped_drawings_total", reason="cancelled") == 3
        assert batcher.queued_drawings == 0
        await batcher.close()

    run(main)


def test_cancelled_multi_chunk_caller_drops_all_its_queued_chunks() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, metrics = make(backend, max_batch_size=2, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        gone = spawn(batcher, [10, 11, 12, 13, 14])  # three chunks
        await until(lambda: batcher.queued_drawings == 5)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        backend.gate.set()
        await a
        after = await batcher.submit(images_for([20]), 1)
        np.testing.assert_array_equal(after, expected([20], 1))
        assert backend.seen_ids == [1, 20]
        assert before.delta("dropped_drawings_total", reason="cancelled") == 5
        await batcher.close()

    run(main)


# 8. A failing batch fails only its own calls.


def test_failing_batch_fails_only_its_own_calls() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event(), fail_on=MARKER)
        batcher, metrics = make(backend, max_batch_size=4, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        bad = spawn(batcher, [MARKER, 2])  # batch 2: bad + neighbour (4 drawings)
        neighbour = spawn(batcher, [3, 4])
        good = spawn(batcher, [5, 6, 7])  # does not fit in batch 2: batch 3
        await until(lambda: batcher.queued_drawings == 7)
        backend.gate.set()
        results = await asyncio.gather(a, bad, neighbour, good, return_exceptions=True)
        np.testing.assert_array_equal(results[0], expected([1], 1))
        np.testing.assert_array_equal(results[3], expected([5, 6, 7], 1))
        assert [c.ids for c in backend.calls] == [[1], [MARKER, 2, 3, 4], [5, 6, 7]]
        for err in results[1:3]:
            message = f"backend failed on a batch of 4 drawings: fake backend failure on drawing {MARKER}"
            assert_error(err, BackendError, grpc.StatusCode.INTERNAL, message)
        assert before.delta("backend_duration_seconds_count", backend="fake", outcome="error") == 1
        assert before.delta("backend_duration_seconds_count", backend="fake", outcome="ok") == 2
        # the batcher keeps serving after a failure
        np.testing.assert_array_equal(await batcher.submit(images_for([8]), 1), expected([8], 1))
        await batcher.close()

    run(main)


def test_service_error_from_backend_is_passed_through() -> None:
    async def main() -> None:
        reason = Unavailable("model is reloading")
        backend = FakeBackend(fail_on=MARKER, fail_with=reason)
        batcher, _ = make(backend)
        with pytest.raises(Unavailable) as info:
            await batcher.submit(images_for([MARKER]), 1)
        assert info.value is reason
        await batcher.close()

    run(main)


def test_backend_raising_cancelled_error_still_answers_its_callers() -> None:
    async def main() -> None:
        backend = FakeBackend(fail_on=MARKER, fail_with=asyncio.CancelledError())
        batcher, _ = make(backend, max_concurrent_batches=1)
        task = spawn(batcher, [MARKER])
        done, _ = await asyncio.wait({task}, timeout=0.3)
        if task not in done:
            task.cancel()
            await batcher.close()
            raise AssertionError("the caller of a batch whose backend raised CancelledError was never answered")
        with pytest.raises(BackendError) as info:
            await task
        assert_error(info.value, BackendError, grpc.StatusCode.INTERNAL, "backend call for a batch of 1 was cancelled")
        np.testing.assert_array_equal(await batcher.submit(images_for([1]), 1), expected([1], 1))
        await batcher.close()

    run(main)


# 9. A batch that takes longer than backend_timeout_ms fails with BackendError.


def test_backend_timeout_raises_backend_error() -> None:
    async def main() -> None:
        backend = FakeBackend(delay_s=1.0)
        batcher, metrics = make(backend, backend_timeout_ms=30, max_concurrent_batches=1)
        before = Snapshot(metrics)
        t0 = now()
        with pytest.raises(BackendError) as info:
            await batcher.submit(images_for([1, 2]), 1)
        assert now() - t0 == pytest.approx(0.03)  # at the timeout, not when the backend would have answered
        assert_error(info.value, BackendError, grpc.StatusCode.INTERNAL,
                     "backend batch of 2 timed out after backend_timeout_ms=30")  # fmt: skip
        await until(lambda: backend.cancelled == 1)  # the backend call itself (a task) was cancelled
        await until(lambda: before.delta("backend_duration_seconds_count", backend="fake", outcome="error") == 1)
        backend.delay_s = 0.0  # the slot was given back: the next call is served
        np.testing.assert_array_equal(await batcher.submit(images_for([3]), 1), expected([3], 1))
        await batcher.close()

    run(main)


# 10. A batch never mixes model versions.


def test_versions_are_never_mixed_within_a_batch() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, _ = make(backend, max_batch_size=16, max_concurrent_batches=1)
        first = spawn(batcher, [0], version=1)
        await until(lambda: len(backend.calls) == 1)
        version_of = {0: 1}
        tasks = []
        for i in range(1, 13):
            v = (1, 2, 3)[i % 3]
            version_of[i] = v
            tasks.append((i, v, spawn(batcher, [i], version=v)))
        await until(lambda: batcher.queued_drawings == 12)
        backend.gate.set()
        await first
        for i, v, task in tasks:
            np.testing.assert_array_equal(await task, expected([i], v))
        for call in backend.calls:
            assert {version_of[i] for i in call.ids} == {call.version}, call
            assert call.ids == sorted(call.ids)  # FIFO within a version
        assert [c.size for c in backend.calls] == [1, 4, 4, 4]
        await batcher.close()

    run(main)


# 11. close() drains what is queued and refuses new calls; every accepted call is answered exactly once.


def test_close_drains_queue_and_refuses_new_calls() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, _ = make(backend, max_batch_size=4, max_concurrent_batches=1)
        accepted = {0: spawn(batcher, [0])}
        await until(lambda: len(backend.calls) == 1)
        for i in range(1, 10):
            accepted[i] = spawn(batcher, [i])
        await until(lambda: batcher.queued_drawings == 9)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(1.0)
        assert not closing.done()  # waiting for the blocked batch and the queue
        with pytest.raises(Unavailable) as info:
            await batcher.submit(images_for([99]), 1)
        assert_error(info.value, Unavailable, grpc.StatusCode.UNAVAILABLE,
                     "the service is shutting down; retry on another replica")  # fmt: skip
        backend.gate.set()
        await closing
        answers = 0
        for i, task in accepted.items():
            assert task.done()
            np.testing.assert_array_equal(task.result(), expected([i], 1))
            answers += 1
        assert answers == len(accepted)
        assert sorted(backend.seen_ids) == list(range(10))  # each drawing went to the backend exactly once
        assert batcher.queued_drawings == 0
        with pytest.raises(Unavailable):
            await batcher.submit(images_for([98]), 1)
        await batcher.close()  # closing twice is harmless

    run(main)


def test_close_does_not_wait_out_the_batch_delay() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, _ = make(backend, max_batch_delay_ms=1000)
        task = spawn(batcher, [1, 2])
        await until(lambda: batcher.queued_drawings == 2)
        t0 = now()
        await batcher.close()
        assert now() == t0  # dispatched at once, not after max_batch_delay_ms=1000
        np.testing.assert_array_equal(await task, expected([1, 2], 1))

    run(main)


# 12. A backend that returns the wrong number of rows fails that batch.


def test_wrong_number_of_rows_is_a_backend_error() -> None:
    async def main() -> None:
        backend = FakeBackend(drop_a_row=True)
        batcher, _ = make(backend)
        with pytest.raises(BackendError) as info:
            await batcher.submit(images_for([1, 2, 3]), 1)
        assert_error(info.value, BackendError, grpc.StatusCode.INTERNAL, "backend returned 2 results for 3 drawings")
        backend.drop_a_row = False
        np.testing.assert_array_equal(await batcher.submit(images_for([4]), 1), expected([4], 1))
        await batcher.close()

    run(main)


def test_empty_call_returns_no_rows_without_a_backend_call() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, _ = make(backend)
        probs = await batcher.submit(images_for([]), 1)
        assert len(probs) == 0
        assert backend.calls == []
        await batcher.close()

    run(main)


def test_deadline_is_answered_on_time_even_while_every_slot_is_busy() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, metrics = make(backend, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        t0 = now()
        with pytest.raises(DeadlineExceeded) as info:
            await batcher.submit(images_for([2, 3]), 1, deadline_s=now() + 0.05)
        assert now() - t0 == pytest.approx(0.05)  # at its deadline, not held until the busy slot frees
        assert_error(info.value, DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED,
                     "deadline exceeded while queued for the backend")  # fmt: skip
        assert batcher.queued_drawings == 0
        assert before.delta("dropped_drawings_total", reason="deadline") == 2
        backend.gate.set()
        await a
        assert backend.seen_ids == [1]
        await batcher.close()

    run(main)


# 13. A wedged backend is found out; batches whose callers all left are cancelled; a dead collector fails fast.


@dataclass
class ThreadBackend:
    """Stands for the embedded backend: each batch is a plain future (what ``run_in_executor`` returns) that
    only the test resolves, as a TensorFlow thread that returns when it returns; cancelling it cannot stop it."""

    futures: list[tuple[list[int], asyncio.Future[NDArray[np.float32]]]] = field(default_factory=list)

    def __call__(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> asyncio.Future[NDArray[np.float32]]:
        fut: asyncio.Future[NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        self.futures.append(([int(v) for v in images[:, 0, 0, 0]], fut))
        return fut

    def finish(self, i: int, version: int = 1) -> None:
        """Batch ``i``'s thread returns (late)."""
        ids, fut = self.futures[i]
        fut.set_result(expected(ids, version))


def make_with_health(backend: Any, **cfg: Any) -> tuple[Batcher, Metrics, list[BackendHealth]]:
    batcher, metrics = make(backend, **cfg)
    seen: list[BackendHealth] = []
    batcher.on_health = seen.append
    return batcher, metrics, seen


def test_a_timed_out_thread_keeps_its_slot_and_a_wedged_backend_is_not_ready_nor_live_until_it_returns() -> None:
    async def main() -> None:
        backend = ThreadBackend()
        batcher, metrics, seen = make_with_health(backend, max_concurrent_batches=1, backend_timeout_ms=100,
                                                  wedged_after_timeouts=3)  # fmt: skip
        before = Snapshot(metrics)
        t0 = now()
        with pytest.raises(BackendError) as info:
            await batcher.submit(images_for([1]), 1)
        assert now() - t0 == pytest.approx(0.1)  # the caller gets its error at the timeout
        assert_error(info.value, BackendError, grpc.StatusCode.INTERNAL,
                     "backend batch of 1 timed out after backend_timeout_ms=100")  # fmt: skip
        assert seen == [] and batcher.health == BackendHealth()  # one timeout is not a wedge
        waiting = spawn(batcher, [2])  # no deadline: it waits for the slot, which the thread still holds
        await asyncio.sleep(0.15)  # 250 ms: the first batch has run two and a half timeouts
        assert len(backend.futures) == 1 and batcher.queued_drawings == 1
        await asyncio.sleep(0.1)  # 350 ms: its third timeout, and it is still running
        wedged = BackendHealth(False, False, "3 consecutive backend timeouts (backend_timeout_ms=100); 1 still running "
                                             "a timeout later")  # fmt: skip
        assert seen == [wedged]
        refusal = ("the backend is wedged: every backend slot (1) holds a batch that timed out after "
                   "backend_timeout_ms=100 and has not returned; retry on another replica")  # fmt: skip
        with pytest.raises(Unavailable) as info:
            await waiting  # failed at once, not left waiting for a slot that may never come back
        assert_error(info.value, Unavailable, grpc.StatusCode.UNAVAILABLE, refusal)
        with pytest.raises(Unavailable) as info:
            await batcher.submit(images_for([3]), 1)
        assert_error(info.value, Unavailable, grpc.StatusCode.UNAVAILABLE, refusal)
        assert before.delta("dropped_drawings_total", reason="unavailable") == 1
        assert [ids for ids, _ in backend.futures] == [[1]]
        backend.finish(0)  # the thread returns at last: the backend is alive, its slot free
        await until(lambda: len(seen) == 2)
        assert seen[-1] == BackendHealth()
        answer = spawn(batcher, [4])
        await until(lambda: len(backend.futures) == 2)
        backend.finish(1)
        np.testing.assert_array_equal(await answer, expected([4], 1))
        assert before.delta("backend_duration_seconds_count", backend="fake", outcome="error") == 1
        await batcher.close()

    run(main)


def test_timeouts_of_cancellable_calls_make_the_backend_not_ready_until_a_batch_succeeds() -> None:
    """A cancelled call ends at once (nothing is stuck, so liveness stays), but that is no sign of life."""

    async def main() -> None:
        backend = FakeBackend(delay_s=1.0)
        batcher, _, seen = make_with_health(backend, max_concurrent_batches=1, backend_timeout_ms=50,
                                            wedged_after_timeouts=2)  # fmt: skip
        for ids in ([1], [2]):
            with pytest.raises(BackendError):
                await batcher.submit(images_for(ids), 1)
        await until(lambda: backend.cancelled == 2)
        assert seen == [BackendHealth(False, True, "2 consecutive backend timeouts (backend_timeout_ms=50)")]
        backend.delay_s = 0.0
        np.testing.assert_array_equal(await batcher.submit(images_for([3]), 1), expected([3], 1))
        assert seen[-1] == BackendHealth() and len(seen) == 2
        await batcher.close()

    run(main)


def test_a_batch_whose_callers_all_left_has_its_backend_call_cancelled() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event(), gate_calls=2)
        batcher, metrics = make(backend, max_concurrent_batches=1)
        before = Snapshot(metrics)
        a = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        b = spawn(batcher, [2])
        await until(lambda: batcher.queued_drawings == 1)
        a.cancel()  # the only caller of the batch in flight
        await until(lambda: backend.cancelled == 1)
        await until(lambda: len(backend.calls) == 2)  # the slot came back: b's batch runs
        assert before.delta("backend_duration_seconds_count", backend="fake", outcome="cancelled") == 1
        c = spawn(batcher, [3])
        await until(lambda: batcher.queued_drawings == 1)
        b.cancel()  # b's batch in flight: cancelled too
        await until(lambda: backend.cancelled == 2)
        np.testing.assert_array_equal(await c, expected([3], 1))
        assert before.delta("backend_duration_seconds_count", backend="fake", outcome="cancelled") == 2
        # A batch keeps running while one of its callers still waits.
        backend.gate, backend.gate_calls = asyncio.Event(), len(backend.calls) + 1
        first = spawn(batcher, [4])
        await until(lambda: len(backend.calls) == 4)
        d, e = spawn(batcher, [5]), spawn(batcher, [6])
        await until(lambda: batcher.queued_drawings == 2)
        backend.gate_calls += 1
        backend.gate.set()
        await first
        await until(lambda: len(backend.calls) == 5)  # [5, 6] in one batch, held at the gate
        backend.gate = asyncio.Event()
        d.cancel()
        await asyncio.sleep(0.01)
        assert backend.cancelled == 2
        backend.gate.set()
        np.testing.assert_array_equal(await e, expected([6], 1))
        await batcher.close()

    run(main)


def test_a_dead_collector_fails_queued_and_new_calls_at_once_and_reports_not_ready_nor_live() -> None:
    async def main() -> None:
        backend = FakeBackend()
        batcher, metrics, seen = make_with_health(backend)
        before = Snapshot(metrics)

        def broken_take() -> list[Any]:
            raise RuntimeError("boom")

        batcher._take = broken_take  # type: ignore[method-assign]
        reason = "the batcher's collector died (RuntimeError: boom)"
        message = f"{reason}; this replica cannot serve until it restarts, retry on another"
        t0 = now()
        with pytest.raises(Unavailable) as info:
            await batcher.submit(images_for([1]), 1)  # no deadline: it would have waited forever
        assert now() == t0
        assert_error(info.value, Unavailable, grpc.StatusCode.UNAVAILABLE, message)
        assert seen == [BackendHealth(False, False, reason)]
        with pytest.raises(Unavailable) as info:
            await batcher.submit(images_for([2]), 1)
        assert_error(info.value, Unavailable, grpc.StatusCode.UNAVAILABLE, message)
        assert before.delta("dropped_drawings_total", reason="unavailable") == 1
        assert backend.calls == []
        await batcher.close()  # closing a batcher whose collector died does not raise

    run(main)


def test_fail_reports_a_dead_backend_task_and_fails_queued_calls() -> None:
    async def main() -> None:
        backend = FakeBackend(gate=asyncio.Event())
        batcher, _, seen = make_with_health(backend, max_concurrent_batches=1)
        running = spawn(batcher, [1])
        await until(lambda: len(backend.calls) == 1)
        queued = spawn(batcher, [2])
        await until(lambda: batcher.queued_drawings == 1)
        batcher.fail("the embedded backend's version watcher", OSError("disk gone"))
        reason = "the embedded backend's version watcher died (OSError: disk gone)"
        assert seen == [BackendHealth(False, False, reason)]
        with pytest.raises(Unavailable) as info:
            await queued
        assert_error(info.value, Unavailable, grpc.StatusCode.UNAVAILABLE,
                     f"{reason}; this replica cannot serve until it restarts, retry on another")  # fmt: skip
        backend.gate.set()
        np.testing.assert_array_equal(await running, expected([1], 1))  # a batch in flight still gets its answer
        await batcher.close()

    run(main)
