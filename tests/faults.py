"""Fault-test harness: real gateway and TF Serving stand-in processes, open-loop load, and a tally of every call.

Every call has a deadline. A call is **lost** when it gets no answer by its deadline plus 100 ms (a hang, or
an answer that comes too late to matter). Each test writes its tally to
``test-artifacts/reliability/<name>.json``; ``make reliability`` turns those into RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from harness import SHIPPED_MODEL, parse_metrics

from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "reliability"
LATE_S = 0.1
#: A call sent this long before a fault may still be on its way to the server when the fault lands (loopback,
#: a loaded 2-core machine): tests judge calls sent in this window neither "before" nor "after" the fault.
IN_TRANSIT_S = 0.02


@dataclass
class Tally:
    """What happened to every call of one fault test."""

    name: str
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    #: (send time since start, latency s, code, model version or 0) for every answered call
    calls: list[tuple[float, float, str, int]] = field(default_factory=list)
    #: For each event of :func:`open_load`, by its scheduled time: (started, returned) on the load clock, in
    #: seconds since the first call was due. For a signal, "returned" is when ``kill(2)`` had delivered it.
    fired: dict[float, tuple[float, float]] = field(default_factory=dict)

    def delivered(self, at: float) -> float:
        """When the event scheduled at ``at`` had been delivered (its function returned), on the load clock."""
        assert at in self.fired, f"the event at {at} s never ran: {self.fired}"
        return self.fired[at][1]

    def sent_before(self, at: float) -> list[tuple[float, float, str, int]]:
        """The answered calls sent before the event at ``at`` started, and in transit no longer then."""
        start = self.fired[at][0] if at in self.fired else self.delivered(at)
        return [c for c in self.calls if c[0] < start - IN_TRANSIT_S]

    def sent_after(self, at: float, settle_s: float = 0.0) -> list[tuple[float, float, str, int]]:
        """The answered calls sent ``settle_s`` or more after the event at ``at`` was delivered."""
        end = self.delivered(at) + settle_s
        return [c for c in self.calls if c[0] >= end]

    def latencies(self, code: str = "OK", since: float = 0.0, until: float = float("inf")) -> np.ndarray:
        """Latencies (s) of the calls answered with ``code`` that were sent in [since, until)."""
        return np.array([lat for t, lat, c, _ in self.calls if c == code and since <= t < until])

    def save(self, fault: str, command: str, **extra: object) -> None:
        """Write the tally for RELIABILITY.md."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        row = {"name": self.name, "fault": fault, "sent": self.sent, "ok": self.codes.get("OK", 0),
               "codes": {k: v for k, v in sorted(self.codes.items()) if k != "OK"}, "lost": self.lost,
               "command": command, **extra}  # fmt: skip
        (ARTIFACTS / f"{self.name}.json").write_text(json.dumps(row, indent=1) + "\n")


def bitmaps(n: int = 64) -> list[bytes]:
    """Real cat bitmaps if the sample is there, else a square."""
    path = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw")) / "numpy_bitmap"
    if (path / "cat.npy").exists():
        rows = np.load(path / "cat.npy", mmap_mode="r")[:n]
        return [np.asarray(r, np.uint8).tobytes() for r in rows]
    square = np.zeros((28, 28), np.uint8)
    square[6:22, 6] = square[6:22, 21] = square[6, 6:22] = square[21, 6:22] = 255
    return [square.tobytes()]


def stroke_requests(n: int = 64) -> list[pb.ClassifyRequest]:
    """One-drawing requests of real simplified cat strokes if the sample is there, else of a drawn square."""
    path = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw")) / "simplified"
    drawings: list[list[list[list[float]]]] = []
    if (path / "cat.ndjson").exists():
        with open(path / "cat.ndjson") as fh:
            drawings = [json.loads(line)["drawing"] for _, line in zip(range(n), fh, strict=False)]
    if not drawings:
        drawings = [[[[20, 235, 235, 20, 20], [20, 20, 235, 235, 20]]]]
    return [pb.ClassifyRequest(drawings=[pb.Drawing(strokes=pb.Strokes(
        coordinates=pb.Strokes.SIMPLIFIED, strokes=[pb.Stroke(x=s[0], y=s[1]) for s in d]))]) for d in drawings]


