"""The gateway's CPU per call against a bare grpc.aio server's, open loop at 400 and 1,500 calls/s; RSS; start time.

Five processes besides this one: the TF Serving stand-in (tests/tfserving_standin.py), a gateway
``quickdraw serve --backend tfserving`` in front of it (and a second one on asyncio's own event loop,
``--event-loop asyncio``, to compare with uvloop, the default), a bare grpc.aio unary server
(``benchmarks/bare_server.py``: one generic handler, 100 bytes back for anything), and the same bare server as a
bare proxy (``--forward``: one grpc.aio Predict to the stand-in per call before it answers, the floor for a gateway
that makes one backend call per call). A load generator in this
process (grpc.aio, several channels, requests pre-serialized so it spends nothing on protobuf) sends
single-bitmap calls to two of the gateway's doors, ``Classify`` (784 pixels, top_k 3) and the Open Inference
Protocol's ``ModelInfer`` (``image`` UINT8 [1, 28, 28, 1], output ``probabilities``), and 784-byte calls to the
bare servers, open loop: a call is started at its scheduled time whether or not earlier ones have been answered.
They take turns (Classify, ModelInfer, bare, proxy, Classify, ...; the idle ones cost nothing), ``ROUNDS`` rounds
per rate. The ratio to read is the gateway's CPU per call over the bare proxy's (issue 24's target: <= 1.2).

The stand-in serves a tiny model exported here with the shipped model's signature and labels (``serving_default``:
uint8 ``image`` in; ``probabilities`` [n, 29] and the ``top_k_*`` outputs out): the shipped model runs about 400
images/s at batch 1 on these 2 cores, so behind it most calls at 1,500/s (and some at 400/s) would be refused by
admission control and the gateway's cost per refused call would be measured instead. What is measured here is
the gateway; the stand-in's own cost is not counted.

CPU per call is the process's utime + stime (``/proc/PID/stat``, every thread) over a measured window, divided by
the calls started in it; the gateway's ``batch_size_drawings`` histogram (its /metrics) gives how many calls shared
one backend call (merged while the backend slot was busy), which the cost per call depends on. Also: the gateway's
RSS after its first 2,000 calls, and its time to SERVING (from process start to ``grpc.health.v1`` SERVING, TF
Serving already up). The achieved rates (started, answered) show whether the load generator kept up; failed calls
are counted by code.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from benchmarks.bench_batching import stop

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
RATES = (400, 1500)
#: Seconds of measured load per server, rate and round (after WARMUP_S of the same load, not measured).
SECONDS = float(os.environ.get("BENCH_CPU_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_CPU_ROUNDS", "2"))
WARMUP_S = 1.0
RSS_AFTER_CALLS = 2000
CHANNELS = 4
CALL_TIMEOUT_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLASSIFY = "/quickdraw.v1.Classifier/Classify"
BARE = "/bare.Bare/Call"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: The gateway's doors measured: quickdraw.v1 Classify, and the Open Inference Protocol's ModelInfer; and Classify on a
#: second gateway that runs on asyncio's own event loop (``--event-loop asyncio``) instead of uvloop, the default.
GATEWAY_DOORS = ("gateway", "gateway-oip", "gateway-asyncio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of proc(5)


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` now, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Load:
    """One open-loop load: what was started, answered and failed, and how long it took."""

    started: int = 0
    ok: int = 0
    send_s: float = 0.0
    done_s: float = 0.0
    #: How late the generator started its calls: the worst, in seconds.
    max_lag_s: float = 0.0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The first failure's details, by code.
    details: dict[str, str] = field(default_factory=dict)

    @property
    def started_rate(self) -> float:
        """Calls started per second while sending."""
        return self.started / self.send_s if self.send_s else 0.0

    @property
    def answered_rate(self) -> float:
        """Calls answered OK per second, from the first start to the last answer."""
        return self.ok / self.done_s if self.done_s else 0.0


async def open_loop(calls: list[grpc.aio.UnaryUnaryMultiCallable], payloads: list[bytes], rate: float,
                    seconds: float) -> Load:  # fmt: skip
    """Start ``rate`` x ``seconds`` calls on schedule (round robin over ``calls``) and wait for every answer."""
    loop = asyncio.get_running_loop()
    out = Load()
    total = int(rate * seconds)
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        try:
            await calls[i % len(calls)](payloads[i % len(payloads)], timeout=CALL_TIMEOUT_S)
            out.ok += 1
        except grpc.aio.AioRpcError as exc:
            out.failures[exc.code().name] += 1
            out.details.setdefault(exc.code().name, (exc.details() or "")[:150])

    t0 = loop.time()
    while out.started < total:
        now = loop.time()
        due = min(total, int((now - t0) * rate) + 1)
        if due > out.started:
            out.max_lag_s = max(out.max_lag_s, now - (t0 + out.started / rate))
        while out.started < due:
            task = loop.create_task(one(out.started))
            pending.add(task)
            task.add_done_callback(pending.discard)
            out.started += 1
        await asyncio.sleep(max(0.0, t0 + out.started / rate - loop.time()))
    out.send_s = loop.time() - t0
    if pending:
        await asyncio.wait(pending)
    out.done_s = loop.time() - t0
    return out


async def wait_serving(target: str, timeout_s: float = 120.0) -> None:
    """Poll ``grpc.health.v1`` until the server at ``target`` says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.01)
    raise RuntimeError(f"{target} not SERVING within {timeout_s} s")


