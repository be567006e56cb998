"""Dynamic batching on against off: throughput with 64 concurrent callers, and 1-caller latency.

Two gateways run the shipped model one after the other on this machine, as ``quickdraw serve`` processes:
batching on (the defaults: ``max_batch_size=128``) and off (``max_batch_size=1``, every call its own backend
batch); everything else is equal. A load generator in this process (grpc.aio, one channel) sends
single-drawing Classify calls: 64 callers in a closed loop, then 1 caller. Latencies go into an HdrHistogram.
The ratios are what matter: both sides ran in the same run on the same (shared, noisy) machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "8"))
WARMUP_S = 1.5


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    """A ``quickdraw serve`` process on free ports; returns it and its gRPC target."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"ready: gRPC on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
    raise RuntimeError(f"gateway did not start (exit {proc.wait()})")


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM and wait."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(target: str, callers: int, images: np.ndarray, seconds: float) -> tuple[float, HdrHistogram, int]:
    """Closed-loop load: ``callers`` coroutines each sending one drawing at a time. Returns (calls/s, hist, errors)."""
    from quickdraw.v1 import classifier_pb2 as pb
    from quickdraw.v1 import classifier_pb2_grpc as pb_grpc

    requests = [pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=im.tobytes()))], top_k=3)
                for im in images]
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        t_start = time.perf_counter()
        t_measure = t_start + WARMUP_S
        t_end = t_measure + seconds
        done = 0

        async def caller(i: int) -> None:
            nonlocal done, errors
            k = i
            while (now := time.perf_counter()) < t_end:
                try:
                    await stub.Classify(requests[k % len(requests)], timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                finally:
                    k += callers
                if now >= t_measure:
                    hist.record_value(max(1, int((time.perf_counter() - now) * 1e6)))
                    done += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return done / seconds, hist, errors


def measure(args: list[str], images: np.ndarray) -> dict[str, float]:
    """Throughput at 64 callers and latency at 1 caller for one gateway configuration."""
    proc, target = start(*args)
    try:
        tput, hist64, err64 = asyncio.run(load(target, 64, images, DURATION_S))
        _, hist1, err1 = asyncio.run(load(target, 1, images, DURATION_S / 2))
    finally:
        stop(proc)
    return {
        "throughput": tput,
        "p50_64_ms": hist64.get_value_at_percentile(50) / 1000,
        "p99_64_ms": hist64.get_value_at_percentile(99) / 1000,
        "p50_1_ms": hist1.get_value_at_percentile(50) / 1000,
        "p99_1_ms": hist1.get_value_at_percentile(99) / 1000,
        "errors": err64 + err1,
    }


def run() -> list[str]:
    """Measure both configurations and return the summary lines."""
    from doodle.formats import open_bitmaps

    images = np.asarray(open_bitmaps(SAMPLE / "numpy_bitmap" / "cat.npy")[:256]).reshape(-1, 28, 28)
    results = {}
    for name, args in (("on", []), ("off", ["--max-batch-size", "1"])):
        results[name] = r = measure(args, images)
        print(f"  batching {name:<3}: 64 callers {r['throughput']:7.0f} calls/s  p50 {r['p50_64_ms']:6.2f} ms  "
              f"p99 {r['p99_64_ms']:6.2f} ms | 1 caller p50 {r['p50_1_ms']:5.2f} ms  p99 {r['p99_1_ms']:5.2f} ms"
              f" | errors {r['errors']:.0f}", flush=True)
    on, off = results["on"], results["off"]
    return [
        f"batching: 64 concurrent callers, throughput on/off = {on['throughput'] / off['throughput']:.2f}x "
        f"({on['throughput']:.0f} vs {off['throughput']:.0f} calls/s; target >= 3x)",
        f"batching: 1 caller, p50 latency on/off = {on['p50_1_ms'] / off['p50_1_ms']:.2f} "
        f"({on['p50_1_ms']:.2f} vs {off['p50_1_ms']:.2f} ms; target <= 1.1)",
    ]
