"""Health follows the backend, in a real gateway (in-process, ``tests/harness.RunningGateway``).

- A backend whose batches never return (a wedged TensorFlow thread): each call gets INTERNAL at
  ``backend_timeout_ms``; after ``backend_wedged_after_timeouts`` timeouts readiness is NOT_SERVING, and liveness
  too while the thread has not returned, and calls are refused with UNAVAILABLE; when it returns, both are
  SERVING again and calls are answered.
- A collector that dies: health NOT_SERVING (readiness and liveness), calls UNAVAILABLE at once naming it.
- Embedded hot reload follows a rollback: version 2's directory deleted, serving moves back to 1 and a call pinned
  to 2 gets NOT_FOUND.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from faults import bitmaps
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import SHIPPED_MODEL, RunningGateway

from service.app import LIVENESS_SERVICE
from service.backends import find_versions
from service.backends.embedded import EmbeddedBackend
from service.client import QuickDrawClient
from service.core.errors import NotFound
from service.frontends.grpc.classifier import SERVICE_NAME
from service.settings import Settings

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}"),
]

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
BITMAP = np.zeros((28, 28), np.uint8)
#: A cat from the sample that the shipped model calls a cat (its first such drawing; a square without the sample).
CAT = np.frombuffer(bitmaps(1)[0], np.uint8).reshape(28, 28)


class WedgeableBackend(EmbeddedBackend):
    """The real embedded backend (the shipped SavedModel, TensorFlow on its own threads), with a gate: while
    ``unwedged`` is clear, each batch's thread blocks before it runs, as a stuck TensorFlow run does."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.model_dir, settings.model_name, max_batch_size=settings.max_batch_size,
                         concurrency=settings.max_concurrent_batches, warmup=False)  # fmt: skip
        self.unwedged = threading.Event()
        self.unwedged.set()
        self.batches = 0

    def _run(self, images, version):  # type: ignore[no-untyped-def]
        self.batches += 1
        self.unwedged.wait()
        return super()._run(images, version)

    async def close(self) -> None:
        self.unwedged.set()
        await super().close()


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def statuses(target: str) -> tuple[int, int, int]:
    return health(target, ""), health(target, SERVICE_NAME), health(target, LIVENESS_SERVICE)


def classify_error(client: QuickDrawClient, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        client.classify([BITMAP], timeout_s=10, **kw)  # type: ignore[arg-type]
    return info.value


def test_a_wedged_backend_turns_readiness_then_liveness_not_serving_and_both_come_back() -> None:
    backend: list[WedgeableBackend] = []

    def factory(settings: Settings) -> WedgeableBackend:
        backend.append(WedgeableBackend(settings))
        return backend[0]

    settings = {"backend_timeout_ms": 300, "backend_wedged_after_timeouts": 3, "max_queue_wait_ms": 0, "warmup": False}
    with RunningGateway(backend_factory=factory, **settings) as gw, QuickDrawClient(gw.target, max_attempts=1) as c:
        assert statuses(gw.target) == (SERVING, SERVING, SERVING)
        [answer] = c.classify([CAT], timeout_s=10)  # type: ignore[list-item]
        assert answer.model_version == 1 and answer.top[0][0] == "cat", answer  # the real model answered
        backend[0].unwedged.clear()
        t0 = time.monotonic()
        err = classify_error(c)
        assert err.code() == grpc.StatusCode.INTERNAL
        assert err.details() == "backend batch of 1 timed out after backend_timeout_ms=300"
        assert time.monotonic() - t0 < 5  # answered at the timeout, not when the thread returns
        # The thread holds the only slot; it counts a timeout again every 300 ms: the third makes it wedged.
        eventually(lambda: statuses(gw.target) == (NOT_SERVING, NOT_SERVING, NOT_SERVING))
        err = classify_error(c)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert err.details() == ("the backend is wedged: every backend slot (1) holds a batch that timed out after "
                                 "backend_timeout_ms=300 and has not returned; retry on another replica")  # fmt: skip
        assert backend[0].batches == 2  # the refused call never reached the backend
        time.sleep(1.0)
        assert statuses(gw.target) == (NOT_SERVING, NOT_SERVING, NOT_SERVING)  # still wedged, still saying so
        backend[0].unwedged.set()  # the thread returns
        eventually(lambda: statuses(gw.target) == (SERVING, SERVING, SERVING))
        [again] = c.classify([CAT], timeout_s=10)  # type: ignore[list-item]
        assert again.top == answer.top and again.model_version == 1, again


def test_a_dead_collector_turns_health_not_serving_and_calls_fail_fast() -> None:
    with RunningGateway(backend_factory=WedgeableBackend, warmup=False) as gw, QuickDrawClient(
        gw.target, max_attempts=1
    ) as c:  # fmt: skip
        assert statuses(gw.target) == (SERVING, SERVING, SERVING)
        batcher = gw.app._batcher
        assert batcher is not None

        def broken_take() -> list[object]:
            raise RuntimeError("boom")

        batcher._take = broken_take  # type: ignore[method-assign]
        message = ("the batcher's collector died (RuntimeError: boom); this replica cannot serve until it restarts, "
                   "retry on another")  # fmt: skip
        t0 = time.monotonic()
        err = classify_error(c)  # no deadline would save it: without supervision it waits for its 10 s timeout
        assert time.monotonic() - t0 < 5
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, message)
        eventually(lambda: statuses(gw.target) == (NOT_SERVING, NOT_SERVING, NOT_SERVING))
        err = classify_error(c)
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, message)


def test_embedded_hot_reload_follows_a_rollback(tmp_path: Path) -> None:
    shipped = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    base = tmp_path / "quickdraw"
    for v in ("1", "2"):
        shutil.copytree(shipped, base / v)
    with RunningGateway(model_dir=base, model_watch_s=0.2, model_retire_s=60, warmup=False) as gw, QuickDrawClient(
        gw.target, max_attempts=1
    ) as c:  # fmt: skip
        assert c.model_info().versions == [2]
        assert c.classify([BITMAP], timeout_s=30)[0].model_version == 2  # type: ignore[list-item]
        shutil.rmtree(base / "2")  # a rollback
        eventually(lambda: list(c.model_info().versions) == [1], timeout_s=60)
        assert c.classify([BITMAP], timeout_s=30)[0].model_version == 1  # type: ignore[list-item]
        err = classify_error(c, version=2)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "model 'quickdraw' version 2 is not served; versions: 1"
        assert statuses(gw.target) == (SERVING, SERVING, SERVING)
        # A batch already queued for the version rolled back from, once it is unloaded: NOT_FOUND, not INTERNAL.
        backend = gw.app._backend
        assert isinstance(backend, EmbeddedBackend)

        async def pinned_to_2_after_retirement() -> object:
            backend._retire([2])  # what model_retire_s later does
            return await backend.predict(np.zeros((1, 28, 28, 1), np.uint8), 2)

        with pytest.raises(NotFound) as info:
            gw.call(pinned_to_2_after_retirement())
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.message == "model 'quickdraw' version 2 is no longer served (retired); versions: 1"
