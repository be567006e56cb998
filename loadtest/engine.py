"""The load engine: closed and open loop, unary or streaming, gateway or TF Serving API, one or more channels.

Latency is recorded in microseconds in HdrHistograms.

- **Closed loop** (``concurrency``): N callers, each sends its next call when the last one is answered. This
  is what ghz and most tools do; it measures each call from when it was actually sent, so while a server
  stalls no calls are sent and the stall shows up as *one* slow call per caller (coordinated omission).
- **Open loop** (``rate``): calls are due at a constant rate or as a Poisson process, whether or not earlier
  calls have been answered. Each call's latency runs from its *intended* send time, so a call that was due
  during a stall and sent late still counts the whole wait: coordinated omission is corrected.

A *late send* (open loop) is a call sent more than ``LATE_SEND_S`` after it was due: the generator could not keep
to the schedule (its CPU, or ``max_outstanding`` calls already in flight). Its latency still runs from when it
was due, so the wait counts; many late sends mean the generator, not only the server, limited the load.

Before any load, :func:`check_reachable` connects to the target within ``connect_timeout_s`` and raises
:class:`Unreachable` naming the reason (refused, no such host, timed out, no gRPC answer).

Calls in the warm-up period are made but not recorded. Every call has a deadline (``timeout_s``); errors are
counted by gRPC status code. ``security`` reaches a gateway with TLS, mTLS or a bearer token. The TF Serving
API is called with ``service.protos.tfs``'s messages and stub (no TensorFlow is loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc
from hdrh.histogram import HdrHistogram

from loadtest.sources import Pool
from quickdraw_client.security import ClientSecurity
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.protos import oip, tfs

HIGHEST_US = 3_600_000_000  # an hour: nothing real is slower
#: Open loop: a call sent later than this after its due time is a late send.
LATE_SEND_S = 0.001
Progress = Callable[["RunStats"], None]


@dataclass(frozen=True)
class LoadConfig:
    """One load run."""

    target: str
    api: Literal["quickdraw", "tfserving", "v2"] = "quickdraw"
    concurrency: int | None = 8  # closed loop when rate is None
    rate: float | None = None  # open loop: calls per second
    arrival: Literal["constant", "poisson"] = "constant"
    duration_s: float | None = 10.0
    count: int | None = None  # stop after this many recorded calls (instead of, or before, duration_s)
    warmup_s: float = 1.0
    drawings_per_call: int = 1
    stream: bool = False
    channels: int = 1
    timeout_s: float = 10.0
    max_outstanding: int = 20_000  # open loop: calls in flight at most (then sends are late, and measured so)
    model_name: str = "quickdraw"
    top_k: int = 3
    seed: int = 0
    security: ClientSecurity = field(default_factory=ClientSecurity)  # TLS, mTLS, token
    connect_timeout_s: float = 5.0  # the first connection: longer, and the target is unreachable

    @property
    def mode(self) -> str:
        """``open`` or ``closed``."""
        return "open" if self.rate is not None else "closed"


def new_histogram() -> HdrHistogram:
    """Microseconds, 1 us to an hour, 3 significant digits."""
    return HdrHistogram(1, HIGHEST_US, 3)


@dataclass
class RunStats:
    """What one run measured (only calls after the warm-up)."""

    config: LoadConfig
    histogram: HdrHistogram = field(default_factory=new_histogram)
    codes: dict[str, int] = field(default_factory=dict)
    started_s: float = 0.0  # monotonic, end of warm-up
    ended_s: float = 0.0
    #: Per second since the end of warm-up: (calls, errors, histogram of that second's calls by completion).
    seconds: list[tuple[int, int, HdrHistogram]] = field(default_factory=list)
    late_sends: int = 0  # open loop: calls sent more than 1 ms after they were due

    def record(self, now: float, latency_s: float, code: str) -> None:
        """One finished call (completion time ``now``)."""
        us = min(HIGHEST_US, max(1, int(latency_s * 1e6)))
        self.histogram.record_value(us)
        self.codes[code] = self.codes.get(code, 0) + 1
        sec = int(now - self.started_s)
        while len(self.seconds) <= sec:
            self.seconds.append((0, 0, new_histogram()))
        calls, errors, h = self.seconds[sec]
        h.record_value(us)
        self.seconds[sec] = (calls + 1, errors + (code != "OK"), h)

    @property
    def calls(self) -> int:
        """Recorded calls."""
        return sum(self.codes.values())

    @property
    def errors(self) -> int:
        """Recorded calls that did not end OK."""
        return self.calls - self.codes.get("OK", 0)

    @property
    def elapsed_s(self) -> float:
        """The measured window."""
        return max(1e-9, (self.ended_s or time.monotonic()) - self.started_s)

    @property
    def throughput(self) -> float:
        """Answered calls per second (OK or not)."""
        return self.calls / self.elapsed_s

    @property
    def goodput(self) -> float:
        """Calls answered OK per second."""
        return self.codes.get("OK", 0) / self.elapsed_s

    @property
    def error_pct(self) -> float:
        """Recorded calls that did not end OK, in percent of all recorded calls (0 when none was recorded)."""
        return 100.0 * self.errors / self.calls if self.calls else 0.0

    def percentile_ms(self, p: float) -> float:
        """Latency at percentile ``p`` (0-100), in ms."""
        return self.histogram.get_value_at_percentile(p) / 1000.0 if self.calls else float("nan")


# --- call makers ---------------------------------------------------------------------------------------------

Caller = Callable[[], Awaitable[str]]
Metadata = tuple[tuple[str, str], ...] | None


def _code(exc: grpc.aio.AioRpcError) -> str:
    return exc.code().name


class _StreamMux:
    """One ClassifyStream per channel, shared by callers: ids match answers to calls."""

    def __init__(self, stub: pb_grpc.ClassifierStub, timeout_s: float, metadata: Metadata = None) -> None:
        self._call = stub.ClassifyStream(metadata=metadata)
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self._timeout_s = timeout_s
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for answer in self._call:
                fut = self._pending.pop(answer.id, None)
                if fut is not None and not fut.done():
                    ok = answer.WhichOneof("result") == "response"
                    code = "OK" if ok else _CODE_NAMES.get(answer.error.code, str(answer.error.code))
                    fut.set_result(code)
        except grpc.aio.AioRpcError as exc:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result(_code(exc))
            self._pending.clear()

    async def send(self, request: pb.ClassifyRequest) -> str:
        i = str(next(self._ids))
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        try:
            async with self._lock:
                await self._call.write(pb.ClassifyStreamRequest(id=i, request=request))
            return await asyncio.wait_for(fut, self._timeout_s)
        except TimeoutError:
            return "DEADLINE_EXCEEDED"
        except grpc.aio.AioRpcError as exc:
            return _code(exc)
        except asyncio.InvalidStateError:  # the stream has already ended (refused as a whole): its status answers
            return (await self._call.code()).name
        finally:
            self._pending.pop(i, None)

    async def close(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._call.done_writing()
        self._reader.cancel()
        self._call.cancel()


_CODE_NAMES = {sc.value[0]: sc.name for sc in grpc.StatusCode}


def build_callers(cfg: LoadConfig, pool: Pool, channels: list[grpc.aio.Channel]) -> tuple[list[Caller], list[object]]:
    """One call maker per channel; returns them and the objects to close (stream muxes)."""
    draw = pool.cycle()
    bitmaps = itertools.cycle(range(max(1, len(pool.bitmaps))))
    k = cfg.drawings_per_call
    md = cfg.security.metadata()
    closers: list[object] = []
    callers: list[Caller] = []
    for ch in channels:
        if cfg.api == "tfserving":
            if len(pool.bitmaps) == 0:
                raise ValueError("the tfserving API takes bitmaps: give .npy files")
            from service.protos.tensors import from_numpy

            stub = tfs.PredictionServiceStub(ch)

            def tfs_call(stub: tfs.PredictionServiceStub = stub) -> Awaitable[str]:
                idx = [next(bitmaps) for _ in range(k)]
                req = tfs.PredictRequest(output_filter=["probabilities"])
                req.model_spec.name = cfg.model_name
                req.inputs["image"].CopyFrom(from_numpy(pool.bitmaps[idx].reshape(-1, 28, 28, 1)))
                return _unary(stub.Predict(req, timeout=cfg.timeout_s, metadata=md))

            callers.append(tfs_call)
            continue
        if cfg.api == "v2":  # the Open Inference Protocol (KServe v2): ModelInfer, image UINT8 in raw contents
            if len(pool.bitmaps) == 0:
                raise ValueError("the v2 API takes bitmaps here: give .npy files")
            vstub = oip.GRPCInferenceServiceStub(ch)

            def v2_call(stub: oip.GRPCInferenceServiceStub = vstub) -> Awaitable[str]:
                idx = [next(bitmaps) for _ in range(k)]
                req = oip.ModelInferRequest(model_name=cfg.model_name)
                req.inputs.add(name="image", datatype="UINT8", shape=[len(idx), 28, 28, 1])
                req.outputs.add(name="probabilities")
                req.raw_input_contents.append(pool.bitmaps[idx].tobytes())
                return _unary(stub.ModelInfer(req, timeout=cfg.timeout_s, metadata=md))

            callers.append(v2_call)
            continue
        cstub = pb_grpc.ClassifierStub(ch)
        if cfg.stream:
            mux = _StreamMux(cstub, cfg.timeout_s, md)
            closers.append(mux)

            def stream_call(mux: _StreamMux = mux) -> Awaitable[str]:
                return mux.send(pb.ClassifyRequest(drawings=[next(draw) for _ in range(k)], top_k=cfg.top_k))

            callers.append(stream_call)
        else:

            def unary_call(stub: pb_grpc.ClassifierStub = cstub) -> Awaitable[str]:
                req = pb.ClassifyRequest(drawings=[next(draw) for _ in range(k)], top_k=cfg.top_k)
                return _unary(stub.Classify(req, timeout=cfg.timeout_s, metadata=md))

            callers.append(unary_call)
    return callers, closers


async def _unary(call: Awaitable[object]) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return _code(exc)


# --- reaching the target ------------------------------------------------------------------------------------


class Unreachable(OSError):
    """The target could not be reached; the message names the reason."""


def host_port(target: str) -> tuple[str, int] | None:
    """(host, port) of a plain ``host:port`` or ``dns:///host:port`` target; None for other gRPC target forms
    (``ipv4:a,b``, ``unix:``, ...), which are only checked through gRPC itself."""
    m = re.fullmatch(r"(?:dns:(?://[^/]*)?/)?(\[[^\]]+\]|[^:/\[\]]+):(\d+)", target)
    if m is None:
        return None
    return m.group(1).strip("[]"), int(m.group(2))


async def check_reachable(cfg: LoadConfig) -> None:
    """Connect to the target once, within ``cfg.connect_timeout_s``; raise :class:`Unreachable` with the reason
    (name resolution, refused, timed out; a port that takes TCP but never completes a gRPC connection: TLS on one
    side only, or not a gRPC server)."""
    limit = cfg.connect_timeout_s
    where = host_port(cfg.target)
    if where is not None:
        host, port = where
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
        except socket.gaierror as exc:
            raise Unreachable(f"cannot resolve {host!r}: {exc.strerror or exc}") from exc
        except TimeoutError as exc:
            raise Unreachable(f"no TCP connection to {host}:{port} within {limit:g} s (a firewall, or a host that "
                              "is down)") from exc  # fmt: skip
        except ConnectionRefusedError as exc:
            raise Unreachable(f"connection refused: nothing listens on {host}:{port}") from exc
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise Unreachable(f"TCP connection to {host}:{port} failed: {reason}") from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    channel = cfg.security.aio_channel(cfg.target)
    try:
        await asyncio.wait_for(channel.channel_ready(), limit)
    except TimeoutError as exc:
        tls = "with TLS" if cfg.security.uses_tls else "in plaintext"
        raise Unreachable(f"no gRPC connection within {limit:g} s ({tls}): the port answers TCP but not gRPC "
                          "(TLS on one side only? not a gRPC server?)") from exc  # fmt: skip
    finally:
        await channel.close()


# --- the loops -----------------------------------------------------------------------------------------------


async def run_load(cfg: LoadConfig, pool: Pool, progress: Progress | None = None) -> RunStats:
    """Run one load test and return what it measured."""
    if cfg.rate is None and not cfg.concurrency:
        raise ValueError("give a concurrency (closed loop) or a rate (open loop)")
    if cfg.duration_s is None and cfg.count is None:
        raise ValueError("give a duration or a count")
    # Distinct channels get distinct connections (no subchannel sharing between them).
    channels = [
        cfg.security.aio_channel(cfg.target, options=[("grpc.use_local_subchannel_pool", 1),
                                                      ("grpc.max_receive_message_length", 64 << 20),
                                                      ("grpc.max_send_message_length", 64 << 20)])
        for _ in range(max(1, cfg.channels))
    ]  # fmt: skip
    stats = RunStats(cfg)
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), cfg.connect_timeout_s) for ch in channels))
        callers, closers = build_callers(cfg, pool, channels)
        t0 = time.monotonic()
        stats.started_s = t0 + cfg.warmup_s
        end = None if cfg.duration_s is None else stats.started_s + cfg.duration_s
        done = asyncio.Event()

        def finished(now: float) -> bool:
            if end is not None and now >= end:
                return True
            return cfg.count is not None and stats.calls >= cfg.count

        ticker = asyncio.get_running_loop().create_task(_tick(stats, done, progress))
        try:
            if cfg.rate is None:
                await _closed(cfg, callers, stats, finished)
            else:
                await _open(cfg, callers, stats, finished, t0)
        finally:
            stats.ended_s = time.monotonic()
            done.set()
            await ticker
            for c in closers:
                await c.close()  # type: ignore[attr-defined]
    finally:
        for ch in channels:
            await ch.close()
    return stats


async def _tick(stats: RunStats, done: asyncio.Event, progress: Progress | None) -> None:
    while not done.is_set():
        if progress is not None:
            progress(stats)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)
    if progress is not None:
        progress(stats)


async def _closed(cfg: LoadConfig, callers: list[Caller], stats: RunStats, finished: Callable[[float], bool]) -> None:
    async def caller(i: int) -> None:
        call = callers[i % len(callers)]
        while not finished(sent := time.monotonic()):
            code = await call()
            now = time.monotonic()
            if sent >= stats.started_s:
                stats.record(now, now - sent, code)

    assert cfg.concurrency is not None
    await asyncio.gather(*(caller(i) for i in range(cfg.concurrency)))


async def _open(
    cfg: LoadConfig, callers: list[Caller], stats: RunStats, finished: Callable[[float], bool], t0: float
) -> None:
    assert cfg.rate is not None and cfg.rate > 0
    rng = random.Random(cfg.seed)
    room = asyncio.Semaphore(cfg.max_outstanding)
    tasks: set[asyncio.Task[None]] = set()

    async def one(call: Caller, due: float) -> None:
        try:
            code = await call()
            now = time.monotonic()
            if due >= stats.started_s:
                stats.record(now, now - due, code)  # from the intended send time
        finally:
            room.release()

    due = t0
    for k in itertools.count():
        due += rng.expovariate(cfg.rate) if cfg.arrival == "poisson" else 1.0 / cfg.rate
        if finished(due):
            break
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await room.acquire()
        if time.monotonic() - due > LATE_SEND_S and due >= stats.started_s:
            stats.late_sends += 1
        task = asyncio.get_running_loop().create_task(one(callers[k % len(callers)], due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*list(tasks))


def percentiles(stats: RunStats) -> dict[str, float]:
    """The standard percentiles in ms."""
    return {
        "p50_ms": stats.percentile_ms(50),
        "p90_ms": stats.percentile_ms(90),
        "p95_ms": stats.percentile_ms(95),
        "p99_ms": stats.percentile_ms(99),
        "p99.9_ms": stats.percentile_ms(99.9),
        "max_ms": stats.histogram.get_max_value() / 1000.0 if stats.calls else float("nan"),
        "mean_ms": stats.histogram.get_mean_value() / 1000.0 if stats.calls else float("nan"),
    }


def timeline(stats: RunStats) -> list[dict[str, float]]:
    """Per second: calls, errors, p50 and p99 (ms) of the calls that finished in it."""
    return [
        {"t_s": float(i), "calls": c, "errors": e,
         "p50_ms": h.get_value_at_percentile(50) / 1000.0 if c else float("nan"),
         "p99_ms": h.get_value_at_percentile(99) / 1000.0 if c else float("nan")}
        for i, (c, e, h) in enumerate(stats.seconds)
    ]  # fmt: skip


#: Buckets of the latency histogram in the reports: log-spaced between the fastest and the slowest call.
HISTOGRAM_BUCKETS = 20


def latency_histogram(stats: RunStats, buckets: int = HISTOGRAM_BUCKETS) -> list[dict[str, float]]:
    """Counts of calls by latency (ms), in log-spaced buckets from the fastest call to the slowest: each bucket
    is ``{"le_ms": its upper bound, "count": calls in it}``."""
    if not stats.calls:
        return []
    lo = max(1, stats.histogram.get_min_value())
    hi = max(lo + 1, stats.histogram.get_max_value())
    bounds = [lo * (hi / lo) ** ((i + 1) / buckets) for i in range(buckets)]
    counts = [0] * buckets
    for item in stats.histogram.get_recorded_iterator():
        v = item.value_iterated_to
        i = next((j for j, b in enumerate(bounds) if v <= b * 1.0000001), buckets - 1)
        counts[i] += item.count_added_in_this_iter_step
    return [{"le_ms": b / 1000.0, "count": c} for b, c in zip(bounds, counts, strict=True)]


def drawings_per_s(stats: RunStats) -> float:
    """Drawings answered OK per second."""
    return stats.codes.get("OK", 0) * stats.config.drawings_per_call / stats.elapsed_s


def summary(stats: RunStats) -> dict[str, object]:
    """Everything a report needs about one run, JSON-ready."""
    cfg = stats.config
    return {
        "mode": cfg.mode,
        "concurrency": cfg.concurrency if cfg.rate is None else None,
        "offered_rate": cfg.rate,
        "arrival": cfg.arrival if cfg.rate is not None else None,
        "api": cfg.api,
        "stream": cfg.stream,
        "channels": cfg.channels,
        "drawings_per_call": cfg.drawings_per_call,
        "duration_s": round(stats.elapsed_s, 3),
        "calls": stats.calls,
        "throughput_calls_per_s": stats.throughput,
        "goodput_calls_per_s": stats.goodput,
        "drawings_per_s": drawings_per_s(stats),
        "errors": stats.errors,
        "error_pct": stats.error_pct,
        "codes": dict(sorted(stats.codes.items())),
        "late_sends": stats.late_sends,
        "late_send_pct": 100.0 * stats.late_sends / stats.calls if stats.calls else 0.0,
        **percentiles(stats),
        "latency_histogram": latency_histogram(stats),
        "timeline": timeline(stats),
    }

