"""Strokes rendered in worker processes (``stroke_render_workers=2``, the default) against on the threads (0).

Two gateways (``quickdraw serve``, the embedded backend, admission off), one per setting, are started side by side
and loaded in alternating rounds (which goes first alternates too), so that both meet the same machine:

- *real drawings*: ``quickdraw loadtest``'s engine, 8 callers in a closed loop, 16 real drawings a call (the
  sample's raw and simplified strokes, as ``--input-kind strokes`` sends them); throughput and p99, median of the
  rounds;
- *the largest legal raw request* (256 drawings x 256 raw strokes of 2 points, 1.4 MB, as tests/test_loop.py
  sends): one call per round, its latency and the worst ``grpc.health.v1`` check answered meanwhile (a probe
  asking every 10 ms), which is what the workers are for.

The ratios (workers / threads) are what matter: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.bench_batching import start, stop

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "12"))  # per setting, split over the rounds
ROUNDS = 3
CALLERS = 8
DRAWINGS_PER_CALL = 16
WARMUP_S = 1.0
HEALTH_EVERY_S = 0.010
SETTINGS = {"workers": "2", "threads": "0"}  # stroke_render_workers


def largest_raw_request() -> object:
    """256 drawings x 256 RAW strokes of 2 points: 1.4 MB, within every default limit (tests/test_loop.py's)."""
    from quickdraw_client.v1 import classifier_pb2 as pb

    req = pb.ClassifyRequest()
    for d in range(256):
        dr = req.drawings.add()
        dr.strokes.coordinates = pb.Strokes.RAW
        for s in range(256):
            st = dr.strokes.strokes.add()
            st.x.extend([float(s), float(s + 3)])
            st.y.extend([float(d), float(d + 5)])
    return req


def heavy_call(target: str, req: object) -> tuple[float, float, int]:
    """One largest-raw call; returns (its seconds, the worst health wait in seconds, health checks made)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

    worst, checks, done = 0.0, 0, threading.Event()

    def probe() -> None:
        nonlocal worst, checks
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not done.is_set():
                t0 = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                worst, checks = max(worst, time.perf_counter() - t0), checks + 1
                time.sleep(HEALTH_EVERY_S)

    prober = threading.Thread(target=probe, daemon=True)
    opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(target, options=opts) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        prober.start()
        time.sleep(0.2)
        t0 = time.perf_counter()
        stub.Classify(req, timeout=120)
        took = time.perf_counter() - t0
        done.set()
    prober.join(15)
    return took, worst, checks


def run() -> list[str]:
    """Start both gateways; load them in alternating rounds."""
    from loadtest.engine import LoadConfig, run_load, summary
    from loadtest.sources import load_pool

    pool = load_pool([SAMPLE / "simplified", SAMPLE / "raw"], ["strokes"], size=512)
    heavy = largest_raw_request()
    gateways = {name: start("--max-queue-wait-ms", "0", "--stroke-render-workers", n) for name, n in SETTINGS.items()}
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    p99: dict[str, list[float]] = {name: [] for name in SETTINGS}
    errors = dict.fromkeys(SETTINGS, 0)
    heavy_s: dict[str, list[float]] = {name: [] for name in SETTINGS}
    health: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        for i in range(ROUNDS):
            for name in list(SETTINGS)[:: 1 if i % 2 == 0 else -1]:
                target = gateways[name][1]
                cfg = LoadConfig(target, concurrency=CALLERS, duration_s=DURATION_S / ROUNDS, warmup_s=WARMUP_S,
                                 drawings_per_call=DRAWINGS_PER_CALL, timeout_s=30.0)  # fmt: skip
                s = summary(asyncio.run(run_load(cfg, pool)))
                rates[name].append(float(s["throughput_calls_per_s"]))  # type: ignore[arg-type]
                p99[name].append(float(s["p99_ms"]))  # type: ignore[arg-type]
                errors[name] += int(s["errors"])  # type: ignore[call-overload]
                took, worst, checks = heavy_call(target, heavy)
                heavy_s[name].append(took)
                health[name].append(worst)
                print(f"  round {i + 1} {name:<7}: {rates[name][-1]:6.1f} calls/s of {DRAWINGS_PER_CALL} drawings, "
                      f"largest raw call {took:5.2f} s, health worst {worst * 1000:6.1f} ms over {checks} checks",
                      flush=True)  # fmt: skip
    finally:
        for proc, _ in gateways.values():
            stop(proc)
    med = {k: {n: float(np.median(v[n])) for n in SETTINGS} for k, v in
           (("rate", rates), ("p99", p99), ("heavy", heavy_s), ("health", health))}  # fmt: skip
    for name in SETTINGS:
        print(f"  stroke_render_workers={SETTINGS[name]} ({name}): {med['rate'][name]:6.1f} calls/s  "
              f"p99 {med['p99'][name]:6.1f} ms  errors {errors[name]}  largest raw call {med['heavy'][name]:.2f} s  "
              f"health worst {med['health'][name] * 1000:.1f} ms", flush=True)  # fmt: skip
    w, t = "workers", "threads"
    return [
        f"Strokes in worker processes / on the preprocessing threads: {med['rate'][w] / med['rate'][t]:.2f}x "
        f"throughput of {CALLERS} callers x {DRAWINGS_PER_CALL} real drawings ({med['rate'][w]:.1f} vs "
        f"{med['rate'][t]:.1f} calls/s), p99 {med['p99'][w] / med['p99'][t]:.2f}x; the largest legal raw call "
        f"{med['heavy'][w] / med['heavy'][t]:.2f}x the time ({med['heavy'][w]:.2f} vs {med['heavy'][t]:.2f} s) "
        f"with health's worst wait {med['health'][w] / med['health'][t]:.2f}x ({med['health'][w] * 1000:.0f} vs "
        f"{med['health'][t] * 1000:.0f} ms); median of {ROUNDS} alternating rounds"
    ]
