"""Image decoding and stroke rendering in worker processes, each drawing under a time budget.

A decode inside Pillow cannot be interrupted, and a hostile image can be slow to decode, so the gateway's
preprocessing threads never decode themselves: they send the encoded bytes to one of a few worker processes and
wait for its 28x28 answer for at most ``min(caller's deadline, image_decode_budget_ms)``. A worker that overruns
is killed (SIGKILL) and replaced in the background; the caller is told which limit it hit. Workers are started
from a ``forkserver`` (a clean process that has imported the decoder once), so neither the gateway's threads nor
TensorFlow's state are forked, and a replacement starts in milliseconds. Waiting for a free worker is bounded by
the same budget and deadline, so the queue of decodes is at most the preprocessing threads that wait.

Strokes are rendered the same way, by a pool of their own (``stroke_render_workers``, ``stroke_render_budget_ms``):
simplifying and rasterizing is pure-Python numpy and Pillow work that holds the GIL, and on the gateway's own
threads a legal request of 256 drawings x 256 raw strokes (3 s of rendering) kept the event loop waiting for the
GIL, grpc health for over 100 ms. A worker is sent a drawing's flat x, y and per-stroke counts (a few arrays,
whatever the number of strokes) and answers 784 bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import queue
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from doodle import BITMAP_SIDE, DoodleError, ImageDecodeError, ImageLimits, decode_image, flat_strokes_to_bitmap
from service.core.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from service.runtime.lifetime import die_with_parent

log = logging.getLogger(__name__)

#: Modules the forkserver imports once: its guard, which ends it with the gateway, and the decoder, so that each
#: worker it forks starts ready to decode.
PRELOAD = ["service.runtime.forkserver_preload", "service.preprocess.decode"]
#: How long a new worker may take to report ready.
STARTUP_S = 30.0


class WorkRefused(DoodleError):
    """A drawing a worker pool would not finish: ``reason`` says why, ``field`` names the limit or property."""

    def __init__(self, reason: str, field: str) -> None:
        self.reason = reason
        self.field = field
        super().__init__(reason)


def _work(job: tuple[Any, ...]) -> NDArray[np.uint8]:
    """One job: ``("image", bytes, ImageLimits)`` or ``("strokes", x, y, counts, raw)``."""
    if job[0] == "image":
        return decode_image(job[1], job[2])
    return flat_strokes_to_bitmap(job[1], job[2], job[3], job[4])


def _serve(conn: Connection) -> None:
    """A worker's loop: do each job it is sent (:func:`_work`); answer 784 bytes or the refusal."""
    die_with_parent()  # SIGKILL when the forkserver ends, which it does with the gateway
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when workers stop
    _warm_up()
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the gateway closed the pipe, or is gone
        answer: tuple[Any, ...]
        try:
            answer = ("ok", _work(job).tobytes())
        except ImageDecodeError as exc:
            answer = ("refused", exc.reason, exc.field)
        except DoodleError as exc:
            answer = ("refused", str(exc), "strokes")
        except Exception as exc:  # reported to the gateway, which answers INTERNAL
            answer = ("error", type(exc).__name__)
        conn.send(answer)


def _warm_up() -> None:
    """Decode a small PNG and JPEG and render a stroke once, so that Pillow's and numpy's lazy set-up is not
    charged to the first caller."""
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("L", (64, 64), 255).save(buf, format=fmt)
        decode_image(buf.getvalue())
    flat_strokes_to_bitmap(np.array([0.0, 90.0, 10.0]), np.array([0.0, 50.0, 70.0]), np.array([3]), True)


