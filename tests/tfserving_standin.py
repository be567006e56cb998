"""A STAND-IN for ``tensorflow_model_server``, for tests: the real TF Serving gRPC API over the real SavedModel.

The TF Serving binary is on no registry these machines reach, so tests run this instead. It is not a mock of
our gateway's expectations: it serves ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata)
and ``tensorflow.serving.ModelService`` (GetModelStatus) from the ``tensorflow-serving-api`` protos, runs every
SavedModel with TensorFlow, and follows TF Serving's own source (github.com/tensorflow/serving, read at commit
9d981c5c; TensorFlow core's batch scheduler read from the headers in the TF 2.21 wheel). Each behaviour, and the
file it follows:

- Flags (``tensorflow_serving/model_servers/main.cc``, defaults in ``server.h``): ``--port``,
  ``--rest_api_port``, ``--model_name``, ``--model_base_path``, ``--model_config_file``,
  ``--model_config_file_poll_wait_seconds`` (0: read once), ``--file_system_poll_wait_seconds`` (default 1),
  ``--enable_batching``, ``--batching_parameters_file``, ``--monitoring_config_file``,
  ``--allow_version_labels_for_unavailable_models``, ``--enable_model_warmup`` (default true),
  ``--num_request_iterations_for_warmup``, ``--grpc_max_threads``, ``--enable_serialization_as_tensor_content``.
  Stand-in-only flags start ``--standin_``. ``python tests/tfserving_standin.py --help`` lists them.
- Errors reach gRPC as ``ToGRPCStatus`` makes them (``model_servers/grpc_status_util.cc``): the TF status code
  as the gRPC code, the message cut at 1024 characters plus ``...TRUNCATED``.
- model_spec (``model_servers/server_core.cc`` ServableRequestFromModelSpec / GetModelVersionForLabel,
  ``core/basic_manager.cc``, ``core/manager.h``): no ``model_spec`` is INVALID_ARGUMENT ``Missing ModelSpec``;
  an empty name INVALID_ARGUMENT ``ModelSpec has no name specified.``; an unknown label INVALID_ARGUMENT
  ``Unrecognized servable version label: <label>``; a model, version or label's version that is not AVAILABLE
  NOT_FOUND ``Servable not found for request: Specific(<name>, <version>)`` (``Latest(<name>)`` without a
  version: the highest AVAILABLE version). Predict and GetModelMetadata honour ``version_label``.
- Predict (``servables/tensorflow/predict_impl.cc``, ``predict_util.cc``; ``tensorflow/cc/saved_model/util.cc``
  GetInputValues): an unknown signature is FAILED_PRECONDITION ``Serving signature key "<name>" not found.``;
  too many or too few inputs INVALID_ARGUMENT ``input size does not match signature: ...``; a signature input
  the request lacks (one sent under another name) INVALID_ARGUMENT ``Signature input alias: <alias>(feed name:
  <tensor>) not found in request and no default value provided. Inputs expected to be in the request {...}, or
  default input alias set: ...`` (TF 2.21's GetInputValues); a tensor whose content disagrees with its shape
  ``tensor parsing error: <alias>``; an unknown output_filter alias ``output tensor alias not found in signature:
  <alias> Outputs expected to be in the set
  {...}.``; a repeated one ``duplicate output tensor alias: <alias>``; a wrong dtype INVALID_ARGUMENT
  ``Expects arg[<i>] to be <want> but <got> is provided`` (the TF runtime's check); a wrong shape
  INVALID_ARGUMENT (TF's runtime message varies by op; the stand-in words its own). Outputs are answered in
  the typed fields (``float_val``, ``int_val``, ``string_val``...; TensorProto ``AsProtoField``, the default
  of ``internal::RunPredict``) unless ``--enable_serialization_as_tensor_content`` (``tensor_content``).
  The response's model_spec carries the request's name, the version served and the signature name.
- GetModelMetadata (``servables/tensorflow/get_model_metadata_impl.cc``): validates in this order: no
  model_spec (INVALID_ARGUMENT ``Missing ModelSpec``), no metadata_field (INVALID_ARGUMENT
  ``GetModelMetadataRequest must specify at least one metadata_field``), a field other than ``signature_def``
  (INVALID_ARGUMENT ``Metadata field <f> is not supported``), and only then the model (NOT_FOUND...). It
  answers the SavedModel's whole ``signature_def`` map (``__saved_model_init_op`` included) and a model_spec of
  name and version.
- GetModelStatus (``model_servers/get_model_status_impl.cc``, ``core/servable_state_monitor.h``): ignores
  ``version_label`` and ``signature_name``; with ``version`` it answers that version's state or NOT_FOUND
  ``Could not find version <v> of model <m>``; without, every version the state monitor has seen, highest
  first, in START / LOADING / AVAILABLE / UNLOADING / END (END entries stay: the monitor never forgets them),
  each with its load status, or NOT_FOUND ``Could not find any versions of model <m>``.
- Versions (``sources/storage_path/file_system_storage_path_source.cc``, ``core/aspired_versions_manager.cc``,
  ``core/availability_preserving_policy.cc``): the base path is polled every
  ``--file_system_poll_wait_seconds``; a child whose name is an integer is a version; the policy picks the
  aspired ones: ``latest {num_versions}`` (the default, 1), ``all``, ``specific {versions}``. A new version goes
  START -> LOADING -> AVAILABLE (loads run one at a time, highest first, as with ``--num_load_threads=0``); a
  version leaving the policy goes UNLOADING -> END, but not while it is the only AVAILABLE one and an aspired
  one is still loading (availability preserving). A failed load ends in END with its error as the status (the
  stand-in does not retry; TF Serving retries ``--max_num_load_retries`` times a minute apart).
- Warm-up (``servables/tensorflow/saved_model_warmup.cc``, ``saved_model_warmup_util.cc``): while LOADING, the
  PredictionLog records in ``<version>/assets.extra/tf_serving_warmup_requests`` (a TFRecord file, at most
  1000) are replayed (``--num_request_iterations_for_warmup`` times each); a failing one fails the load.
- Labels (``model_servers/server_core.cc`` UpdateModelVersionLabelMap): ``version_labels`` in the
  ``--model_config_file`` take effect when the config is (re)loaded. A label on a version that is not AVAILABLE
  is refused with FAILED_PRECONDITION ``Request to assign label to version <v> of model <m>, which is not
  currently available for inference`` - and as in TF Serving the label map is checked before the models are
  updated, so the whole reload is refused (logged; a later poll tries again) and a first config that labels a
  version not yet loaded fails the start. ``--allow_version_labels_for_unavailable_models`` lets a NEW label
  (not one moved to another version) point at a version that is not AVAILABLE; calls with it are NOT_FOUND
  until it is.
- Config file (``model_servers/server.cc`` PollFilesystemAndReloadConfig): text ``ModelServerConfig``
  (``model_config_list``: name, base_path, model_version_policy, version_labels), re-read every
  ``--model_config_file_poll_wait_seconds``; a file that fails to parse is logged and the old config stays.
- Batching (``servables/tensorflow/bundle_factory_util.h`` GetQueueOptions, ``batching/batching_session.cc``;
  TF core ``kernels/batching_util/shared_batch_scheduler.h``): with ``--enable_batching`` concurrent Predicts
  of one version, signature and output set are merged into one model call: ``max_batch_size`` (default 1000),
  ``batch_timeout_micros`` (default 0), ``max_enqueued_batches`` (default 10, counting the open batch),
  ``num_batch_threads`` (default: CPUs), ``allowed_batch_sizes`` (padded up with copies of the last task's first
  row; the last entry must equal max_batch_size). A request larger than max_batch_size is INVALID_ARGUMENT
  ``Task size <n> is larger than maximum input batch size <max>``; when it does not fit the open batch and
  max_enqueued_batches batches wait, UNAVAILABLE ``The batch scheduling queue to which this task was submitted
  is full; currently <k> batches enqueued and max_enqueued_batches is <max>`` (the non-splitting path: the repo's
  BatchingParameters schema has no enable_large_batch_splitting).
- Metrics (``util/prometheus_exporter.cc``, ``model_servers/http_server.cc``): with ``--rest_api_port`` and a
  ``--monitoring_config_file`` whose ``prometheus_config`` is enabled, Prometheus text at its ``path`` (default
  ``/monitoring/prometheus/metrics``), names with every character outside ``[a-zA-Z0-9_]`` made ``:``:
  ``:tensorflow:serving:request_count{model_name,status}`` (every Predict, OK or not, status as the code's
  name: ``servables/tensorflow/util.cc`` RecordModelRequestCount), ``:tensorflow:serving:request_latency`` and
  ``:tensorflow:serving:runtime_latency`` (microseconds, successful Predicts), and with batching
  ``:tensorflow:serving:batching_session:queuing_latency{thread_pool_name}`` (microseconds),
  ``...:wrapped_run_count``, ``...:input_batch_size``, ``...:processed_batch_size`` and
  ``...:padding_size{execution_batch_size}`` (``batching/batching_util.h``). The page is written as the
  exporter writes it (``# TYPE`` lines, counters without ``_total``, six-digit bucket limits), which
  prometheus-client's parser reads; prometheus-client's own writer would rename the counters ``*_total``.
  The REST predict API is not served (other paths answer 404).

Tests can stop it and restart it on the same port, make it slow (``delay_s``, per model call), make it fail
(``fail_code``), and read what it saw: every request's model spec and the deadline its caller gave it (``seen``).
Given ``credentials`` (``grpc.ssl_server_credentials``) it serves TLS, or mTLS when they require client
certificates, as ``tensorflow_model_server --ssl_config_file`` does. The Python API keeps its old defaults where
TF Serving's would break callers: every version under ``base_path`` is loaded before the constructor returns
(policy ``all``) and the base path is not polled unless ``file_system_poll_wait_seconds`` is given.

Run by hand: ``python tests/tfserving_standin.py --model_base_path=models/quickdraw --port=8500``.
"""

