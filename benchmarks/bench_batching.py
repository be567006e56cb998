"""Dynamic batching on against off: throughput with 64 concurrent callers, and 1-caller latency.

Two gateways serve the shipped model on this machine at the same time, as ``quickdraw serve`` processes:
batching on (the defaults: ``max_batch_size=128``) and off (``max_batch_size=1``, every call its own backend
batch); everything else is equal, and admission control is off in both (it would shed the unbatched gateway's
load, which is another comparison). Failed calls are reported and not counted as throughput. A load
generator in this process (grpc.aio, one channel per gateway) sends single-drawing Classify calls.
Throughput: 64 callers in a closed loop against one gateway at a time, in alternating rounds (on, off, on,
off, ...), median per configuration. Latency: one caller alternating between the two gateways call by call,
so both see the same moment of this shared, noisy machine. Latencies go into HdrHistograms. The ratios are
what matter.
"""

from __future__ import annotations

import asyncio
import collections
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
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "12"))  # per configuration, split over the rounds
ROUNDS = 3
LATENCY_CALLS = 600
WARMUP_S = 1.0
#: Failed calls of every load, by code and message (printed with the count).
FAILURES: collections.Counter[str] = collections.Counter()


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
    from quickdraw_client.v1 import classifier_pb2 as pb
    from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

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
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    FAILURES[f"{exc.code().name}: {exc.details()}"[:160]] += 1
                    continue
                finally:
                    k += callers
                if now >= t_measure:
                    hist.record_value(max(1, int((time.perf_counter() - now) * 1e6)))
                    done += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return done / seconds, hist, errors


async def interleaved_latency(targets: dict[str, str], images: np.ndarray, calls: int,
                              top_k: int = 0) -> dict[str, HdrHistogram]:  # fmt: skip
    """One caller alternating between the gateways call by call, which one goes first alternating too, so both see
    the same machine conditions; microseconds."""
    from quickdraw_client.v1 import classifier_pb2 as pb
    from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

    hists = {name: HdrHistogram(1, 60_000_000, 3) for name in targets}
    channels = {name: grpc.aio.insecure_channel(t) for name, t in targets.items()}
    try:
        stubs = {name: pb_grpc.ClassifierStub(ch) for name, ch in channels.items()}
        for i in range(calls + 50):
            req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=images[i % len(images)].tobytes()))],
                                     top_k=top_k)  # fmt: skip
            for name in list(stubs)[:: 1 if i % 2 == 0 else -1]:
                stub = stubs[name]
                t0 = time.perf_counter()
                await stub.Classify(req, timeout=30)
                if i >= 50:  # the first calls warm the channels up
                    hists[name].record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
    finally:
        for ch in channels.values():
            await ch.close()
    return hists


def more_loads(target: str) -> dict[str, dict[str, object]]:
    """With ``quickdraw loadtest``'s engine, on the batching gateway: 64-drawing calls, and stream vs unary."""
    from loadtest.engine import LoadConfig, run_load, summary
    from loadtest.sources import load_pool

    pool = load_pool([SAMPLE / "numpy_bitmap"], ["bitmap"], size=512)
    seconds = DURATION_S / ROUNDS
    out = {}
    for name, cfg in {
        "batched64": LoadConfig(target, concurrency=4, drawings_per_call=64, duration_s=seconds, warmup_s=WARMUP_S),
        "unary": LoadConfig(target, concurrency=64, duration_s=seconds, warmup_s=WARMUP_S),
        "stream": LoadConfig(target, concurrency=64, stream=True, duration_s=seconds, warmup_s=WARMUP_S),
    }.items():
        out[name] = summary(asyncio.run(run_load(cfg, pool)))
    return out


