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
CALLS = int(os.environ.get("BENCH_OVERHEAD_CALLS", "1000"))
WARMUP_CALLS = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def interleaved(targets: dict[str, str], calls: int) -> dict[str, np.ndarray]:
    """Latencies (s) of ``calls`` Predict calls to each target, alternating call by call."""
    import grpc

    from doodle.formats import open_bitmaps
    from service.protos import tfs
    from service.protos.tensors import from_numpy

    rows = np.asarray(open_bitmaps(SAMPLE / "numpy_bitmap" / "cat.npy")[:64]).reshape(-1, 1, 28, 28, 1)
    requests = []
    for row in rows:
        req = tfs.PredictRequest(output_filter=["probabilities"])
        req.model_spec.name = "quickdraw"
        req.inputs["image"].CopyFrom(from_numpy(row))
        requests.append(req)
    channels = {n: grpc.aio.insecure_channel(t) for n, t in targets.items()}
    out: dict[str, list[float]] = {n: [] for n in targets}
    try:
        stubs = {n: tfs.PredictionServiceStub(ch) for n, ch in channels.items()}
        for i in range(calls + WARMUP_CALLS):
            for n, stub in stubs.items():
                t0 = time.perf_counter()
                await stub.Predict(requests[i % len(requests)], timeout=10)
                if i >= WARMUP_CALLS:
                    out[n].append(time.perf_counter() - t0)
    finally:
        for ch in channels.values():
            await ch.close()
    return {n: np.array(v) for n, v in out.items()}


def run() -> list[str]:
    """Start the stand-in and a gateway on it; measure both, call by call."""
    port = _free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    standin = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), "--model_name", "quickdraw", "--model_base_path",
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
        lat = asyncio.run(interleaved({"direct": f"127.0.0.1:{port}", "gateway": target}, CALLS))
    finally:
        if gateway is not None:
            stop(gateway)
        standin.kill()
        standin.wait()
    direct, through = (float(np.median(lat[n])) * 1000 for n in ("direct", "gateway"))
    pairs = float(np.median(lat["gateway"] - lat["direct"])) * 1000
    for n in lat:
        print(f"  {n:<8} p50 {np.median(lat[n]) * 1000:6.2f} ms  p90 {np.percentile(lat[n], 90) * 1000:6.2f} ms  "
              f"p99 {np.percentile(lat[n], 99) * 1000:6.2f} ms", flush=True)
    return [
        f"gateway overhead at low load (1 caller, Predict of 1 bitmap): p50 {through:.2f} ms through the gateway "
        f"vs {direct:.2f} ms calling TF Serving (the stand-in) directly = +{through - direct:.2f} ms "
        f"(median per-call difference {pairs:+.2f} ms; {CALLS} calls each, interleaved; target <= 1 ms)"
    ]