from __future__ import annotations

import argparse
import http.server
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

log = logging.getLogger("tfserving-standin")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repo's TF Serving schemas (quickdraw/tfserving_schema)
    sys.path.insert(0, str(ROOT))

from quickdraw.tfserving_schema import batching_parameters_pb2, monitoring_config_pb2  # noqa: E402

Code = grpc.StatusCode
VersionPolicy = file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy
State = get_model_status_pb2.ModelVersionStatus.State

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
#: ``ToGRPCStatus`` (model_servers/grpc_status_util.cc) cuts messages here.
MESSAGE_LIMIT_CHARS = 1024
#: ``saved_model_warmup_util.cc``: kMaxNumRecords.
WARMUP_MAX_RECORDS = 1000
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


class ServingError(Exception):
    """A TF Serving status: the gRPC code and message it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def grpc_message(message: str) -> str:
    """``ToGRPCStatus``: the message as it goes on the wire."""
    if len(message) > MESSAGE_LIMIT_CHARS:
        return message[:MESSAGE_LIMIT_CHARS] + "...TRUNCATED"
    return message


def code_name(code: grpc.StatusCode) -> str:
    """``error::Code_Name``: OK, INVALID_ARGUMENT, ..."""
    return code.name


def policy(kind: str = "latest", num_versions: int = 1, versions: Iterable[int] = ()) -> Any:
    """A ``ServableVersionPolicy``: ``latest`` (num_versions), ``all`` or ``specific`` (versions)."""
    p = VersionPolicy()
    if kind == "latest":
        p.latest.num_versions = num_versions
    elif kind == "all":
        p.all.SetInParent()
    elif kind == "specific":
        p.specific.versions.extend(versions)
    else:
        raise ValueError(f"unknown version policy {kind!r}")
    return p


def aspired_versions(children: Iterable[str], version_policy: Any) -> list[int]:
    """The versions ``file_system_storage_path_source.cc`` aspires to among a base path's children."""
    found = set()
    for name in children:
        try:
            found.add(int(name))  # absl::SimpleAtoi: "0007" is 7; "tmp-export" is not a version
        except ValueError:
            continue
    which = version_policy.WhichOneof("policy_choice")
    if which == "all":
        return sorted(found)
    if which == "specific":
        return sorted(found & set(version_policy.specific.versions))
    n = max(version_policy.latest.num_versions, 1) if which == "latest" else 1
    return sorted(found)[-n:]


# --- metrics -------------------------------------------------------------------------------------------------------
def exponential_buckets(scale: float, growth: float, count: int) -> list[float]:
    """``monitoring::Buckets::Exponential``: scale * growth**i for i < count (then +Inf)."""
    return [scale * growth**i for i in range(count)]


class _Sampler:
    """A ``monitoring::Sampler``: one histogram per label set."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], bounds: list[float]) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self.cells: dict[tuple[str, ...], list[float]] = {}
        self.lock = threading.Lock()

    def add(self, value: float, *label_values: str) -> None:
        with self.lock:
            cell = self.cells.setdefault(label_values, [0.0] * (len(self.bounds) + 2))  # buckets, +Inf, sum
            i = next((i for i, b in enumerate(self.bounds) if value < b), len(self.bounds))
            cell[i] += 1
            cell[-1] += value


class _Counter:
    """A ``monitoring::Counter``."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.cells: dict[tuple[str, ...], int] = {}
        self.lock = threading.Lock()

    def inc(self, *label_values: str) -> None:
        with self.lock:
            self.cells[label_values] = self.cells.get(label_values, 0) + 1


def prometheus_name(name: str) -> str:
    """``GetPrometheusMetricName`` (util/prometheus_exporter.cc): characters outside [a-zA-Z0-9_] become ':'."""
    out = "".join(c if c.isascii() and (c.isalnum() or c == "_") else ":" for c in name)
    return "_" + out if out[:1].isdigit() else out