@dataclass
class Measured:
    """CPU per call (s) and the loads, per server and rate."""

    cpu: dict[tuple[str, int], list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    loads: dict[tuple[str, int], list[Load]] = field(default_factory=lambda: collections.defaultdict(list))
    #: Drawings per backend batch in the gateway, per door, rate and round.
    batch: dict[tuple[str, int], list[float]] = field(default_factory=lambda: collections.defaultdict(list))


def batches(metrics_url: str) -> tuple[float, float]:
    """The gateway's batch_size_drawings (sum, count) now."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("quickdraw_batch_size_drawings_sum", "quickdraw_batch_size_drawings_count")):
            name, value = line.split()
            values[name.rsplit("_", 1)[1]] = float(value)
    return values["sum"], values["count"]


async def measure(
    targets: dict[str, tuple[str, int, str, list[bytes]]], gateway_pid: int, metrics_urls: dict[str, str]
) -> tuple[Measured, float]:
    """Warm up the gateway with RSS_AFTER_CALLS calls (its RSS then), then the alternating measured rounds."""
    channels = [grpc.aio.insecure_channel(t) for t, _, _, _ in targets.values() for _ in range(CHANNELS)]
    try:
        calls: dict[str, list[grpc.aio.UnaryUnaryMultiCallable]] = {}
        for i, (name, (_, _, method, _)) in enumerate(targets.items()):
            calls[name] = [ch.unary_unary(method) for ch in channels[i * CHANNELS:(i + 1) * CHANNELS]]
        for name, (_, _, _, payloads) in targets.items():  # connect, and warm up both
            first = await open_loop(calls[name], payloads, 400, (RSS_AFTER_CALLS if name == "gateway" else 400) / 400)
            if name == "gateway":
                rss = rss_mib(gateway_pid)
            if first.failures:
                print(f"  warm-up of {name}: failures {dict(first.failures)}", flush=True)
        out = Measured()
        for rate in RATES:
            for _ in range(ROUNDS):
                for name, (_, pid, _, payloads) in targets.items():
                    await open_loop(calls[name], payloads, rate, WARMUP_S)
                    c0 = cpu_s(pid)
                    b0 = batches(metrics_urls[name]) if name in GATEWAY_DOORS else (0.0, 0.0)
                    load = await open_loop(calls[name], payloads, rate, SECONDS)
                    out.cpu[name, rate].append((cpu_s(pid) - c0) / load.started)
                    out.loads[name, rate].append(load)
                    if name in GATEWAY_DOORS:
                        b1 = batches(metrics_urls[name])
                        out.batch[name, rate].append((b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]))
        return out, rss
    finally:
        for ch in channels:
            await ch.close()


def payloads() -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Serialized single-bitmap ClassifyRequests (top_k 3) and ModelInferRequests (``image`` UINT8 [1, 28, 28, 1] in
    ``raw_input_contents``, output ``probabilities``) for the gateway, 784-byte payloads for the bare servers."""
    from doodle.formats import open_bitmaps
    from quickdraw_client.v1 import classifier_pb2 as pb
    from service.protos import oip

    images = np.asarray(open_bitmaps(SAMPLE / "numpy_bitmap" / "cat.npy")[:256]).reshape(-1, 784)
    gateway = [pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=im.tobytes()))], top_k=3)
               .SerializeToString() for im in images]  # fmt: skip

    def infer(image: np.ndarray) -> bytes:
        req = oip.ModelInferRequest(model_name="quickdraw")
        req.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
        req.outputs.add(name="probabilities")
        req.raw_input_contents.append(image.tobytes())
        return req.SerializeToString()

    return gateway, [infer(im) for im in images], [im.tobytes() for im in images]


