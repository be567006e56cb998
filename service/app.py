"""The composition root: build every part of the gateway from ``Settings``, start them, stop them in order.

Start: the HTTP server (/metrics, JSON API, playground), then the gRPC server (health NOT_SERVING, so
orchestrators can probe it while the model loads), then the backend loads and warms up, then the batcher
starts, then health turns SERVING. Stop (SIGTERM/SIGINT, even during start): health NOT_SERVING, both the gRPC
and the HTTP server stop accepting new calls and let in-flight ones finish, then the batcher drains, the pools
and the backend close; all of it within ``shutdown_grace_s`` (+ ``CLEANUP_S``), off the event loop.
Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import importlib
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.backends import Backend, ModelDescription, read_reference
from service.backends.embedded import EmbeddedBackend
from service.core.metrics import Metrics
from service.core.streams import StreamSlots
from service.dataplane.batching import BackendHealth, Batcher, BatcherConfig
from service.dataplane.pipeline import DataPlane
from service.dataplane.rollout import PlanFile, Rollout, RolloutPlan, Shadow
from service.frontends.grpc import classifier as api
from service.frontends.grpc.classifier import SERVICE_NAME, ClassifierService
from service.frontends.http import v1
from service.frontends.http.jsonparse import JsonParsePool
from service.frontends.http.server import HttpLimits, HttpServer
from service.frontends.oip import grpc_api as oip_grpc
from service.frontends.oip import http_api as oip_http
from service.frontends.tfserving import grpc_api as tfserving_api
from service.preprocess.decode import WorkerPool
from service.preprocess.validation import Limits
from service.protos import oip as oip_protos
from service.protos import tfs as tfs_protos
from service.runtime.lograte import LogRate
from service.security import redaction, tls
from service.security.tokens import TokenAuth, grpc_interceptors
from service.settings import Settings

log = logging.getLogger(__name__)

#: The interpreter's GIL switch interval in the gateway (CPython's default is 5 ms): how long the event loop may
#: wait for a preprocessing thread to yield the GIL each time it wakes. A health check wakes it a few dozen times:
#: at 1 ms, health waited 70-136 ms while a thread validated a 1.4 MB request of 65,536 strokes; at 0.2 ms, 10 ms.
SWITCH_INTERVAL_S = 0.0002

#: A grpc.health.v1 service name for liveness probes: SERVING from the moment the server listens until it
#: stops, whatever the model or backend is doing (readiness is "" and the Classifier's own name).
LIVENESS_SERVICE = "liveness"


#: File descriptors kept for everything but client connections: the model's files, TF Serving channels, the
#: HTTP server's own sockets, threads' pipes, logs.
FD_RESERVE = 256
#: On stop, the stages after the servers (batcher, pools, backend) get at least this long together, even when
#: in-flight calls took the whole grace period: the process exits within shutdown_grace_s + CLEANUP_S.
CLEANUP_S = 0.5


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (container runtimes often start at a soft 1024);
    returns (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def return_large_buffers_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc's malloc serve buffers of ``threshold_bytes`` or more with mmap, always (M_MMAP_THRESHOLD).

    By default glibc raises the threshold to the largest buffer freed so far, after which 4 MiB request
    buffers come from the heap and fragment it: RSS then ratchets up under attack though nothing leaks.
    Returns False where this is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(-3, threshold_bytes))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def connection_caps(settings: Settings, fd_limit: int) -> tuple[int, int]:
    """(gRPC, HTTP) connection caps that fit the file-descriptor budget: the settings, or scaled down to
    ``fd_limit - FD_RESERVE`` in proportion (logged), so a flood of connections meets the caps, never EMFILE."""
    grpc_cap, http_cap = settings.max_grpc_connections, settings.max_http_connections
    budget = max(2, fd_limit - FD_RESERVE)
    if grpc_cap + http_cap <= budget:
        return grpc_cap, http_cap
    scale = budget / (grpc_cap + http_cap)
    capped = max(1, int(grpc_cap * scale)), max(1 if http_cap else 0, int(http_cap * scale))
    log.warning("the file-descriptor limit is %d: connection caps lowered from gRPC %d, HTTP %d to %d, %d "
                "(raise the container's nofile limit to keep them)", fd_limit, grpc_cap, http_cap, *capped)  # fmt: skip
    return capped


def build_backend(settings: Settings) -> Backend:
    """The backend the settings ask for."""
    if settings.backend == "tfserving":
        from service.backends.tfserving import TFServingBackend

        return TFServingBackend(settings)
    return EmbeddedBackend(
        settings.model_dir,
        settings.model_name,
        all_versions=settings.model_versions == "all",
        max_batch_size=settings.max_batch_size,
        concurrency=settings.max_concurrent_batches,
        threads=settings.inference_threads,
        warmup=settings.warmup,
        watch_s=settings.model_watch_s,
        retire_s=settings.model_retire_s,
    )


@dataclass
class App:
    """A running gateway; ``grpc_port`` and ``http_port`` are the bound ports (useful with port 0)."""

    settings: Settings
    backend_factory: Callable[[Settings], Backend] = build_backend
    metrics: Metrics = field(init=False)
    grpc_port: int = field(init=False, default=0)
    http_port: int = field(init=False, default=0)
    ready: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.settings.max_batch_size)
        self._server: grpc.aio.Server | None = None
        tokens = self.settings.tokens()
        redaction.install_log_redaction(tokens)  # no log line of this process shows them, whatever logs it
        self._auth = TokenAuth(tokens) if tokens else None  # None: no token required
        s = self.settings
        limits = HttpLimits(s.http_keepalive_timeout_s, s.http_header_timeout_s, s.http_body_timeout_s,
                            s.max_http_connections, s.http_request_compression, s.http_allowed_hosts)
        self._http = HttpServer(self.metrics, s.max_message_bytes, auth=self._auth,
                                require_client_cert=s.tls_client_ca_file is not None, limits=limits)
        if s.http_api:  # /v1 and the page, the OIP's /v2; /metrics is always there
            self._http.more_routes += [v1.add_routes, oip_http.add_routes]
        self._health = health.aio.HealthServicer()
        self._backend: Backend | None = None
        self._batcher: Batcher | None = None
        self._gateway: DataPlane | None = None
        self._json_parser: JsonParsePool | None = None
        self._decoder: WorkerPool | None = None
        self._renderer: WorkerPool | None = None
        self._shadow: Shadow | None = None
        self._plan_file: PlanFile | None = None
        self._stopping = False
        #: Stop stages that had not finished when the grace period ran out ("start": a start abandoned on a signal).
        self.left_behind: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: Readiness as the model's versions say (``_publish``) and as the batcher says (``_backend_health``).
        self._model_serving = False
        self._backend_state = BackendHealth()

    async def start(self) -> None:
        """Bind, load the model, warm up, and report SERVING."""
        s = self.settings
        if s.backend == "embedded":
            # Importing TensorFlow loads a library of about 1 GB with the GIL held for seconds: do it before the
            # ports open, so that no health check, and no SIGTERM during the model load, waits on it. (The
            # tfserving backend never imports it.)
            await asyncio.to_thread(importlib.import_module, "tensorflow")
        soft, _ = raise_fd_limit()
        return_large_buffers_to_the_os()
        grpc_cap, http_cap = connection_caps(s, soft)
        self._install_loop_error_log()
        self._http.limits = dataclasses.replace(self._http.limits, max_connections=http_cap)
        ssl_context = tls.http_ssl_context(s)
        try:
            self.http_port = await self._http.start(s.host, s.http_port, ssl_context=ssl_context)
        except OSError as exc:  # EADDRINUSE, EACCES: one line naming the port and the option
            raise tls.bind_error(s.host, s.http_port, "--http-port", exc) from exc
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Security: see docs/security.md. Compressed requests are refused by gRPC core (UNIMPLEMENTED) unless
            # allowed; connections must finish their handshake in time, idle ones close, and they are capped.
            ("grpc.compression_enabled_algorithms_bitset", 0b111 if s.grpc_request_compression else 0b001),
            ("grpc.server_handshake_timeout_ms", int(s.grpc_handshake_timeout_s * 1000)),
            ("grpc.max_allowed_incoming_connections", grpc_cap),
            ("grpc.max_concurrent_streams", s.grpc_max_streams_per_connection),
        ]
        if s.grpc_max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", int(s.grpc_max_connection_idle_s * 1000)))
        if s.max_connection_age_s > 0:  # clients reconnect, so long-lived ones rebalance over the replicas
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
            ]
        interceptors = grpc_interceptors(s, self._auth, self.metrics)
        self._server = grpc.aio.server(options=options, interceptors=interceptors,
                                       maximum_concurrent_rpcs=s.max_concurrent_rpcs)  # fmt: skip
        streams = StreamSlots(s.max_open_streams)  # one cap for every streaming door (service.core.streams)
        service = ClassifierService(self.metrics, s.max_message_bytes, streams)
        api.add_to_server(service, self._server)
        names: tuple[str, ...] = (SERVICE_NAME,)
        tfs = None
        if s.tfserving_api:
            label = s.tfserving_version_label if s.backend == "tfserving" else None
            tfs = tfserving_api.add_to_server(self._server, self.metrics, label)
            names += (tfserving_api.PREDICTION_SERVICE, tfserving_api.MODEL_SERVICE)
        # the Open Inference Protocol (KServe v2): gRPC here, /v2/... on the HTTP port (service.frontends.oip.http_api)
        self._oip = oip_grpc.add_to_server(self._server, self.metrics, streams)
        self._oip.is_ready = lambda: self._model_serving and self._backend_state.ready
        self._http.oip = self._oip
        names += (oip_protos.SERVICE,)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if s.reflection:
            names += (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            # TF Serving's services are in service.protos.tfs's private pool, the protocol's in service.protos.oip's,
            # the others in the default one
            pool = tfs_protos._ReflectionPool(descriptor_pool.Default(), tfs_protos.POOL, oip_protos.POOL)
            reflection.enable_server_reflection(names, self._server, pool=pool)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.grpc_port = tls.bind_grpc(self._server, s)
        await self._server.start()
        log.info("gRPC on %s:%d, %s (NOT_SERVING while the model loads), metrics on %s://%s:%d/metrics",
                 s.host, self.grpc_port, tls.transport_summary(s), "https" if s.http_tls else "http", s.host,
                 self.http_port)  # fmt: skip

        self._backend = self.backend_factory(s)
        self._backend.metrics = self.metrics  # backends that count what they do (replicas, retries, versions)
        model = await self._backend.start()
        self._batcher = Batcher(
            self._backend.predict,
            BatcherConfig(s.max_batch_size, s.max_batch_delay_ms, s.max_concurrent_batches, s.max_queued_drawings,
                          s.backend_timeout_ms, s.max_queue_wait_ms, s.backend_wedged_after_timeouts),
            self.metrics,
            self._backend.name,
            # backends that can give top-k outputs alone
            run_top_k=self._backend.predict_top_k if self._backend.top_k_width else None,
            top_k_width=self._backend.top_k_width,
        )
        self._batcher.on_health = self._backend_health
        self._backend.on_failure = self._batcher.fail  # its background tasks (version watcher, status poller) died
        self._batcher.start()
        limits = Limits(s.max_drawings_per_request, s.max_top_k, s.max_strokes, s.max_points, s.max_raw_coordinate,
                        s.max_image_bytes, s.max_image_pixels, num_classes=len(model.labels),
                        max_jpeg_scans=s.max_jpeg_scans)
        decoder = self._decoder = WorkerPool(s.image_decode_workers, s.image_decode_budget_ms)
        await asyncio.to_thread(decoder.start)
        renderer = None
        if s.stroke_render_workers:
            renderer = self._renderer = WorkerPool(s.stroke_render_workers, s.stroke_render_budget_ms, "stroke_render")
            await asyncio.to_thread(renderer.start)
        if s.http_api:  # after the decoder: its forkserver preloads the decoder for every worker it forks
            self._json_parser = JsonParsePool(s.json_parse_workers)
            await asyncio.to_thread(self._json_parser.start)
            self._http.json_parser = self._json_parser
        self._gateway = DataPlane(model, self._batcher, limits, self.metrics, self._backend.name,
                                  s.preprocess_threads, decoder, s.max_preprocessing_calls,
                                  versionless=self._backend.versionless, renderer=renderer,
                                  max_answer_bytes=s.max_message_bytes)  # fmt: skip
        self._start_rollout(self._gateway)
        service.attach(self._gateway)
        if tfs is not None:
            tfs.attach(self._gateway, self._backend)  # GetModelMetadata answers with its signature_defs
        self._http.attach(self._gateway)
        self._oip.attach(self._gateway)
        await self._set_health(self._publish(model))
        self._backend.on_change = self._model_changed
        # Everything built so far (TensorFlow's and the model's objects: millions) lives as long as the process:
        # move it out of the collector's sight, or every full collection walks it all and holds the event
        # loop for ~150 ms (health checks measured waiting that long during a burst of new streams).
        gc.collect()
        gc.freeze()
        # The event loop shares the GIL with the preprocessing threads; each time it wakes (several times per gRPC
        # call) it waits for a busy thread to yield the GIL, up to the switch interval: 0.2 ms, not CPython's 5 ms.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.ready.set()
        log.info("serving %s versions %s (%d classes)", model.name, list(model.versions), len(model.labels))

    def _start_rollout(self, plane: DataPlane) -> None:
        """The canary split and the shadow (``service.dataplane.rollout``), when the settings or a rollout file
        ask for them; nothing on the call path otherwise."""
        s = self.settings
        plan = RolloutPlan.of(s.canary_split, s.shadow_version, s.shadow_fraction)
        if not plan.active and s.rollout_file is None:
            return
        backend, batcher = self._backend, self._batcher
        assert backend is not None and batcher is not None
        shadow = self._shadow = Shadow(
            functools.partial(backend.predict, attempts=1), batcher, self.metrics, s.shadow_max_queued_drawings,
            s.backend_timeout_ms / 1000.0, max_concurrent=s.shadow_max_concurrent_calls,
        )  # fmt: skip
        rollout = Rollout(self.metrics, shadow, s.routing_key_header)

        def apply(plan: RolloutPlan) -> None:
            rollout.apply(plan)
            backend.watch_labels(plan.labels)

        apply(plan)
        if s.rollout_file is not None:
            self._plan_file = PlanFile(s.rollout_file, apply, s.rollout_watch_s)
            self._plan_file.load()
            self._plan_file.start()
        shadow.start()
        plane.rollout = rollout

    def _install_loop_error_log(self) -> None:
        """Route the event loop's error reports (accept() failing, say) through a rate-limited log."""
        loop = asyncio.get_running_loop()
        rate = LogRate(log, interval_s=10.0, level=logging.ERROR)

        def report(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
            message = str(context.get("message", "event loop error"))
            exc = context.get("exception")
            rate.log(message, "event loop: %s%s", message, f": {exc!r}" if exc is not None else "")

        loop.set_exception_handler(report)

    def _publish(self, model: ModelDescription | None) -> int:
        """Serve ``model`` (None: no version is available): versions and gauges; returns the health status."""
        backend = self._backend.name if self._backend is not None else ""
        self.metrics.model_version.clear()
        if model is not None:
            if self._gateway is not None:
                self._gateway.model = model
            for v in model.versions:
                self.metrics.model_version.labels(model.name, str(v), backend).set(1)
            self._serve_health(model)
        self.metrics.ready.set(0 if model is None or self._stopping else 1)
        serving = model is not None and not self._stopping
        self._model_serving = serving
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    def _serve_health(self, model: ModelDescription) -> None:
        """Model health (``Metrics.health``) counts the served versions, each with its out-of-class threshold and
        its model card's validation distribution under ``model_dir`` (none: nothing to compare it with)."""
        references = {}
        for v in model.versions:
            try:
                references[v] = read_reference(self.settings.model_dir / str(v), model.labels)
            except ValueError as exc:
                log.warning("version %d: no validation distribution for model health: %s", v, exc)
                references[v] = None
        ood = model.out_of_class
        thresholds = {v: ood[v].threshold if v in ood else None for v in model.versions}
        self.metrics.health.serve(model.labels, thresholds, references)

    async def _set_health(self, status: int) -> None:
        """Readiness: ``status`` (the model's), NOT_SERVING while the batcher reports the backend not ready."""
        if not self._backend_state.ready:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    def _backend_health(self, state: BackendHealth) -> None:
        """The batcher's view of the backend changed (wedged, recovered, a background task died): readiness and
        liveness follow it, so an orchestrator stops routing to this replica, or restarts it."""
        self._backend_state = state
        if self._stopping:
            return
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

        async def apply() -> None:
            await self._set_health(serving if self._model_serving else not_serving)
            await self._health.set(LIVENESS_SERVICE, serving if self._backend_state.live else not_serving)

        task = asyncio.get_running_loop().create_task(apply())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _model_changed(self, model: ModelDescription | None) -> None:
        """The backend's versions changed (TF Serving loaded or unloaded one, or has none available)."""
        if not self._stopping:
            task = asyncio.get_running_loop().create_task(self._set_health(self._publish(model)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Health NOT_SERVING, stop accepting on both ports, finish in-flight calls, drain, close the backend.

        The whole stop is bounded by ``shutdown_grace_s`` (plus ``CLEANUP_S`` for the stages after the servers):
        each stage gets what is left, and one that overruns it is cancelled (the batcher's running batches, whose
        callers are gone by then, included). Threads are joined off the event loop, so stop never blocks it.
        What could not finish is named in ``left_behind``.
        """
        if self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        end = loop.time() + self.settings.shutdown_grace_s
        self.metrics.ready.set(0)
        await self._health.enter_graceful_shutdown()
        # Both ports stop accepting at once; their in-flight calls finish while the batcher still serves them.
        await asyncio.gather(self._stop_grpc(end), self._bounded("HTTP server", self._http.stop(), end))
        end = max(end, loop.time() + CLEANUP_S)
        if self._plan_file is not None:
            await self._plan_file.close()
        if self._shadow is not None:
            await self._bounded("shadow", self._shadow.close(), end)
        if self._batcher is not None:
            await self._bounded("batcher", self._batcher.close(), end)
        if self._gateway is not None:
            await self._bounded("preprocessing, decode and render pools", self._gateway.close(), end)
        else:
            for name, pool in (("decode pool", self._decoder), ("render pool", self._renderer)):
                if pool is not None:
                    await self._bounded(name, asyncio.to_thread(pool.close), end)
        if self._backend is not None:
            await self._bounded("backend", self._backend.close(), end)
        if self._json_parser is not None:
            await self._bounded("JSON parse pool", asyncio.to_thread(self._json_parser.close), end)
        log.info("stopped%s", f" (left behind: {', '.join(self.left_behind)})" if self.left_behind else "")

    async def _stop_grpc(self, end: float) -> None:
        """Stop the gRPC server: refuse new calls, give in-flight ones until ``end`` (loop time), cancel the rest."""
        if self._server is not None:
            await self._server.stop(max(0.0, end - asyncio.get_running_loop().time()))

    async def _bounded(self, stage: str, step: Awaitable[object], end: float) -> None:
        """Run one stop stage until ``end`` (loop time) at most; past it, cancel it and record it as left behind."""
        try:
            async with asyncio.timeout_at(end):
                await step
        except TimeoutError:
            log.warning("stop: %s did not finish within the shutdown grace period; left behind", stage)
            self.left_behind.append(stage)

    async def run(self, on_ready: Callable[[App], None] | None = None) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop in order.

        The signal handlers are installed before start: a signal while the model loads (or TF Serving is awaited)
        abandons the start at once and stops; ``left_behind`` then names what was still running (a model load
        in a thread cannot be interrupted: the caller exits without waiting for it, see ``quickdraw serve``).
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = loop.create_task(self.start(), name="gateway-start")
        signalled = loop.create_task(stop.wait(), name="gateway-signal")
        try:
            await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("signal received while starting: stopping (grace %.1fs)", self.settings.shutdown_grace_s)
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                self.left_behind.append("start")
                return
            starting.result()  # a start that failed raises here (after stop, below)
            if on_ready is not None:
                on_ready(self)
            await signalled
            log.info("signal received: draining (grace %.1fs)", self.settings.shutdown_grace_s)
        finally:
            starting.cancel()
            signalled.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
