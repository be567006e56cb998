"""``quickdraw serve`` as a process: it prints where it listens, and on SIGTERM it drains and exits 0.

Order checked: health turns NOT_SERVING (seen on a Watch stream opened before the signal), new calls are
refused, in-flight calls still get their answers, and the process exits 0 within the grace period. A signal
during start (the model loading, TF Serving awaited) stops the process at once, and the HTTP API stops
accepting before the batcher closes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from faults import Gateway, Process, free_port, start_standin
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import SHIPPED_MODEL, RunningGateway

from service.backends import find_versions
from service.backends.embedded import EmbeddedBackend
from service.client import QuickDrawClient
from service.settings import Settings

pytestmark = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")


def start_server(*extra: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``quickdraw serve`` on the shipped model (tests/faults.Gateway): its process, target and output lines."""
    gw = Gateway("--model-dir", str(SHIPPED_MODEL), *extra)
    return gw.proc, gw.target, gw.lines


@pytest.fixture()
def server() -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    proc, target, lines = start_server("--no-warmup", "--shutdown-grace-s", "20", "--preprocess-threads", "1")
    try:
        yield proc, target, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def raw_scribbles(n: int, points: int = 400, seed: int = 0) -> list[list[list[list[float]]]]:
    """Raw-coordinate drawings heavy enough to keep the gateway busy for a while."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        xy = np.cumsum(rng.normal(0, 20, size=(2, points)), axis=1) + 500
        out.append([[xy[0].tolist(), xy[1].tolist()]])
    return out


def test_prints_where_it_listens_and_an_example(server: tuple[subprocess.Popen[str], str, list[str]]) -> None:
    _, target, lines = server
    deadline = time.monotonic() + 10
    while not any("try: " in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = "".join(lines)
    assert "metrics on http://127.0.0.1:" in text
    assert f"quickdraw classify --target {target}" in text  # (.venv/bin/)quickdraw
    with QuickDrawClient(target) as c:
        assert c.model_info().name == "quickdraw"


def test_sigterm_drains_in_flight_calls_and_exits_zero(server: tuple[subprocess.Popen[str], str, list[str]]) -> None:
    proc, target, lines = server
    with grpc.insecure_channel(target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with QuickDrawClient(target, timeout_s=60) as c, ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(c.classify, raw_scribbles(64, seed=i), raw=True) for i in range(6)]
            time.sleep(0.5)  # the calls are in flight: each takes the server a while to render
            assert not all(f.done() for f in calls), "calls finished before the signal; make them heavier"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(0.2)
            with QuickDrawClient(target, max_attempts=1) as late, pytest.raises(grpc.RpcError) as info:
                late.classify([np.zeros((28, 28), np.uint8)], timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            results = [f.result(60) for f in calls]
    assert [len(r) for r in results] == [64] * 6  # every in-flight call got its answer
    assert proc.wait(30) == 0, "".join(lines[-20:])
    assert time.monotonic() - t0 < 20
    assert any("stopped" in line for line in lines)


def test_bad_setting_is_refused_with_the_option_name() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "quickdraw", "serve", "--max-batch-size", "0"],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--max-batch-size" in proc.stderr and "greater than or equal to 1" in proc.stderr


def test_settings_come_from_the_environment_and_options_win() -> None:
    from service.settings import Settings

    env = {"QUICKDRAW_MAX_BATCH_SIZE": "64", "QUICKDRAW_GRPC_PORT": "6000"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s = Settings(grpc_port=7000)
        assert s.max_batch_size == 64 and s.grpc_port == 7000
        assert Settings().grpc_port == 6000
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert Settings().grpc_port == 50051 and Settings().http_port == 8080
    assert Path(Settings().model_dir) == Path("models/quickdraw")


def test_serve_with_tfserving_backend_against_the_standin_process(tmp_path: Path) -> None:
    """``quickdraw serve --backend tfserving --tfserving-target HOST:PORT``, with the stand-in as its own process."""
    port = free_port()
    standin = start_standin(port)
    try:
        proc, target, lines = start_server("--backend", "tfserving", "--tfserving-target", f"127.0.0.1:{port}")
        try:
            sample = Path(__file__).resolve().parents[2] / "shared" / "quickdraw" / "numpy_bitmap" / "cat.npy"
            bitmaps = np.load(sample, mmap_mode="r")[:5] if sample.exists() else np.zeros((5, 784), np.uint8)
            with QuickDrawClient(target, timeout_s=30) as client:
                assert client.model_info().backend == "tfserving"
                results = client.classify(list(bitmaps))
            assert len(results) == 5
            if sample.exists():
                assert sum(r.top[0][0] == "cat" for r in results) >= 4
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, "".join(lines[-30:])
    finally:
        standin.kill()


def _sigterm_during_start(*args: str, when: str) -> tuple[float, int, str]:
    """Start ``quickdraw serve`` with ``args``, SIGTERM it once it prints ``when`` (start not finished): returns
    (seconds from the signal to its exit, exit code, its output)."""
    proc = Process([sys.executable, "-m", "quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
                    "--http-port", "0", *args], ready=when)  # fmt: skip
    try:
        assert "ready: gRPC on" not in proc.output(), "start finished before the signal: the test proves nothing"
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = proc.proc.wait(30)
        return time.monotonic() - t0, code, proc.output()
    finally:
        proc.kill()


def test_sigterm_while_the_model_loads_exits_zero_at_once() -> None:
    """The model loads in a thread that cannot be interrupted: the process leaves without waiting for it."""
    took, code, out = _sigterm_during_start("--model-dir", str(SHIPPED_MODEL), when=r"NOT_SERVING while the model")
    print(f"\nSIGTERM while the model loads: exit {code} after {took:.2f} s")
    assert code == 0, out[-2000:]
    assert took < 2.0, out[-2000:]
    assert "signal received while starting" in out


def test_sigterm_while_waiting_for_tfserving_exits_zero_at_once() -> None:
    took, code, out = _sigterm_during_start("--backend", "tfserving", "--tfserving-target",
                                            f"127.0.0.1:{free_port()}", when=r"waiting for TF Serving")  # fmt: skip
    print(f"\nSIGTERM while TF Serving is awaited: exit {code} after {took:.2f} s")
    assert code == 0, out[-2000:]
    assert took < 2.0, out[-2000:]


class _GatedBackend(EmbeddedBackend):
    """The embedded backend with its batches held until the test opens ``gate``; ``batches`` counts them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.model_dir, settings.model_name, max_batch_size=settings.max_batch_size,
                         concurrency=1, warmup=False)  # fmt: skip
        self.gate = threading.Event()
        self.batches: list[int] = []

    def _run(self, images, version):  # type: ignore[no-untyped-def]
        self.gate.wait(60)
        self.batches.append(len(images))
        return super()._run(images, version)


