"""The Open Inference Protocol (KServe v2) against the gateway's own API: throughput of single-bitmap calls.

One gateway (``quickdraw serve``, the embedded backend, defaults but admission off) serves both APIs. ``quickdraw
loadtest``'s engine sends single-bitmap calls from 64 callers in a closed loop: ``--api v2`` (``ModelInfer``,
input ``image`` UINT8 [1, 28, 28, 1] in ``raw_input_contents``, output ``probabilities``) and ``--api quickdraw``
(``Classify`` of one bitmap, top 3), in alternating rounds (which API goes first alternates too), median per API.
The ratio is what matters (the acceptance of issue 17: within 10%).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np

from benchmarks.bench_batching import start, stop

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
DURATION_S = float(os.environ.get("BENCH_DURATION_S", "12"))  # per API, split over the rounds
ROUNDS = 3
CALLERS = 64
WARMUP_S = 1.0


def run() -> list[str]:
    """Start a gateway; load it with each API in alternating rounds."""
    from loadtest.engine import LoadConfig, run_load, summary
    from loadtest.sources import load_pool

    pool = load_pool([SAMPLE / "numpy_bitmap"], ["bitmap"], size=512)
    proc, target = start("--max-queue-wait-ms", "0")
    rates: dict[str, list[float]] = {"v2": [], "quickdraw": []}
    p99: dict[str, list[float]] = {"v2": [], "quickdraw": []}
    errors: dict[str, int] = {"v2": 0, "quickdraw": 0}
    try:
        for i in range(ROUNDS):
            for api in list(rates)[:: 1 if i % 2 == 0 else -1]:  # alternating which goes first
                cfg = LoadConfig(target, api=api, concurrency=CALLERS, duration_s=DURATION_S / ROUNDS,  # type: ignore[arg-type]
                                 warmup_s=WARMUP_S)  # fmt: skip
                s = summary(asyncio.run(run_load(cfg, pool)))
                rates[api].append(float(s["throughput_calls_per_s"]))  # type: ignore[arg-type]
                p99[api].append(float(s["p99_ms"]))  # type: ignore[arg-type]
                errors[api] += int(s["errors"])  # type: ignore[call-overload]
    finally:
        stop(proc)
    v2, custom = (float(np.median(rates[a])) for a in ("v2", "quickdraw"))
    for api in rates:
        print(f"  --api {api:<9}: {CALLERS} callers {np.median(rates[api]):7.0f} calls/s (rounds: "
              f"{', '.join(f'{r:.0f}' for r in rates[api])})  p99 {np.median(p99[api]):6.1f} ms  "
              f"errors {errors[api]}", flush=True)  # fmt: skip
    return [
        f"Open Inference Protocol: {CALLERS} callers of single bitmaps, --api v2 (ModelInfer) / --api quickdraw "
        f"(Classify) = {v2 / custom:.2f}x throughput ({v2:.0f} vs {custom:.0f} calls/s, median of {ROUNDS} "
        f"alternating rounds; target within 10%: 0.90..1.10)"
    ]
