"""The gateway's own cost: one caller at low load, TF Serving called directly against through the gateway.

The TF Serving stand-in (tests/tfserving_standin.py: TF Serving's gRPC API over the real SavedModel) runs as
its own process, and a gateway process runs with ``--backend tfserving`` in front of it. ``quickdraw
loadtest``'s engine sends the same ``PredictionService/Predict`` call (one bitmap) to each, one caller, in
alternating short rounds; the difference in p50 is what the gateway adds: a gRPC hop, validation, the
batcher and the response. Median over rounds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_batching import start, stop

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
ROUNDS = 5
ROUND_S = float(os.environ.get("BENCH_OVERHEAD_ROUND_S", "2.0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run() -> list[str]:
    """Start the stand-in and a gateway on it; measure both, alternating."""
    from loadtest.engine import LoadConfig, run_load, summary
    from loadtest.sources import load_pool

    port = _free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    standin = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), "--model-base-path",
         str(ROOT / "models" / "quickdraw"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    gateway = None
    try:
        assert standin.stdout is not None
        for line in standin.stdout:
            if "tfserving stand-in:" in line:
                break
        gateway, target = start("--backend", "tfserving", "--tfserving-target", f"127.0.0.1:{port}")
        pool = load_pool([SAMPLE / "numpy_bitmap"], ["bitmap"], size=256)
        p50: dict[str, list[float]] = {"direct": [], "gateway": []}
        targets = {"direct": f"127.0.0.1:{port}", "gateway": target}
        for _ in range(ROUNDS):
            for name, t in targets.items():
                cfg = LoadConfig(t, api="tfserving", concurrency=1, duration_s=ROUND_S, warmup_s=0.3)
                p50[name].append(float(summary(asyncio.run(run_load(cfg, pool)))["p50_ms"]))  # type: ignore[arg-type]
                time.sleep(0.1)
    finally:
        if gateway is not None:
            stop(gateway)
        standin.kill()
        standin.wait()
    direct, through = float(np.median(p50["direct"])), float(np.median(p50["gateway"]))
    for name in targets:
        print(f"  {name:<8} p50 per round: " + ", ".join(f"{v:.2f}" for v in p50[name]) + " ms", flush=True)
    return [
        f"gateway overhead at low load (1 caller, Predict of 1 bitmap): p50 {through:.2f} ms through the gateway "
        f"vs {direct:.2f} ms calling TF Serving (the stand-in) directly = +{through - direct:.2f} ms "
        f"(median of {ROUNDS} alternating rounds; target <= 1 ms)"
    ]