def _post_bitmap(port: int) -> int:
    body = json.dumps({"drawings": [{"bitmap": {"pixels": base64.b64encode(bytes(784)).decode()}}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        return int(resp.status)


def test_http_stops_accepting_before_the_batcher_closes_and_its_calls_finish() -> None:
    made: list[_GatedBackend] = []

    def factory(settings: Settings) -> _GatedBackend:
        made.append(_GatedBackend(settings))
        return made[-1]

    gw = RunningGateway(factory, shutdown_grace_s=10, warmup=False)
    with gw, ThreadPoolExecutor(1) as pool:
        port = gw.app.http_port
        held = pool.submit(_post_bitmap, port)  # reaches the backend and is held there
        while not gw.app.metrics.batches_in_flight:
            time.sleep(0.01)
        stopping = asyncio.run_coroutine_threadsafe(gw.app.stop(), gw.loop)
        time.sleep(0.3)
        with pytest.raises(urllib.error.URLError) as info:  # not a 503 from a closed batcher: nobody listens
            _post_bitmap(port)
        assert isinstance(info.value.reason, ConnectionRefusedError), info.value
        assert not stopping.done(), "stop must wait for the HTTP call in flight"
        made[0].gate.set()
        assert held.result(30) == 200  # the call in flight was answered by the batcher, still open for it
        stopping.result(30)
    assert made[0].batches == [1]
    assert gw.app.left_behind == []