TINY_MODEL = """
import shutil, sys
from pathlib import Path
import keras, tensorflow as tf
from doodle.contract import SIGNATURE_NAME
from trainer.export import ServingModule
labels_file, out = Path(sys.argv[1]), Path(sys.argv[2])
labels = [line for line in labels_file.read_text().splitlines() if line]
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(len(labels))])
module = ServingModule(model, labels, labels_file)
tf.saved_model.save(module, str(out / "1"), signatures={SIGNATURE_NAME: module.serve.get_concrete_function()})
"""


def tiny_model(base: Path, env: dict[str, str]) -> None:
    """Export a one-layer model with the shipped signature and labels as ``base/1`` (in a subprocess: TensorFlow)."""
    labels = ROOT / "models" / "quickdraw" / "1" / "assets" / "labels.txt"
    subprocess.run([sys.executable, "-c", TINY_MODEL, str(labels), str(base)], check=True, env=env, cwd=ROOT,
                   capture_output=True)  # fmt: skip


def run() -> list[str]:
    """Start the three servers, measure, stop them; print the table and return the summary lines."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    tfs_port, gw_port, http_port, bare_port, proxy_port, gw2_port, http2_port = (_free_port() for _ in range(7))
    logs = tempfile.TemporaryDirectory(prefix="bench_cpu-")
    procs: list[subprocess.Popen[str]] = []

    def spawn(*argv: str) -> subprocess.Popen[str]:
        log = open(Path(logs.name) / f"{len(procs)}.log", "w")  # noqa: SIM115 - closed with the directory
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=ROOT)  # fmt: skip
        procs.append(proc)
        return proc

    try:
        tiny_model(Path(logs.name) / "tiny", env)
        spawn(str(ROOT / "tests" / "tfserving_standin.py"), "--model_base_path", str(Path(logs.name) / "tiny"),
              "--model_name", "quickdraw", "--port", str(tfs_port))  # fmt: skip
        bare = spawn(str(ROOT / "benchmarks" / "bare_server.py"), str(bare_port))
        proxy = spawn(str(ROOT / "benchmarks" / "bare_server.py"), str(proxy_port), "--forward",
                      f"127.0.0.1:{tfs_port}")  # fmt: skip
        _wait_line(Path(logs.name) / "0.log", "tfserving stand-in:")
        t0 = time.monotonic()
        gateway = spawn("-m", "quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", str(gw_port), "--http-port",
                        str(http_port), "--backend", "tfserving", "--tfserving-target", f"127.0.0.1:{tfs_port}")
        asyncio.run(wait_serving(f"127.0.0.1:{gw_port}"))
        to_serving = time.monotonic() - t0
        on_asyncio = spawn("-m", "quickdraw", "serve", "--host", "127.0.0.1", "--grpc-port", str(gw2_port),
                           "--http-port", str(http2_port), "--backend", "tfserving", "--tfserving-target",
                           f"127.0.0.1:{tfs_port}", "--event-loop", "asyncio")  # fmt: skip
        asyncio.run(wait_serving(f"127.0.0.1:{gw2_port}"))
        gw_payloads, oip_payloads, bare_payloads = payloads()
        targets = {
            "gateway": (f"127.0.0.1:{gw_port}", gateway.pid, CLASSIFY, gw_payloads),
            "gateway-oip": (f"127.0.0.1:{gw_port}", gateway.pid, MODEL_INFER, oip_payloads),
            "gateway-asyncio": (f"127.0.0.1:{gw2_port}", on_asyncio.pid, CLASSIFY, gw_payloads),
            "bare": (f"127.0.0.1:{bare_port}", bare.pid, BARE, bare_payloads),
            "proxy": (f"127.0.0.1:{proxy_port}", proxy.pid, BARE, bare_payloads),
        }
        m, rss = asyncio.run(measure(targets, gateway.pid, {
            "gateway": f"http://127.0.0.1:{http_port}/metrics", "gateway-oip": f"http://127.0.0.1:{http_port}/metrics",
            "gateway-asyncio": f"http://127.0.0.1:{http2_port}/metrics"}))
    except Exception:
        for i, _ in enumerate(procs):
            print((Path(logs.name) / f"{i}.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            stop(proc)
        logs.cleanup()
    summary = []
    for rate in RATES:
        per = {name: float(np.median(m.cpu[name, rate])) * 1e6 for name in targets}
        for name in targets:
            loads = m.loads[name, rate]
            fails = collections.Counter[str]()
            details: dict[str, str] = {}
            for load in loads:
                fails.update(load.failures)
                details.update(load.details)
            print(f"  {rate:5d}/s {name:<11} CPU/call {per[name]:6.0f} us (rounds: "
                  f"{', '.join(f'{c * 1e6:.0f}' for c in m.cpu[name, rate])})  started "
                  f"{np.median([ld.started_rate for ld in loads]):6.0f}/s  answered OK "
                  f"{np.median([ld.answered_rate for ld in loads]):6.0f}/s  worst start lag "
                  f"{max(ld.max_lag_s for ld in loads) * 1000:5.1f} ms"
                  + (f"  drawings per backend call {np.median(m.batch[name, rate]):.2f}"
                     if name in GATEWAY_DOORS else "")
                  + (f"  failed: {dict(fails)} (first: {details})" if fails else ""), flush=True)  # fmt: skip
        for door, api in (("gateway", "Classify"), ("gateway-oip", "OIP ModelInfer")):
            summary.append(
                f"CPU per single-bitmap {api} call at {rate}/s open loop: gateway (tfserving backend) / bare grpc.aio "
                f"proxy making one Predict per call = {per[door] / per['proxy']:.2f} ({per[door]:.0f} vs "
                f"{per['proxy']:.0f} us, median of {ROUNDS} alternating rounds of {SECONDS:g} s; target <= 1.2); "
                f"/ bare server {per[door] / per['bare']:.2f} ({per['bare']:.0f} us; "
                f"{np.median(m.batch[door, rate]):.2f} drawings per backend call)"
            )
        summary.append(
            f"CPU per single-bitmap Classify call at {rate}/s open loop: gateway on uvloop (the default) / the same "
            f"gateway on asyncio's own loop = {per['gateway'] / per['gateway-asyncio']:.2f} ({per['gateway']:.0f} vs "
            f"{per['gateway-asyncio']:.0f} us; on asyncio / bare proxy {per['gateway-asyncio'] / per['proxy']:.2f})"
        )
    print(f"  gateway RSS after {RSS_AFTER_CALLS} calls: {rss:.0f} MiB; time to SERVING: {to_serving:.2f} s",
          flush=True)  # fmt: skip
    summary.append(f"gateway (tfserving backend): RSS after {RSS_AFTER_CALLS} calls {rss:.0f} MiB; process start to "
                   f"health SERVING {to_serving:.2f} s (TF Serving already up)")  # fmt: skip
    return summary


def _wait_line(log: Path, text: str, timeout_s: float = 120.0) -> None:
    """Wait until ``text`` appears in the log file ``log`` (the stand-in prints its line once its models loaded)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if text in log.read_text():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not in {log} within {timeout_s} s")
