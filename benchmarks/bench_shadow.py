"""Shadow comparison on every call against none: callers' latency, and OK answers under 5x overload.

Two gateways (``quickdraw serve --backend tfserving``), each in front of its own TF Serving stand-in process
(tests/tfserving_standin.py) serving versions 1 and 2 (the shipped model, twice). Both send versionless calls to
version 1 (``--canary-split 1=100``); the second also shadows every call to version 2 (``--shadow-version 2
--shadow-fraction 1``). Measured in the same run:

- **latency**: one caller alternating between the two gateways call by call, which goes first alternating too (both
  see the same machine), p50 and p99 of each, and their ratio (target: within 10%);
- **overload**: the stand-ins restarted on the same ports as a slow accelerator (``--standin_delay_ms`` 100 per model
  call; gateways at batch size 8, one batch at a time), so that 5x the capacity is a rate one Python client can
  offer; the capacity of the gateway without shadow (closed loop, 32 callers), then open-loop load at 5x that rate
  with a 1 s deadline per call, on each gateway in alternating rounds: the ratio of OK answers (target: at least
  0.95), and the shadow work the gateway dropped meanwhile, by reason, from its metrics.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from benchmarks.bench_batching import interleaved_latency, load

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
LATENCY_CALLS = int(os.environ.get("BENCH_SHADOW_CALLS", "600"))
OVERLOAD_S = float(os.environ.get("BENCH_SHADOW_OVERLOAD_S", "6"))
ROUNDS = 2
#: The overload part's model call time (the stand-ins' --standin_delay_ms) and the gateways' batch size: a capacity
#: of MAX_BATCH / SLOW_MS per second that a Python client can offer 5x of.
SLOW_MS = 100.0
MAX_BATCH = 8


def drain(proc: subprocess.Popen[str]) -> None:
    """Read the process's output from now on in a thread, so a full pipe never blocks its logging."""
    assert proc.stdout is not None
    stream = proc.stdout
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


def free_port() -> int:
    """A TCP port free now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def standin(base: Path, workdir: Path, port: int, delay_ms: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    """A TF Serving stand-in process on ``port`` keeping both versions of ``base`` loaded, each model call taking at
    least ``delay_ms`` (a slow accelerator); (process, target)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from rehearsal_topology import model_config_text

    config = workdir / f"models-{len(list(workdir.iterdir()))}.config"
    config.write_text(model_config_text(base, 1))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), f"--port={port}",
         f"--model_config_file={config}", f"--standin_delay_ms={delay_ms:g}",
         "--allow_version_labels_for_unavailable_models=true"],  # `stable` names version 1 before it is loaded
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"tfserving stand-in: .* on 127\.0\.0\.1:(\d+)", line):
            drain(proc)
            return proc, f"127.0.0.1:{m.group(1)}"
    raise RuntimeError(f"stand-in did not start (exit {proc.wait()})")