class _Worker:
    """One worker process and the gateway's end of its pipe."""

    def __init__(self, ctx: Any, what: str = "image decode") -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child,), name=what.replace(" ", "-"), daemon=True)
        self.proc.start()
        child.close()
        try:
            ready = self.conn.poll(STARTUP_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise OSError(f"a {what} worker did not start within {STARTUP_S:g} s")

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def close(self) -> None:
        """Close the pipe (the worker exits at EOF); kill it if it does not."""
        self.conn.close()
        self.proc.join(1)
        if self.proc.is_alive():
            self.kill()


class WorkerPool:
    """A few worker processes; :meth:`decode` and :meth:`render` are called from the gateway's preprocessing
    threads. ``setting`` is the prefix of the settings that size it (``image_decode`` for images, whose
    refusals are ``ImageDecodeError``; ``stroke_render`` for strokes, whose refusals are ``WorkRefused``), named
    in its errors."""

    def __init__(self, workers: int = 2, budget_ms: float = 500.0, setting: str = "image_decode") -> None:
        self.workers = workers
        self.budget_ms = budget_ms
        self.setting = setting
        self.what = setting.replace("_", " ")
        self._refusal: type[ImageDecodeError] | type[WorkRefused] = (
            ImageDecodeError if setting == "image_decode" else WorkRefused
        )
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        #: Workers killed for overrunning (or found dead) since start.
        self.replaced = 0

    def start(self) -> None:
        """Start the workers (once; :meth:`decode` starts them if this was not called)."""
        if self._started:
            return
        with self._lock:
            if self._started or self._closed:
                return
            for _ in range(self.workers):
                self._add(_Worker(self._ctx, self.what))
            self._started = True

    def _add(self, worker: _Worker) -> None:
        """Make a started worker available (the caller holds the lock)."""
        self._all.add(worker)
        self._idle.put(worker)

    def decode(self, data: bytes, limits: ImageLimits, deadline_s: float | None = None) -> NDArray[np.uint8]:
        """``decode_image(data, limits)`` in a worker, within the budget and the caller's deadline (monotonic).

        Raises ImageDecodeError for a refused image and for one that overran the budget (the caller reports both
        as the image's field), DeadlineExceeded when the caller's deadline came first, ResourceExhausted when no
        worker came free within the budget, Unavailable once closed.
        """
        return self._run(("image", data, limits), deadline_s)

    def render(
        self,
        x: NDArray[np.float64],
        y: NDArray[np.float64],
        counts: NDArray[np.int64],
        raw: bool,
        deadline_s: float | None = None,
    ) -> NDArray[np.uint8]:
        """:func:`doodle.flat_strokes_to_bitmap` in a worker, as :meth:`decode` (its refusals are ``WorkRefused``)."""
        return self._run(("strokes", x, y, counts, raw), deadline_s)

    def _run(self, job: tuple[Any, ...], deadline_s: float | None) -> NDArray[np.uint8]:
        """One job in a worker, within the budget and the caller's deadline."""
        self.start()
        budget_s = self.budget_ms / 1000.0
        worker = self._acquire(deadline_s, budget_s)
        end = time.monotonic() + budget_s
        stop = end if deadline_s is None else min(end, deadline_s)
        answer = None
        try:
            worker.conn.send(job)
            if worker.conn.poll(max(0.0, stop - time.monotonic())):
                answer = worker.conn.recv()
        except (EOFError, OSError):
            pass  # the worker died (or the pool is closing): replaced below
        if answer is None:
            self._replace(worker)
            if self._closed:
                raise Unavailable("the server is shutting down")
            if stop < end and time.monotonic() >= stop:
                raise DeadlineExceeded(f"deadline exceeded while waiting for a {self.what} worker's answer")
            if time.monotonic() >= end:
                verb = "decoding" if job[0] == "image" else "rendering"
                raise self._refusal(
                    f"{verb} took longer than {self.setting}_budget_ms={self.budget_ms:g}", f"{self.setting}_budget_ms"
                )
            raise self._refusal(f"the {self.what} worker crashed on this drawing", str(job[0]))
        self._idle.put(worker)
        if answer[0] == "ok":
            return np.frombuffer(answer[1], dtype=np.uint8).reshape(BITMAP_SIDE, BITMAP_SIDE)
        if answer[0] == "refused":
            raise self._refusal(answer[1], answer[2])
        raise ServiceError(f"internal error: {answer[1]} in a {self.what} worker")

    def _acquire(self, deadline_s: float | None, budget_s: float) -> _Worker:
        """A free worker, waited for at most the budget and the caller's deadline."""
        now = time.monotonic()
        wait = budget_s if deadline_s is None else min(budget_s, deadline_s - now)
        try:
            return self._idle.get(timeout=max(0.0, wait))
        except queue.Empty:
            if self._closed:
                raise Unavailable("the server is shutting down") from None
            if deadline_s is not None and time.monotonic() >= deadline_s:
                raise DeadlineExceeded(f"deadline exceeded while waiting for a {self.what} worker") from None
            raise ResourceExhausted(
                f"every {self.what} worker ({self.setting}_workers={self.workers}) stayed busy for "
                f"{self.setting}_budget_ms={self.budget_ms:g}; retry later"
            ) from None

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker that overran or died, and start its replacement in the background."""
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            if self._closed:
                return
            self.replaced += 1
        log.warning("%s worker %d killed (over %s_budget_ms=%g or dead); replacing it",
                    self.what, worker.proc.pid, self.setting, self.budget_ms)  # fmt: skip
        threading.Thread(target=self._respawn, name=f"{self.what.replace(' ', '-')}-respawn", daemon=True).start()

    def _respawn(self) -> None:
        """Start one worker and make it available, unless the pool closed meanwhile."""
        try:
            worker = _Worker(self._ctx, self.what)
        except OSError:
            log.exception("could not start a %s worker", self.what)
            return
        with self._lock:
            if not self._closed:
                self._add(worker)
                return
        worker.close()

    def close(self) -> None:
        """Stop every worker without waiting for decodes in progress (their callers get UNAVAILABLE)."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.proc.kill()
        for worker in workers:
            worker.proc.join(5)
        while True:  # the idle ones' pipes (a busy one's is closed by the thread waiting on it)
            try:
                self._idle.get_nowait().conn.close()
            except queue.Empty:
                break