def largest_request(seed: int = 0) -> pb.ClassifyRequest:
    """The largest legal request of the default limits: 256 drawings x 256 raw strokes x 2 points (~1.4 MiB)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, size=(256, 256, 2, 2)).astype(np.float32)
    return pb.ClassifyRequest(drawings=[
        pb.Drawing(strokes=pb.Strokes(coordinates=pb.Strokes.RAW,
                                      strokes=[pb.Stroke(x=s[0].tolist(), y=s[1].tolist()) for s in d]))
        for d in xy])  # fmt: skip


def open_load(
    target: str,
    rate: float,
    duration_s: float,
    deadline_s: float,
    name: str,
    events: dict[float, Callable[[], None]] | None = None,
    version: int | None = None,
    requests: Sequence[pb.ClassifyRequest] | None = None,
) -> Tally:
    """Calls due at ``rate``/s for ``duration_s`` whatever happens; ``events`` run at their times on the same clock
    (in a thread), and ``Tally.fired`` records when each ran.

    The calls classify one bitmap each, or cycle through ``requests``."""
    tally = Tally(name)
    payloads = bitmaps()

    timers: list[threading.Timer] = []

    def fire(at: float, fn: Callable[[], None], t0: float) -> None:
        started = time.monotonic() - t0
        try:
            fn()
        finally:
            tally.fired[at] = (started, time.monotonic() - t0)

    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            # One clock for the calls and the faults: t0 is when the first call is due, and every event is
            # scheduled from it (not from before the channel opened, which once put a signal 150 ms early).
            t0 = time.monotonic()
            for at, fn in (events or {}).items():
                timer = threading.Timer(max(0.0, t0 + at - time.monotonic()), fire, args=(at, fn, t0))
                timer.daemon = True
                timers.append(timer)
                timer.start()
            tasks = []

            async def one(i: int, due: float) -> None:
                req = requests[i % len(requests)] if requests else pb.ClassifyRequest(
                    drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=payloads[i % len(payloads)]))],
                    model=pb.ModelSpec(version=version) if version else None)  # fmt: skip
                sent = time.monotonic()
                try:
                    resp = await asyncio.wait_for(stub.Classify(req, timeout=deadline_s), deadline_s + LATE_S)
                    code, v = "OK", resp.model_version
                except grpc.aio.AioRpcError as exc:
                    code, v = exc.code().name, 0
                except TimeoutError:
                    tally.lost += 1
                    return
                tally.codes[code] += 1
                tally.calls.append((sent - t0, time.monotonic() - sent, code, v))

            for i in range(int(rate * duration_s)):
                due = t0 + i / rate
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                tally.sent += 1
                tasks.append(asyncio.get_running_loop().create_task(one(i, due)))
            await asyncio.gather(*tasks)

    # This process has TensorFlow loaded (hundreds of thousands of objects): a full garbage collection stalls the
    # load's event loop for ~180 ms, long enough to count an answered call as lost. Before the clock starts, and
    # not during the load.
    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
        for t in timers:
            t.join(60)
    return tally


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A child process whose output is collected (and shown when a test fails)."""

    def __init__(self, args: list[str], ready: str, timeout_s: float = 120) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT)  # fmt: skip
        self.lines: list[str] = []
        self.match: re.Match[str] | None = None
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if (m := re.search(ready, line)) is not None:
                self.match = m
                threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()  # type: ignore[arg-type]
                return
        self.proc.kill()
        raise AssertionError(f"{args[:4]} did not start:\n" + "".join(self.lines[-40:]))

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def rss_mib(self) -> float:
        """Resident memory now."""
        with open(f"/proc/{self.pid}/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")) / 1024

    def kill(self) -> None:
        """SIGKILL, as when a node dies."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def output(self) -> str:
        """Everything it printed."""
        return "".join(self.lines)


def start_standin(port: int, *args: str, base: Path = SHIPPED_MODEL) -> Process:
    """The TF Serving stand-in as its own process on ``port``."""
    return Process([sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), "--model_base_path", str(base),
                    "--model_name", "quickdraw", "--port", str(port), *args],
                   ready=r"tfserving stand-in: .* on ")  # fmt: skip


class Gateway(Process):
    """``quickdraw serve`` on free ports."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        super().__init__([*prefix, sys.executable, "-m", "quickdraw", "serve", "--host", "127.0.0.1",
                          "--grpc-port", "0", "--http-port", "0", *args],
                         ready=r"ready: gRPC on 127\.0\.0\.1:(\d+), metrics on http://[^:]+:(\d+)/metrics")
        assert self.match is not None
        self.target = f"127.0.0.1:{self.match.group(1)}"
        self.http_port = int(self.match.group(2))

    def scrape(self) -> dict[str, float]:
        """Its /metrics."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        return parse_metrics(urllib.request.urlopen(url, timeout=10).read().decode())


@contextmanager
def gateway(*args: str) -> Iterator[Gateway]:
    """A gateway process, killed at the end if still running."""
    gw = Gateway(*args)
    try:
        yield gw
    finally:
        gw.kill()