def gateway(target: str, base: Path, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    """A gateway in front of ``target``: (process, gRPC target, metrics URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
         "--backend", "tfserving", "--tfserving-target", target, "--model-dir", str(base), "--no-http-api",
         "--canary-split", "1=100", "--max-batch-size", str(MAX_BATCH), "--max-concurrent-batches", "1",
         "--tfserving-reconnect-backoff-ms", "200", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"ready: gRPC on 127\.0\.0\.1:(\d+), metrics on (\S+)", line):
            drain(proc)
            return proc, f"127.0.0.1:{m.group(1)}", m.group(2)
    raise RuntimeError(f"gateway did not start (exit {proc.wait()})")


async def open_loop(target: str, images: np.ndarray, rate_per_s: float, seconds: float) -> Counter[str]:
    """Calls due at a fixed rate whatever happens, each with a 1 s deadline: their outcomes by code."""
    from quickdraw_client.v1 import classifier_pb2 as pb
    from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

    requests = [pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=im.tobytes()))], top_k=3)
                for im in images]  # fmt: skip
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def one(i: int) -> None:
            try:
                await stub.Classify(requests[i % len(requests)], timeout=1.0)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        tasks = []
        t0 = time.perf_counter()
        n = int(rate_per_s * seconds)
        for i in range(n):
            if (wait := t0 + i / rate_per_s - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return codes


def wait_serving(target: str, timeout_s: float = 120.0) -> None:
    """Until a Classify through ``target`` succeeds (its backend is back)."""
    from quickdraw_client.v1 import classifier_pb2 as pb
    from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(784)))])
    t0 = time.monotonic()
    with grpc.insecure_channel(target) as ch:
        while True:
            try:
                pb_grpc.ClassifierStub(ch).Classify(req, timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() - t0 > timeout_s:
                    raise
                time.sleep(0.5)


def dropped(metrics_url: str) -> dict[str, float]:
    """The gateway's dropped shadow work by reason, and what it compared."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^quickdraw_shadow_dropped_drawings_total\{reason="(\w+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    for m in re.finditer(r"^quickdraw_shadow_compared_drawings_total\{[^}]*\} (\S+)$", text, re.M):
        out["compared"] = out.get("compared", 0.0) + float(m.group(1))
    return out


def run() -> list[str]:
    """Start two stand-ins and two gateways; measure latency interleaved, then overload in alternating rounds."""
    from doodle.formats import open_bitmaps

    files = sorted((SAMPLE / "numpy_bitmap").glob("*.npy"))[:8]
    images = np.concatenate([np.asarray(open_bitmaps(f)[:64]) for f in files]).reshape(-1, 28, 28, 1)
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        work = Path(tmp)
        base = work / "models" / "quickdraw"
        base.mkdir(parents=True)
        for v in (1, 2):
            (base / str(v)).symlink_to((ROOT / "models" / "quickdraw" / "1").resolve(), target_is_directory=True)
        ports = [free_port(), free_port()]
        stand: list[subprocess.Popen[str]] = []
        gateways: list[subprocess.Popen[str]] = []
        try:
            (a, ta), (b, tb) = (standin(base, work, port) for port in ports)
            stand += [a, b]
            off, t_off, _ = gateway(ta, base)
            on, t_on, m_on = gateway(tb, base, "--shadow-version", "2", "--shadow-fraction", "1")
            gateways += [off, on]
            hists = asyncio.run(interleaved_latency({"off": t_off, "on": t_on}, images, LATENCY_CALLS, top_k=3))
            p50 = {k: h.get_value_at_percentile(50) / 1000 for k, h in hists.items()}
            p99 = {k: h.get_value_at_percentile(99) / 1000 for k, h in hists.items()}
            shadowed = dropped(m_on)
            # the overload part: the same gateways, their stand-ins restarted on the same ports as a slow accelerator
            for p in stand:
                p.terminate()
                p.wait(30)
            stand = [standin(base, work, port, SLOW_MS)[0] for port in ports]
            wait_serving(t_off)
            wait_serving(t_on)
            before = dropped(m_on)
            capacity, _, _ = asyncio.run(load(t_off, 32, images, 4.0))
            ok: dict[str, list[int]] = {"off": [], "on": []}
            for i in range(ROUNDS):
                for name in ("off", "on")[:: 1 if i % 2 == 0 else -1]:
                    codes = asyncio.run(open_loop(t_off if name == "off" else t_on, images, 5 * capacity, OVERLOAD_S))
                    ok[name].append(codes["OK"])
                    print(f"  overload round {i + 1}, shadow {name}: {dict(codes)}", flush=True)
            after = dropped(m_on)
            after = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        finally:
            procs = [*gateways, *stand]
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    drops = {k: v for k, v in shadowed.items() if k != "compared"}
    print(f"  latency, one caller alternating ({LATENCY_CALLS} calls each): shadow off p50 {p50['off']:.2f} ms "
          f"p99 {p99['off']:.2f} ms; shadow on p50 {p50['on']:.2f} ms p99 {p99['on']:.2f} ms; "
          f"compared {shadowed.get('compared', 0):.0f}, dropped {drops}")  # fmt: skip
    print(f"  capacity without shadow: {capacity:.0f} calls/s; overload at {5 * capacity:.0f} calls/s for "
          f"{OVERLOAD_S:g} s: OK off {ok['off']}, on {ok['on']}; shadow work under overload: {after}")  # fmt: skip
    ratio_ok = sum(ok["on"]) / max(1, sum(ok["off"]))
    return [
        f"Shadow on every call / off, one caller alternating: p50 {p50['on'] / p50['off']:.2f}x, p99 "
        f"{p99['on'] / p99['off']:.2f}x ({p50['on']:.2f}/{p50['off']:.2f} ms, {p99['on']:.2f}/{p99['off']:.2f} ms; "
        f"target within 10%)",
        f"Shadow on / off under 5x overload ({5 * capacity:.0f} calls/s): OK answers {ratio_ok:.2f}x "
        f"({sum(ok['on'])} vs {sum(ok['off'])}; target >= 0.95); shadow work dropped under overload: "
        f"{ {k: round(v) for k, v in after.items() if k != 'compared'} }, compared {after.get('compared', 0):.0f}",
    ]