class Metrics:
    """TF Serving's metrics this stand-in keeps, exported as its Prometheus exporter names them."""

    def __init__(self) -> None:
        latency = exponential_buckets(10, 1.8, 33)
        sizes = exponential_buckets(1, 2, 14)
        self.request_count = _Counter("/tensorflow/serving/request_count", "The total number of requests.",
                                      ("model_name", "status"))  # fmt: skip
        self.request_latency = _Sampler(
            "/tensorflow/serving/request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"), latency,
        )  # fmt: skip
        self.runtime_latency = _Sampler(
            "/tensorflow/serving/runtime_latency",
            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            ("model_name", "API", "runtime"), latency,
        )  # fmt: skip
        self.queuing_latency = _Sampler(
            "/tensorflow/serving/batching_session/queuing_latency",
            "Distribution of wall time spent (in microseconds) in queuing", ("thread_pool_name",),
            exponential_buckets(100, 1.2, 52),
        )  # fmt: skip
        self.wrapped_run_count = _Counter("/tensorflow/serving/batching_session/wrapped_run_count",
                                          "Total count of run calls on the wrapped session", ())  # fmt: skip
        self.input_batch_size = _Sampler("/tensorflow/serving/batching_session/input_batch_size",
                                         "Tracks the batch size distribution on the inputs.", (), sizes)  # fmt: skip
        self.processed_batch_size = _Sampler(
            "/tensorflow/serving/batching_session/processed_batch_size",
            "Tracks the batch size distribution on processing.", (), sizes,
        )  # fmt: skip
        self.padding_size = _Sampler("/tensorflow/serving/batching_session/padding_size",
                                     "Tracks the padding size distribution on batches.", ("execution_batch_size",),
                                     sizes)  # fmt: skip
        self.all: list[_Counter | _Sampler] = [
            self.request_count, self.request_latency, self.runtime_latency, self.queuing_latency,
            self.wrapped_run_count, self.input_batch_size, self.processed_batch_size, self.padding_size,
        ]  # fmt: skip

    def text(self) -> bytes:
        """The exposition ``PrometheusExporter::GeneratePage`` writes: ``# TYPE`` lines, labels in declared order,
        integer counters without ``_total``, histogram limits and sums as ``StrCat(double)`` (six significant
        digits). Written out here because prometheus-client's writer renames counters ``*_total``; the tests read
        it back with prometheus-client's parser.
        """
        lines: list[str] = []
        for m in self.all:
            name = prometheus_name(m.name)
            with m.lock:
                cells = dict(m.cells)
            if not cells:
                continue
            if isinstance(m, _Counter):
                lines.append(f"# TYPE {name} counter")
                for values, n in sorted(cells.items()):
                    lines.append(f"{name}{{{_labels(m.labels, values)}}} {n}")
                continue
            lines.append(f"# TYPE {name} histogram")
            for values, cell in sorted(cells.items()):
                labels = _labels(m.labels, values)
                prefix = f"{name}_bucket{{{labels}{',' if labels else ''}"
                cumulative = 0
                for i, n in enumerate(cell[:-1]):
                    cumulative += int(n)
                    le = f"{m.bounds[i]:.6g}" if i < len(m.bounds) else "+Inf"
                    lines.append(f'{prefix}le="{le}"}} {cumulative}')
                lines.append(f"{name}_sum{{{labels}}} {cell[-1]:.6g}")
                lines.append(f"{name}_count{{{labels}}} {cumulative}")
        return ("\n".join(lines) + "\n").encode()


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"')

    return ",".join(f'{n}="{esc(v)}"' for n, v in zip(names, values, strict=True))


# --- a loaded version ----------------------------------------------------------------------------------------------
class _Servable:
    """One SavedModel version, loaded with TensorFlow (its signature_def map read from saved_model.pb)."""

    def __init__(self, path: Path) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.path = path
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = proto.meta_graphs[0].signature_def
        self.loaded = tf.saved_model.load(str(path))

    def run(self, signature: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run one signature on numpy feeds; the outputs asked for, as numpy."""
        import tensorflow as tf

        fn = self.loaded.signatures[signature]
        result = fn(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: np.asarray(result[k].numpy()) for k in outputs}


@dataclass
class _Version:
    """A version as TF Serving's ServableStateMonitor sees it."""

    version: int
    path: Path
    state: str = START
    servable: _Servable | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    since_s: float = field(default_factory=time.monotonic)


# --- batching --------------------------------------------------------------------------------------------------------
@dataclass
class _Task:
    feeds: dict[str, np.ndarray]
    size: int
    enqueued_s: float
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, np.ndarray] | None = None
    error: ServingError | None = None


@dataclass
class _Queue:
    run: Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]
    outputs: list[str]
    batches: deque[list[_Task]] = field(default_factory=lambda: deque([[]]))
    open_since_s: float = field(default_factory=time.monotonic)


class Batcher:
    """TF Serving's batching session over TF core's SharedBatchScheduler (non-splitting queues)."""

    def __init__(self, params: Any, metrics: Metrics, delay: Callable[[], float]) -> None:
        def get(name: str, default: int) -> int:
            return int(getattr(params, name).value) if params.HasField(name) else default

        self.max_batch_size = get("max_batch_size", 1000)
        self.batch_timeout_s = get("batch_timeout_micros", 0) / 1e6
        self.max_enqueued_batches = get("max_enqueued_batches", 10)
        self.num_batch_threads = get("num_batch_threads", os.cpu_count() or 1)
        self.thread_pool_name = params.thread_pool_name.value if params.HasField("thread_pool_name") else (
            "batch_threads")  # fmt: skip
        self.allowed_batch_sizes = list(params.allowed_batch_sizes)
        if self.num_batch_threads <= 0:
            raise ValueError(f"num_batch_threads must be positive; was {self.num_batch_threads}")
        if self.allowed_batch_sizes and self.allowed_batch_sizes[-1] != self.max_batch_size:
            raise ValueError(
                "Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
                f"{self.allowed_batch_sizes[-1]}; expected {self.max_batch_size}"
            )
        self.metrics = metrics
        self.delay = delay
        self.queues: dict[Any, _Queue] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"{self.thread_pool_name}-{i}", daemon=True)
                        for i in range(self.num_batch_threads)]  # fmt: skip
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """Stop the batch threads (queued tasks fail UNAVAILABLE)."""
        with self.cond:
            self.closed = True
            for q in self.queues.values():
                for batch in q.batches:
                    for t in batch:
                        t.error = ServingError(Code.UNAVAILABLE, "Batching queue closed")
                        t.done.set()
                q.batches = deque([[]])
            self.cond.notify_all()

    def enqueued(self) -> int:
        """Tasks waiting in every queue."""
        with self.cond:
            return sum(len(b) for q in self.queues.values() for b in q.batches)

    def submit(self, key: Any, run: Any, outputs: list[str], feeds: dict[str, np.ndarray], size: int) -> _Task:
        """``Queue::Schedule`` -> ``ValidateBatchTaskQueueCapacity``: refuse or enqueue."""
        task = _Task(feeds, size, time.monotonic())
        for v in feeds.values():
            self.metrics.input_batch_size.add(v.shape[0])
            break
        with self.cond:
            q = self.queues.get(key)
            if q is None:
                q = self.queues[key] = _Queue(run, outputs)
            if size > self.max_batch_size:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"Task size {size} is larger than maximum input batch size {self.max_batch_size}",
                )
            tail = q.batches[-1]
            if sum(t.size for t in tail) + size > self.max_batch_size:
                if len(q.batches) >= self.max_enqueued_batches:
                    raise ServingError(
                        Code.UNAVAILABLE,
                        "The batch scheduling queue to which this task was submitted is full; currently "
                        f"{len(q.batches)} batches enqueued and max_enqueued_batches is {self.max_enqueued_batches}",
                    )
                q.batches.append([])
                q.open_since_s = task.enqueued_s
            if not q.batches[-1]:
                q.open_since_s = task.enqueued_s
            q.batches[-1].append(task)
            self.cond.notify()
        return task

    def _next(self) -> tuple[_Queue, list[_Task]] | None:
        """``Queue::ScheduleBatch``: a closed batch, or the open one when full or past its timeout."""
        while not self.closed:
            now, wake = time.monotonic(), None
            for q in self.queues.values():
                if len(q.batches) >= 2:
                    return q, q.batches.popleft()
                open_batch = q.batches[0]
                if not open_batch:
                    continue
                due = q.open_since_s + self.batch_timeout_s
                if sum(t.size for t in open_batch) >= self.max_batch_size or now >= due:
                    q.batches = deque([[]])
                    return q, open_batch
                wake = due if wake is None else min(wake, due)
            self.cond.wait(None if wake is None else max(wake - now, 0.0))
        return None

    def _work(self) -> None:
        while True:
            with self.cond:
                got = self._next()
            if got is None:
                return
            self._process(*got)

    def _process(self, q: _Queue, batch: list[_Task]) -> None:
        """``BatchingSession::ProcessBatch``: concatenate, pad to an allowed size, run once, split."""
        now = time.monotonic()
        for t in batch:
            self.metrics.queuing_latency.add((now - t.enqueued_s) * 1e6, self.thread_pool_name)
        size = sum(t.size for t in batch)
        padded = next((s for s in self.allowed_batch_sizes if s >= size), size)
        self.metrics.padding_size.add(padded - size, str(padded))
        self.metrics.processed_batch_size.add(padded)
        try:
            feeds = {}
            for key in batch[0].feeds:
                parts = [t.feeds[key] for t in batch]
                if padded > size:
                    parts.append(np.repeat(batch[-1].feeds[key][:1], padded - size, axis=0))
                feeds[key] = np.concatenate(parts)
            self.metrics.wrapped_run_count.inc()
            if (d := self.delay()) > 0:
                time.sleep(d)
            out = q.run(feeds, q.outputs)
            start = 0
            for t in batch:
                t.result = {k: v[start : start + t.size] for k, v in out.items()}
                start += t.size
        except ServingError as e:
            for t in batch:
                t.error = e
        except Exception as e:  # the model failed: every task in the batch gets TF's error
            for t in batch:
                t.error = ServingError(Code.INTERNAL, f"{type(e).__name__}: {e}")
        for t in batch:
            t.done.set()


