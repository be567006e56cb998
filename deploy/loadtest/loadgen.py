"""In-cluster load generator for the gateway: closed-loop gRPC callers in steps of rising concurrency.

Runs in the gateway image (it needs only grpc, numpy, hdrhistogram and the generated quickdraw.v1 code), as
the Job in deploy/loadtest/job.yaml or from a shell:

    python loadgen.py --target dns:///quickdraw-gateway-headless.quickdraw.svc.cluster.local:50051 \
        --steps 8,16,32,64,128 --step-s 120 --drawings 1

Each step runs ``callers`` coroutines on one channel, each sending a Classify call, waiting for the answer,
and sending the next (a closed loop), for ``step-s`` seconds, and prints one JSON line: concurrency, calls/s,
drawings/s, latency p50/p90/p99/max in ms, and errors by status code. With a ``dns:///`` target on a headless
Service the channel balances each call over every gateway pod (round_robin); with the ClusterIP Service it
exercises what ordinary clients get (one connection, rebalanced by the gateway's max connection age).
Raising the steps past the gateway HPA's target (16 in flight per pod) shows the autoscaler at work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from quickdraw.v1 import classifier_pb2 as pb
from quickdraw.v1 import classifier_pb2_grpc as pb_grpc


@dataclass
class StepResult:
    """What one step of constant concurrency measured."""

    callers: int
    seconds: float
    calls: int = 0
    calls_per_s: float = 0.0
    drawings_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def requests(n_requests: int, drawings: int, seed: int = 0) -> list[pb.ClassifyRequest]:
    """Random 28x28 bitmaps: the gateway's cost does not depend on what the pixels show."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n_requests, drawings, 28 * 28), dtype=np.uint8)
    return [
        pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=p.tobytes())) for p in call], top_k=3)
        for call in pixels
    ]


async def step(
    stub: pb_grpc.ClassifierStub, reqs: list[pb.ClassifyRequest], callers: int, seconds: float, timeout_s: float
) -> StepResult:
    """``callers`` closed-loop callers for ``seconds``."""
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    errors: Counter[str] = Counter()
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()

    async def caller(i: int) -> None:
        k = i
        while (now := time.perf_counter()) < t_end:
            try:
                await stub.Classify(reqs[k % len(reqs)], timeout=timeout_s)
                hist.record_value(max(1, int((time.perf_counter() - now) * 1e6)))
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1
            k += callers

    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - t0
    calls = hist.get_total_count()
    per_call = len(reqs[0].drawings)
    return StepResult(
        callers=callers, seconds=round(elapsed, 3), calls=calls, calls_per_s=round(calls / elapsed, 1),
        drawings_per_s=round(calls * per_call / elapsed, 1),
        p50_ms=hist.get_value_at_percentile(50) / 1e3, p90_ms=hist.get_value_at_percentile(90) / 1e3,
        p99_ms=hist.get_value_at_percentile(99) / 1e3, max_ms=hist.get_max_value() / 1e3, errors=dict(errors),
    )  # fmt: skip


async def run(
    target: str, steps: Sequence[int], step_s: float, drawings: int = 1, timeout_s: float = 10.0
) -> list[StepResult]:
    """Every step in turn on one round_robin channel; prints each result as a JSON line as it finishes."""
    options = [("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 0)]
    reqs = requests(64, drawings)
    out = []
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, wait_for_ready=True)
        for callers in steps:
            result = await step(stub, reqs, callers, step_s, timeout_s)
            print(json.dumps(asdict(result)), flush=True)
            out.append(result)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the steps; exit 1 if any call failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="dns:///quickdraw-gateway-headless.quickdraw.svc.cluster.local:50051")
    p.add_argument("--steps", default="8,16,32,64", help="concurrent callers in each step, comma-separated")
    p.add_argument("--step-s", type=float, default=60.0, help="seconds per step")
    p.add_argument("--drawings", type=int, default=1, help="drawings per Classify call")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s]
    results = asyncio.run(run(args.target, steps, args.step_s, args.drawings, args.timeout_s))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