def raw_model_rate(batch: int) -> float:
    """The shipped model in a fresh interpreter (no gateway running beside it): images/s at ``batch``."""
    code = f"import benchmarks.bench_model as m; m.BATCHES = ({batch},); print(m.measure()[{batch}])"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run() -> list[str]:
    """Both gateways up at once; throughput in alternating rounds, latency interleaved call by call."""
    from doodle.formats import open_bitmaps

    images = np.asarray(open_bitmaps(SAMPLE / "numpy_bitmap" / "cat.npy")[:256]).reshape(-1, 28, 28)
    # Admission (max_queue_wait_ms) is off in both: it would refuse most calls of the unbatched gateway (its
    # queue of 64 single-drawing batches is seconds of work), and this compares serving, not shedding.
    no_admission = ["--max-queue-wait-ms", "0"]
    configs = {"on": no_admission, "off": [*no_admission, "--max-batch-size", "1"]}
    procs, targets = {}, {}
    try:
        for name, args in configs.items():
            procs[name], targets[name] = start(*args)
        tput: dict[str, list[float]] = {name: [] for name in configs}
        hist64: dict[str, HdrHistogram] = {}
        for _ in range(ROUNDS):
            for name in configs:  # one gateway loaded at a time; the other idles
                rate, hist64[name], errors = asyncio.run(load(targets[name], 64, images, DURATION_S / ROUNDS))
                tput[name].append(rate)
                if errors:
                    print(f"  batching {name}: {errors} failed calls: {dict(FAILURES.most_common(3))}", flush=True)
                    FAILURES.clear()
        lat = asyncio.run(interleaved_latency(targets, images, LATENCY_CALLS))
        extra = more_loads(targets["on"])
    finally:
        for proc in procs.values():
            stop(proc)
    for name in configs:
        h64, h1 = hist64[name], lat[name]
        rounds = ", ".join(f"{t:.0f}" for t in tput[name])
        print(f"  batching {name:<3}: 64 callers {np.median(tput[name]):7.0f} calls/s (rounds: {rounds})  "
              f"p50 {h64.get_value_at_percentile(50) / 1000:6.1f} ms  "
              f"p99 {h64.get_value_at_percentile(99) / 1000:6.1f} ms"
              f" | 1 caller p50 {h1.get_value_at_percentile(50) / 1000:5.2f} ms  "
              f"p99 {h1.get_value_at_percentile(99) / 1000:5.2f} ms", flush=True)
    on_t, off_t = float(np.median(tput["on"])), float(np.median(tput["off"]))
    on_p50, off_p50 = (lat[n].get_value_at_percentile(50) / 1000 for n in ("on", "off"))
    raw64 = raw_model_rate(64)
    big, stream, unary = extra["batched64"], extra["stream"], extra["unary"]
    print(f"  64-drawing calls, 4 callers: {big['drawings_per_s']:.0f} drawings/s (p50 {big['p50_ms']:.1f} ms); "
          f"raw model at batch 64: {raw64:.0f} images/s", flush=True)
    print(f"  64 callers, ClassifyStream: {stream['throughput_calls_per_s']:.0f} calls/s "
          f"(p99 {stream['p99_ms']:.1f} ms); unary: {unary['throughput_calls_per_s']:.0f} calls/s "
          f"(p99 {unary['p99_ms']:.1f} ms)", flush=True)
    return [
        f"batched calls of 64 drawings: {big['drawings_per_s']:.0f} drawings/s through the gateway = "
        f"{big['drawings_per_s'] / raw64:.0%} of the raw model at batch 64 ({raw64:.0f}/s; target >= 70%)",
        f"streaming: 64 callers on ClassifyStream / unary Classify = "
        f"{stream['throughput_calls_per_s'] / unary['throughput_calls_per_s']:.2f}x throughput "
        f"({stream['throughput_calls_per_s']:.0f} vs {unary['throughput_calls_per_s']:.0f} calls/s)",
        f"batching: 64 concurrent callers, throughput on/off = {on_t / off_t:.2f}x "
        f"({on_t:.0f} vs {off_t:.0f} calls/s, median of {ROUNDS} alternating rounds; target >= 3x)",
        f"batching: 1 caller, p50 latency on/off = {on_p50 / off_p50:.2f} "
        f"({on_p50:.2f} vs {off_p50:.2f} ms, {LATENCY_CALLS} calls each, interleaved; target <= 1.1)",
    ]