# --- one model: its versions, policy and labels -------------------------------------------------------------------
class _Model:
    """One model_config: the source's aspired versions and the manager's lifecycle, one action at a time."""

    def __init__(self, owner: TFServingStandIn, name: str, base_path: Path, version_policy: Any) -> None:
        self.owner = owner
        self.name = name
        self.base_path = Path(base_path)
        self.policy = version_policy
        self.versions: dict[int, _Version] = {}  # the monitor: entries are never removed
        self.aspired: dict[int, Path] = {}
        self.manual: dict[int, Path] = {}  # add_version()
        self.suppressed: set[int] = set()  # remove_version()
        self.labels: dict[str, int] = {}
        self.lock = threading.RLock()

    def available(self) -> dict[int, _Servable]:
        """AVAILABLE versions and their servables."""
        with self.lock:
            return {v: x.servable for v, x in self.versions.items() if x.state == AVAILABLE and x.servable}

    def poll(self) -> None:
        """``FileSystemStoragePathSource::PollFileSystemAndInvokeCallback``: the aspired versions."""
        try:
            children = [p.name for p in self.base_path.iterdir() if p.is_dir()]
        except OSError as e:
            log.warning("could not list %s: %s", self.base_path, e)
            children = []
        found = {v: self.base_path / c for c in children for v in [_int(c)] if v is not None}
        aspired = {v: found[v] for v in aspired_versions(children, self.policy)}
        aspired.update(self.manual)
        for v in self.suppressed:
            aspired.pop(v, None)
        if not aspired:
            log.warning("No versions of servable %s found under base path %s", self.name, self.base_path)
        self.set_aspired(aspired)

    def set_aspired(self, aspired: dict[int, Path]) -> None:
        """``AspiredVersionsManager::SetAspiredVersions``: new ones enter START."""
        with self.lock:
            self.aspired = dict(aspired)
            for v, path in aspired.items():
                cur = self.versions.get(v)
                if cur is None or cur.state == END:
                    self.versions[v] = _Version(v, path)
                    self.owner._publish(self, v, START)

    def manage(self) -> bool:
        """``AvailabilityPreservingPolicy::GetNextAction`` then do it; False when there is nothing to do."""
        with self.lock:
            aspired = set(self.aspired)
            has_aspired = bool(aspired)
            has_aspired_serving = any(self.versions[v].state == AVAILABLE for v in aspired if v in self.versions)
            unaspired_serving = sorted(v for v, x in self.versions.items() if x.state == AVAILABLE and v not in aspired)
            # A version no longer aspired that never started loading just ends.
            for v, x in self.versions.items():
                if x.state == START and v not in aspired:
                    x.state = END
                    self.owner._publish(self, v, END)
            if unaspired_serving and (not has_aspired or has_aspired_serving or len(unaspired_serving) > 1):
                action, version = "unload", unaspired_serving[0]
            else:
                new = sorted(v for v in aspired if self.versions[v].state == START)
                if not new:
                    return False
                action, version = "load", new[-1]
            x = self.versions[version]
            x.state = UNLOADING if action == "unload" else LOADING
            self.owner._publish(self, version, x.state)
        if action == "unload":
            with self.lock:
                x.servable = None
                x.state = END
            self.owner._publish(self, version, END)
            return True
        try:
            servable = _Servable(x.path)
            if self.owner.load_seconds > 0:
                time.sleep(self.owner.load_seconds)
            if self.owner.enable_model_warmup:
                self.owner._warm_up(self, version, servable)
        except ServingError as e:
            x.error = (e.code, e.message)
        except Exception as e:
            x.error = (Code.UNKNOWN, f"{type(e).__name__}: {e}")
        with self.lock:
            if x.error is None:
                x.servable, x.state = servable, AVAILABLE
            else:
                log.error("Loading servable: {name: %s version: %d} failed: %s", self.name, version, x.error[1])
                x.state = END
        self.owner._publish(self, version, x.state)
        return True

    def settle(self) -> None:
        """Run the manager until it has nothing left to do."""
        while self.manage():
            pass


def _int(name: str) -> int | None:
    try:
        return int(name)
    except ValueError:
        return None


# --- the server ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One Predict as the stand-in received it."""

    model: str
    version: int | None
    version_label: str | None
    signature: str
    batch: int
    #: The caller's deadline on this process's monotonic clock (None when it gave none).
    deadline_s: float | None
    arrived_s: float
    #: The request's output_filter (empty: every output).
    outputs: tuple[str, ...] = ()


class TFServingStandIn:
    """See the module docstring. Use as a context manager, or start()/stop()/restart()."""

    def __init__(
        self,
        base_path: Path | None = None,
        model_name: str = "quickdraw",
        port: int = 0,
        version_labels: dict[str, int] | None = None,
        workers: int = 8,
        credentials: grpc.ServerCredentials | None = None,
        *,
        version_policy: Any = None,
        model_config: Any = None,
        model_config_file: Path | None = None,
        model_config_file_poll_wait_seconds: float = 0.0,
        file_system_poll_wait_seconds: float | None = None,
        poll_offset_seconds: float = 0.0,
        load_seconds: float = 0.0,
        delay_s: float = 0.0,
        batching_parameters: Any = None,
        rest_api_port: int | None = None,
        monitoring_config: Any = None,
        allow_version_labels_for_unavailable_models: bool = False,
        enable_model_warmup: bool = True,
        num_request_iterations_for_warmup: int = 0,
        enable_serialization_as_tensor_content: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        """Load the model(s) and wait until the first versions are AVAILABLE (or failed), as ServerCore does.

        ``base_path``/``model_name``: one model (policy ``version_policy``, default ``all`` here; the CLI's is
        TF Serving's ``latest 1``). ``model_config`` (a ModelServerConfig) or ``model_config_file`` instead:
        the models it lists. ``file_system_poll_wait_seconds`` None: no polling after the first look.
        ``batching_parameters`` (BatchingParameters): server-side batching, as ``--enable_batching``.
        ``rest_api_port`` with ``monitoring_config`` (MonitoringConfig): Prometheus metrics over HTTP.
        """
        self.port = port
        self.host = host
        self.workers = workers
        self.credentials = credentials
        self.delay_s = delay_s
        self.fail_code: grpc.StatusCode | None = None
        self.seen: list[Seen] = []
        self.load_seconds = load_seconds
        self.poll_offset_seconds = poll_offset_seconds
        self.file_system_poll_wait_seconds = file_system_poll_wait_seconds
        self.model_config_file = Path(model_config_file) if model_config_file else None
        self.model_config_file_poll_wait_seconds = model_config_file_poll_wait_seconds
        self.allow_version_labels_for_unavailable_models = allow_version_labels_for_unavailable_models
        self.enable_model_warmup = enable_model_warmup
        self.num_request_iterations_for_warmup = num_request_iterations_for_warmup
        self.tensor_content = enable_serialization_as_tensor_content
        self.rest_api_port = rest_api_port
        self.monitoring_config = monitoring_config
        self.metrics = Metrics()
        #: Warm-up records replayed per (model, version).
        self.warmup_records: dict[tuple[str, int], int] = {}
        #: Every (model, version, state) the state monitor published, in order, with its monotonic time.
        self.transitions: list[tuple[str, int, str, float]] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._http: http.server.ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._models: dict[str, _Model] = {}
        self.batcher = Batcher(batching_parameters, self.metrics, lambda: self.delay_s) if batching_parameters else None
        if self.model_config_file is not None:
            model_config = read_text_proto(self.model_config_file, model_server_config_pb2.ModelServerConfig())
        if model_config is not None:
            self.model_name = model_config.model_config_list.config[0].name
            self._config = model_config
            self.version_labels: dict[str, int] = {}
            # ServerCore::ReloadConfig: the labels are checked BEFORE the models are added, so a first config that
            # labels a version (not yet loaded) fails unless labels may point at unavailable versions.
            self.reload_config(model_config, first=True)
        else:
            if base_path is None:
                raise ValueError("give base_path, model_config or model_config_file")
            self.model_name = model_name
            self._config = None
            model = _Model(self, model_name, Path(base_path), version_policy or policy("all"))
            self._models[model_name] = model
            model.poll()
            model.settle()
            if not model.available():
                raise FileNotFoundError(f"no <version>/saved_model.pb could be loaded under {base_path}")
            # A live dict: tests move labels by assigning to it (the stand-in's shortcut for a config reload).
            self.version_labels = dict(version_labels or {})
            model.labels = self.version_labels
            self._check_labels(model, self.version_labels, {})

    # --- properties the tests read -------------------------------------------------------------------------------
    @property
    def base_path(self) -> Path:
        """The (first) model's base path."""
        return self._models[self.model_name].base_path

    @property
    def servables(self) -> dict[int, _Servable]:
        """The (first) model's AVAILABLE versions."""
        return self._models[self.model_name].available()

    def states(self, model: str | None = None) -> dict[int, str]:
        """Each version's state, as GetModelStatus would answer."""
        m = self._models[model or self.model_name]
        with m.lock:
            return {v: x.state for v, x in m.versions.items()}

    @property
    def target(self) -> str:
        """host:port to dial."""
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> TFServingStandIn:
        """Serve on ``port`` (a free one the first time if 0; the same one on restart)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_Models(self), server)
        address = f"{self.host}:{self.port}"
        if self.credentials is not None:
            bound = server.add_secure_port(address, self.credentials)
        else:
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"stand-in could not bind {address}")
        self.port = bound
        server.start()
        self._server = server
        if self.rest_api_port is not None and self._http is None:
            self._http = _http_server(self, self.host, self.rest_api_port)
            self.rest_api_port = self._http.server_address[1]
            self._spawn(self._http.serve_forever, "rest")
        self._stop.clear()
        if self.file_system_poll_wait_seconds and self.file_system_poll_wait_seconds > 0:
            self._spawn(self._poll_file_system, "fs-poll")
        if self.model_config_file is not None and self.model_config_file_poll_wait_seconds > 0:
            self._spawn(self._poll_config_file, "config-poll")
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stop serving; in-flight calls are cut off (grace None), as when the process dies."""
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []

    def close(self) -> None:
        """Stop, and stop the batch threads too."""
        self.stop()
        if self.batcher is not None:
            self.batcher.close()

    def restart(self) -> None:
        """Serve again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> TFServingStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=f"standin-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    # --- versions come and go, as TF Serving's file-system source makes them --------------------------------------
    def add_version(self, version: int, path: Path) -> None:
        """Load ``path`` as ``version`` (START -> LOADING -> AVAILABLE) now; it becomes the default if highest."""
        m = self._models[self.model_name]
        with m.lock:
            m.manual[version] = Path(path)
            m.suppressed.discard(version)
            m.set_aspired({**m.aspired, version: Path(path)})
        m.settle()

    def remove_version(self, version: int) -> None:
        """Unload ``version`` now (UNLOADING -> END; calls for it get NOT_FOUND from then on)."""
        m = self._models[self.model_name]
        with m.lock:
            m.manual.pop(version, None)
            m.suppressed.add(version)
            m.aspired.pop(version, None)
            x = m.versions.get(version)
            if x is None or x.state == END:
                return
            x.state = UNLOADING
            self._publish(m, version, UNLOADING)
            x.servable, x.state = None, END
            self._publish(m, version, END)

    def poll(self) -> None:
        """One file-system poll of every model, and the loads/unloads it starts (what the poll thread does)."""
        for m in list(self._models.values()):
            m.poll()
            m.settle()

    def _publish(self, model: _Model, version: int, state: str) -> None:
        model.versions[version].since_s = time.monotonic()
        with self._lock:
            self.transitions.append((model.name, version, state, time.monotonic()))
        log.info("model %s version %d: %s", model.name, version, state)

    def _poll_file_system(self) -> None:
        period = float(self.file_system_poll_wait_seconds or 0)
        wait = self.poll_offset_seconds if self.poll_offset_seconds > 0 else period
        while not self._stop.wait(wait):
            try:
                self.poll()
            except Exception:
                log.exception("file-system poll failed")
            wait = period

    def _poll_config_file(self) -> None:
        assert self.model_config_file is not None
        while not self._stop.wait(self.model_config_file_poll_wait_seconds):
            try:
                config = read_text_proto(self.model_config_file, model_server_config_pb2.ModelServerConfig())
            except Exception as e:
                log.error("Failed to read ModelServerConfig file: %s", e)
                continue
            try:
                self.reload_config(config)
            except ServingError as e:
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", e.message)

    # --- config ----------------------------------------------------------------------------------------------------
    def reload_config(self, config: Any, first: bool = False) -> None:
        """``ServerCore::ReloadConfig``: labels checked first (refusing the whole reload), then models updated."""
        if config.WhichOneof("config") != "model_config_list":
            raise ServingError(Code.INVALID_ARGUMENT, "Invalid ServerModelConfig")
        wanted = list(config.model_config_list.config)
        for mc in wanted:
            current = self._models.get(mc.name)
            self._check_labels(current, dict(mc.version_labels), current.labels if current else {}, mc.name)
        for mc in wanted:
            m = self._models.get(mc.name)
            pol = mc.model_version_policy if mc.HasField("model_version_policy") else policy("latest", 1)
            if m is None:
                m = self._models[mc.name] = _Model(self, mc.name, Path(mc.base_path), pol)
                m.labels = {}
            m.base_path, m.policy = Path(mc.base_path), pol
            m.labels.clear()
            m.labels.update(mc.version_labels)
        names = {mc.name for mc in wanted}
        for name, m in self._models.items():
            if name not in names:  # a model dropped from the config: every version unloads
                m.base_path = Path("/nonexistent")
                m.manual.clear()
        if self.model_name in self._models:
            self.version_labels = self._models[self.model_name].labels
        self.poll()
        if first and not any(m.available() for m in self._models.values()):
            raise FileNotFoundError("no model version could be loaded")

    def _check_labels(self, model: _Model | None, labels: dict[str, int], old: dict[str, int],
                      name: str | None = None) -> None:  # fmt: skip
        """``ServerCore::UpdateModelVersionLabelMap``."""
        name = name or (model.name if model else "")
        available = set(model.available()) if model else set()
        for label, version in labels.items():
            allow = self.allow_version_labels_for_unavailable_models and not (label in old and old[label] != version)
            if not allow and version not in available:
                raise ServingError(
                    Code.FAILED_PRECONDITION,
                    f"Request to assign label to version {version} of model {name}, "
                    "which is not currently available for inference",
                )

    # --- model_spec resolution, as TF Serving does it ----------------------------------------------------------------
    def lookup(self, spec: Any) -> tuple[_Model, int, _Servable]:
        """``ServerCore::GetServableHandle``: the version a model_spec names, or TF Serving's error."""
        if not spec.name:
            raise ServingError(Code.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        model = self._models.get(spec.name)
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            labels = model.labels if model else {}
            if spec.version_label not in labels:
                raise ServingError(Code.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}")
            version: int | None = labels[spec.version_label]
        elif choice == "version":
            version = spec.version.value
        else:
            version = None
        available = model.available() if model else {}
        if version is None:
            if not available:
                raise ServingError(Code.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            version = max(available)
        if version not in available:
            raise ServingError(Code.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {version})")
        assert model is not None
        return model, version, available[version]

    # --- Predict -----------------------------------------------------------------------------------------------------
    def predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext | None = None,
                warmup: tuple[_Model, int, _Servable] | None = None) -> predict_pb2.PredictResponse:  # fmt: skip
        """``TensorflowPredictor::Predict`` + ``internal::RunPredict``; raises ServingError."""
        import tensorflow as tf

        if not request.HasField("model_spec"):
            raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        model, version, servable = warmup or self.lookup(spec)
        if warmup is None:
            arrived, deadline = time.monotonic(), _deadline(context)
            batch = request.inputs["image"].tensor_shape.dim[0].size if "image" in request.inputs else 0
            with self._lock:
                self.seen.append(
                    Seen(spec.name, spec.version.value if spec.HasField("version") else None,
                         spec.version_label or None, spec.signature_name, batch, deadline, arrived,
                         tuple(request.output_filter))
                )  # fmt: skip
            if self.batcher is None and self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_code is not None:
                raise ServingError(self.fail_code, "stand-in: injected failure")
        name = spec.signature_name or "serving_default"
        if name not in servable.signature_defs:
            raise ServingError(Code.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        sig = servable.signature_defs[name]
        feeds = self._inputs(sig, request)
        wanted = self._outputs(sig, request)
        t0 = time.monotonic()
        if self.batcher is not None and warmup is None and feeds:
            sizes = {v.shape[0] if v.ndim else 0 for v in feeds.values()}
            size = sizes.pop() if len(sizes) == 1 else 0
            key = (model.name, version, name, tuple(wanted),
                   tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(feeds.items())))  # fmt: skip
            task = self.batcher.submit(key, lambda f, o: servable.run(name, f, o), wanted, feeds, size)
            task.done.wait()
            if task.error is not None:
                raise task.error
            assert task.result is not None
            outputs = task.result
        else:
            try:
                outputs = servable.run(name, feeds, wanted)
            except tf.errors.OpError as e:
                raise ServingError(Code(_tf_code(e)), e.message) from e
        if warmup is None:
            self.metrics.runtime_latency.add((time.monotonic() - t0) * 1e6, spec.name, "Predict", "TF1")
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = spec.name
        resp.model_spec.version.value = version
        resp.model_spec.signature_name = name
        for key in wanted:
            resp.outputs[key].CopyFrom(tensor_proto(outputs[key], self.tensor_content))
        return resp

    @staticmethod
    def _inputs(sig: Any, request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
        """``VerifyRequestInputsSize`` and ``GetInputValues``, then the runtime's dtype and shape checks."""
        import tensorflow as tf

        req, want = set(request.inputs), set(sig.inputs)
        if len(req) > len(want) or (len(req) < len(want) and not sig.defaults):
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"input size does not match signature: {len(req)}!={len(want)} len({{{','.join(sorted(req))}}}) != "
                f"len({{{','.join(sorted(want))}}}). Sent extra: {{{','.join(sorted(req - want))}}}. "
                f"Missing but required: {{{','.join(sorted(want - req))}}}.",
            )
        feeds: dict[str, np.ndarray] = {}
        for alias, info in sorted(sig.inputs.items()):  # GetInputValues: every signature input, from the request
            if alias not in request.inputs and alias not in sig.defaults:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"Signature input alias: {alias}(feed name: {info.name}) not found in request and no default "
                    f"value provided. Inputs expected to be in the request {{{','.join(sorted(request.inputs))}}}, "
                    f"or default input alias set: {','.join(sorted(sig.defaults))}",
                )
        for alias in sorted(request.inputs):
            try:
                feeds[alias] = tf.make_ndarray(request.inputs[alias])
            except Exception as e:
                raise ServingError(Code.INVALID_ARGUMENT, f"tensor parsing error: {alias}") from e
        for i, (alias, info) in enumerate(sorted(sig.inputs.items())):
            if alias not in feeds:
                continue
            tensor = request.inputs[alias]
            if tensor.dtype != info.dtype:
                want_t = _dtype_name(info.dtype)
                got = _dtype_name(tensor.dtype) if tensor.dtype else "invalid"
                raise ServingError(Code.INVALID_ARGUMENT, f"Expects arg[{i}] to be {want_t} but {got} is provided")
            shape = feeds[alias].shape
            want_shape = [d.size for d in info.tensor_shape.dim]
            if not info.tensor_shape.unknown_rank and (
                len(shape) != len(want_shape) or any(w not in (-1, g) for w, g in zip(want_shape, shape, strict=True))
            ):
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"input {alias!r} has shape {list(shape)}; the signature expects {want_shape} "
                    "(stand-in wording: TF's runtime error text depends on the op that trips)",
                )
        return feeds

    @staticmethod
    def _outputs(sig: Any, request: predict_pb2.PredictRequest) -> list[str]:
        """``PreProcessPrediction``: the output_filter, checked; empty means every output."""
        seen: list[str] = []
        for alias in request.output_filter:
            if alias not in sig.outputs:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                    f"{{{','.join(sorted(sig.outputs))}}}.",
                )
            if alias in seen:
                raise ServingError(Code.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return seen or list(sig.outputs)

    def _warm_up(self, model: _Model, version: int, servable: _Servable) -> None:
        """``RunSavedModelWarmup``: replay assets.extra/tf_serving_warmup_requests (PredictLog records)."""
        path = servable.path / WARMUP_FILE
        if not path.exists():
            log.info("No warmup data file found at %s", path)
            return
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        records = 0
        for raw in tf.data.TFRecordDataset(str(path)):
            records += 1
            if records > WARMUP_MAX_RECORDS:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    f"Number of warmup records exceeds the maximum ({WARMUP_MAX_RECORDS}) at {path}",
                )
            entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            if entry.WhichOneof("log_type") != "predict_log":
                raise ServingError(
                    Code.UNIMPLEMENTED, f"Unsupported log_type for warmup: {entry.WhichOneof('log_type')}"
                )
            for _ in range(max(self.num_request_iterations_for_warmup, 1)):
                self.predict(entry.predict_log.request, None, warmup=(model, version, servable))
            self.warmup_records[(model.name, version)] = records
        log.info("Finished reading warmup data for model at %s. Number of warmup records read: %d.", path, records)

    # --- GetModelMetadata / GetModelStatus ----------------------------------------------------------------------------
    def get_model_metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
                           ) -> get_model_metadata_pb2.GetModelMetadataResponse:  # fmt: skip
        """``GetModelMetadataImpl::GetModelMetadata``; raises ServingError."""
        if not request.HasField("model_spec"):
            raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise ServingError(
                Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for f in request.metadata_field:
            if f != "signature_def":
                raise ServingError(Code.INVALID_ARGUMENT, f"Metadata field {f} is not supported")
        model, version, servable = self.lookup(request.model_spec)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        for k, v in servable.signature_defs.items():
            sigs.signature_def[k].CopyFrom(v)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = model.name
        resp.model_spec.version.value = version
        resp.metadata["signature_def"].Pack(sigs)
        return resp

    def get_model_status(self, request: get_model_status_pb2.GetModelStatusRequest
                         ) -> get_model_status_pb2.GetModelStatusResponse:  # fmt: skip
        """``GetModelStatusImpl::GetModelStatus``; raises ServingError."""
        if not request.HasField("model_spec"):
            raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        model = self._models.get(spec.name)
        versions = {}
        if model is not None:
            with model.lock:
                versions = {v: (x.state, x.error) for v, x in model.versions.items()}
        if spec.HasField("version"):
            v = spec.version.value
            if v not in versions:
                raise ServingError(Code.NOT_FOUND, f"Could not find version {v} of model {spec.name}")
            chosen = [v]
        else:
            if not versions:
                raise ServingError(Code.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            chosen = sorted(versions, reverse=True)
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in chosen:
            state, error = versions[v]
            status = resp.model_version_status.add(version=v, state=getattr(State, state))
            status.status.SetInParent()  # ToStatusProto(health): always present, error_code OK when healthy
            if error is not None:
                status.status.error_code = error[0].value[0]
                status.status.error_message = error[1]
        return resp


def _dtype_name(dtype: int) -> str:
    """``DataTypeString``: TF's C++ name of a DataType (float, double, half, uint8...)."""
    import tensorflow as tf

    name = tf.dtypes.as_dtype(dtype).name
    return {"float32": "float", "float64": "double", "float16": "half"}.get(name, name)


def _tf_code(e: Any) -> Any:
    """The grpc.StatusCode value tuple of a tf.errors.OpError's code."""
    for c in Code:
        if c.value[0] == e.error_code:
            return c.value
    return Code.UNKNOWN.value


def tensor_proto(value: np.ndarray, as_tensor_content: bool = False) -> Any:
    """A TensorProto as TF Serving writes outputs: typed fields (``AsProtoField``) or ``tensor_content``."""
    import tensorflow as tf

    if as_tensor_content or (value.dtype.kind == "f" and value.dtype.itemsize == 2):
        return tf.make_tensor_proto(value)
    dtype = tf.dtypes.as_dtype(value.dtype if value.dtype.kind not in "OSU" else tf.string)
    proto = tf.make_tensor_proto([], dtype=dtype)  # dtype only; shape and values below
    proto.ClearField("tensor_shape")
    for d in value.shape:
        proto.tensor_shape.dim.add(size=d)
    flat = value.ravel()
    kind = value.dtype
    if kind == np.float32:
        proto.float_val.extend(flat.tolist())
    elif kind == np.float64:
        proto.double_val.extend(flat.tolist())
    elif kind in (np.int32, np.int16, np.int8, np.uint8, np.uint16):
        proto.int_val.extend(flat.tolist())
    elif kind == np.int64:
        proto.int64_val.extend(flat.tolist())
    elif kind == np.uint32:
        proto.uint32_val.extend(flat.tolist())
    elif kind == np.uint64:
        proto.uint64_val.extend(flat.tolist())
    elif kind == np.bool_:
        proto.bool_val.extend(flat.tolist())
    elif kind.kind in "OSU":
        proto.string_val.extend(x if isinstance(x, bytes) else str(x).encode() for x in flat)
    else:
        return tf.make_tensor_proto(value)
    return proto


def _deadline(context: grpc.ServicerContext | None) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining


def read_text_proto(path: Path, message: Any) -> Any:
    """A text-format protobuf file (``ParseProtoTextFile``)."""
    text_format.Parse(Path(path).read_text(), message)
    return message


class _Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, standin: TFServingStandIn) -> None:
        self.s = standin

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        t0 = time.monotonic()
        try:
            resp = self.s.predict(request, context)
        except ServingError as e:
            self.s.metrics.request_count.inc(request.model_spec.name, code_name(e.code))
            context.abort(e.code, grpc_message(e.message))
        self.s.metrics.request_count.inc(request.model_spec.name, "OK")
        self.s.metrics.request_latency.add((time.monotonic() - t0) * 1e6, request.model_spec.name, "Predict", "GRPC")
        return resp

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            return self.s.get_model_metadata(request)
        except ServingError as e:
            context.abort(e.code, grpc_message(e.message))


class _Models(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, standin: TFServingStandIn) -> None:
        self.s = standin

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            return self.s.get_model_status(request)
        except ServingError as e:
            context.abort(e.code, grpc_message(e.message))


def _http_server(standin: TFServingStandIn, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """``CreateAndStartHttpServer``: Prometheus at the monitoring config's path when enabled; else 404."""
    cfg = standin.monitoring_config
    path = None
    if cfg is not None and cfg.prometheus_config.enable:
        path = cfg.prometheus_config.path or "/monitoring/prometheus/metrics"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if path is not None and self.path.split("?")[0] == path:
                body, status, ctype = standin.metrics.text(), 200, "text/plain; version=0.0.4"
            else:
                body = b'{ "error": "Malformed request: GET ' + self.path.encode() + b'" }'
                status, ctype = 404, "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


# --- the command line, as tensorflow_model_server's -------------------------------------------------------------------
def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def parser() -> argparse.ArgumentParser:
    """tensorflow_model_server's flags (main.cc), plus --standin_* ones."""
    p = argparse.ArgumentParser(
        prog="tfserving_standin.py",
        description="A stand-in for tensorflow_model_server (tests and local runs only): TF Serving's gRPC API "
        "over real SavedModels. Flags are tensorflow_model_server's (--flag=value or --flag value); "
        "--standin_* flags are this stand-in's own.",
    )
    a = p.add_argument
    flag = {"nargs": "?", "const": True, "type": _bool, "default": False}
    a("--port", type=int, default=8500, help="gRPC port (default 8500; 0 here picks a free one and prints it)")
    a(
        "--rest_api_port",
        type=int,
        default=0,
        help="HTTP port (0: none). Serves only the Prometheus metrics of --monitoring_config_file; no REST predict",
    )
    a("--model_name", default="default", help="name of the model (ignored with --model_config_file)")
    a("--model_base_path", type=Path, help="directory of <version>/ SavedModels (unless --model_config_file)")
    a(
        "--model_config_file",
        type=Path,
        help="text ModelServerConfig: the models, their base paths, model_version_policy and version_labels",
    )
    a(
        "--model_config_file_poll_wait_seconds",
        type=float,
        default=0,
        help="re-read --model_config_file this often (0: read once at start)",
    )
    a(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1,
        help="poll the base paths for new/removed versions this often (default 1; 0: once at start)",
    )
    a("--enable_batching", **flag, help="merge concurrent Predicts into batches (server-side batching)")
    a(
        "--batching_parameters_file",
        type=Path,
        help="text BatchingParameters: max_batch_size, batch_timeout_micros, max_enqueued_batches, "
        "num_batch_threads, allowed_batch_sizes",
    )
    a(
        "--monitoring_config_file",
        type=Path,
        help="text MonitoringConfig; prometheus_config { enable: true path: ... } serves metrics on --rest_api_port",
    )
    a(
        "--allow_version_labels_for_unavailable_models",
        **flag,
        help="allow a new version label to point at a version that is not AVAILABLE yet",
    )
    a(
        "--enable_model_warmup",
        nargs="?",
        const=True,
        type=_bool,
        default=True,
        help="replay <version>/assets.extra/tf_serving_warmup_requests while loading (default true)",
    )
    a("--num_request_iterations_for_warmup", type=int, default=0, help="times each warm-up record runs (if > 0)")
    a("--grpc_max_threads", type=int, default=4 * (os.cpu_count() or 1), help="gRPC handler threads (4 x CPUs)")
    a(
        "--enable_serialization_as_tensor_content",
        **flag,
        help="answer Predict outputs in tensor_content instead of the typed *_val fields",
    )
    a(
        "--standin_load_seconds",
        type=float,
        default=0.0,
        help="STAND-IN: extra seconds each version spends LOADING (a big model)",
    )
    a(
        "--standin_poll_offset_seconds",
        type=float,
        default=0.0,
        help="STAND-IN: when the first periodic file-system poll happens (so replicas poll out of step)",
    )
    a("--standin_delay_ms", type=float, default=0.0, help="STAND-IN: sleep this long per model call (a slow GPU)")
    a("--standin_host", default="127.0.0.1", help="STAND-IN: address to bind (default 127.0.0.1)")
    # The stand-in's old spellings, kept for callers on other branches.
    a("--model-base-path", dest="model_base_path", type=Path, help=argparse.SUPPRESS)
    a("--model-name", dest="model_name", help=argparse.SUPPRESS)
    a("--delay-ms", dest="standin_delay_ms", type=float, help=argparse.SUPPRESS)
    return p


def from_args(args: argparse.Namespace) -> TFServingStandIn:
    """A stand-in configured as tensorflow_model_server would be by these flags."""
    batching = None
    if args.enable_batching:
        batching = batching_parameters_pb2.BatchingParameters()
        if args.batching_parameters_file:
            read_text_proto(args.batching_parameters_file, batching)
    monitoring = None
    if args.monitoring_config_file:
        monitoring = read_text_proto(args.monitoring_config_file, monitoring_config_pb2.MonitoringConfig())
    common: dict[str, Any] = {
        "port": args.port,
        "workers": args.grpc_max_threads,
        "file_system_poll_wait_seconds": args.file_system_poll_wait_seconds,
        "poll_offset_seconds": args.standin_poll_offset_seconds,
        "load_seconds": args.standin_load_seconds,
        "delay_s": args.standin_delay_ms / 1000.0,
        "batching_parameters": batching,
        "rest_api_port": args.rest_api_port or None,
        "monitoring_config": monitoring,
        "allow_version_labels_for_unavailable_models": args.allow_version_labels_for_unavailable_models,
        "enable_model_warmup": args.enable_model_warmup,
        "num_request_iterations_for_warmup": args.num_request_iterations_for_warmup,
        "enable_serialization_as_tensor_content": args.enable_serialization_as_tensor_content,
        "host": args.standin_host,
    }
    if args.model_config_file:
        return TFServingStandIn(model_config_file=args.model_config_file,
                                model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
                                **common)  # fmt: skip
    if not args.model_base_path:
        raise SystemExit("give --model_base_path (or --model_config_file)")
    # main.cc builds a one-model config; ModelConfig's default version policy is latest { num_versions: 1 }.
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name=args.model_name, base_path=str(Path(args.model_base_path).resolve()),
                                        model_platform="tensorflow")  # fmt: skip
    return TFServingStandIn(model_config=config, **common)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        standin = from_args(args)
    except ServingError as e:
        print(f"tfserving stand-in: failed to start: {code_name(e.code)}: {e.message}", file=sys.stderr, flush=True)
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with standin:
        names = ",".join(standin._models)
        print(f"tfserving stand-in: serving {names} on {standin.target}", flush=True)
        if standin.rest_api_port:
            print(f"tfserving stand-in: HTTP on {standin.host}:{standin.rest_api_port}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
