"""``make rehearsal``: the production topology on one machine, real processes, under open-loop load.

What runs, all on 127.0.0.1 free ports:

- 3 TF Serving stand-ins (tests/tfserving_standin.py, with tensorflow_model_server's flags) on ONE shared model
  directory (a temp copy of models/quickdraw/1 as version 1), each with its OWN model config file (the text
  ModelServerConfig of deploy/tfserving/models.config plus ``version_labels { key: "stable" }``) polled every
  few seconds, batching with deploy/tfserving/batching.config, and different file-system poll phases;
- 2 gateways (``quickdraw serve --backend tfserving --tfserving-target ipv4:A,B,C``), with the environment of
  deploy/k8s/base/gateway-deployment.yaml where it matters here, behind a stand-in for a Kubernetes Service:
  each client connection goes to one ready gateway; a gateway leaving the endpoints (as a terminating pod does,
  before its preStop sleep ends and SIGTERM arrives) sends its clients' next calls to another one;
- the real Prometheus (Debian's ``prometheus``; skipped with --no-prometheus) scraping both gateways and the 3
  stand-ins every second, with deploy/prometheus/rules loaded and static targets labelled ``namespace`` and
  ``pod`` as deploy/prometheus/prometheus.yml's relabelling labels them in Kubernetes;
- open-loop load throughout: calls due at a fixed rate whatever happens, each with a deadline; mostly
  versionless Classify calls, and every --pinned-every'th call pinned to version 2.

Events, in turn, while the load runs: steady; roll out version 2 (copied beside the shared directory's
versions under a temporary name, then os.rename, as the trainer's export does); move the ``stable`` label from
1 to 2 one replica at a time; roll back (``stable`` back to 1 on every replica, then version 2 removed); SIGKILL
one replica and restart it; take one gateway out of the Service, SIGTERM it after a preStop sleep, and start a
new one (added to the Service once ready).

Every call is counted by status code under the event during which it was SENT. A call is **lost** when it has
no answer by its deadline plus 100 ms (tests/faults.py's definition). Backend attempts per client call come
from the stand-ins' ``:tensorflow:serving:request_count`` (summed over replicas, resets on restart handled).
The table is printed and, unless --no-write, written into RELIABILITY.md's section "Production-topology
rehearsal". --short is the shorter variant tests/test_rehearsal.py runs.

With --autoscaling, the HPAs' prometheus-adapter queries are evaluated during a stepped load and the Kubernetes
HPA algorithm (scripts/hpa.py) turns them into desired replica counts (deploy/README.md "Autoscaling
evidence"). With --batching, a grid of gateway batching settings is measured (deploy/README.md "Batching: two
layers, tuned by measurement").
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from faults import LATE_S, Gateway, Process, free_port  # noqa: E402
from harness import parse_metrics  # noqa: E402

from quickdraw_client.v1 import classifier_pb2 as pb  # noqa: E402
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402
from service.protos import tfs  # noqa: E402

DEPLOY = ROOT / "deploy"
MODEL_NAME = "quickdraw"
NAMESPACE = "quickdraw"
REQUEST_COUNT = ":tensorflow:serving:request_count"
SECTION = "## Production-topology rehearsal"


_BAR: Any = None  # the live tqdm bar while the load runs on a terminal


def say(msg: str) -> None:
    """One progress line, with the time (above the live bar when there is one)."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    if _BAR is not None:
        _BAR.write(line)
    else:
        print(line, flush=True)


@contextlib.contextmanager
def live_progress(load: Load, phases: list[Phase]) -> Iterator[None]:
    """A tqdm line (calls sent, failed, lost, the current phase) while the load runs; only on a terminal."""
    global _BAR
    if not sys.stdout.isatty():
        yield
        return
    from tqdm import tqdm

    stop = threading.Event()
    _BAR = tqdm(unit=" calls", desc="rehearsal", dynamic_ncols=True)

    def tick() -> None:
        while not stop.wait(0.5):
            calls = list(load.calls)
            _BAR.n = load.sent
            _BAR.set_postfix(phase=phases[-1].name if phases else "-", failed=sum(c.code != "OK" for c in calls),
                             lost=sum(c.code == "LOST" for c in calls), refresh=True)  # fmt: skip

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(2)
        _BAR.close()
        _BAR = None


# --- the model directory and the stand-in replicas ----------------------------------------------------------


def model_config_text(base_path: Path, stable: int) -> str:
    """deploy/tfserving/models.config with this base path and ``version_labels { key: "stable" }``."""
    text = (DEPLOY / "tfserving" / "models.config").read_text()
    text, n = re.subn(r'base_path:\s*"[^"]*"', f'base_path: "{base_path}"', text)
    assert n == 1, "deploy/tfserving/models.config: expected one base_path"
    text, n = re.subn(r'(model_platform:\s*"[^"]*"\n)', rf'\1    version_labels {{ key: "stable" value: {stable} }}\n',
                      text)  # fmt: skip
    assert n == 1, "deploy/tfserving/models.config: expected one model_platform"
    return text


class Replica:
    """One TF Serving stand-in process with its own model config file; SIGKILL and restart keep its ports."""

    def __init__(self, name: str, workdir: Path, base_path: Path, poll_offset_s: float, config_poll_s: float,
                 fs_poll_s: float, extra: tuple[str, ...] = (),
                 standin: Path = ROOT / "tests" / "tfserving_standin.py") -> None:  # fmt: skip
        self.name = name
        self.port = free_port()
        self.rest_port = free_port()
        self.config = workdir / f"{name}.models.config"
        self.base_path = base_path
        self.stable = 1
        self.args = [
            sys.executable, str(standin),
            f"--port={self.port}", f"--rest_api_port={self.rest_port}",
            f"--model_config_file={self.config}",
            f"--model_config_file_poll_wait_seconds={config_poll_s:g}",
            f"--file_system_poll_wait_seconds={fs_poll_s:g}",
            "--enable_batching=true", f"--batching_parameters_file={DEPLOY / 'tfserving' / 'batching.config'}",
            f"--monitoring_config_file={DEPLOY / 'tfserving' / 'monitoring.config'}",
            # `stable` names version 1 at start, before it is loaded: TF Serving refuses that without this flag.
            "--allow_version_labels_for_unavailable_models=true",
            f"--standin_poll_offset_seconds={poll_offset_s:g}", *extra,
        ]  # fmt: skip
        self.write_config(1)
        self.proc: Process | None = None

    @property
    def target(self) -> str:
        """host:port of its gRPC API."""
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Its Prometheus endpoint (monitoring.config's path on the REST port)."""
        return f"http://127.0.0.1:{self.rest_port}/monitoring/prometheus/metrics"

    def start(self) -> Replica:
        """Start the process and wait for its 'serving' line."""
        self.proc = Process(self.args, ready=r"tfserving stand-in: .* on 127\.0\.0\.1:\d+", timeout_s=180)
        return self

    def write_config(self, stable: int) -> None:
        """Point ``stable`` at ``stable`` in this replica's config file (written whole, then renamed)."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(model_config_text(self.base_path, stable))
        os.replace(tmp, self.config)
        self.stable = stable

    def kill(self) -> None:
        """SIGKILL, as when its node dies."""
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.proc.terminate()
            try:
                self.proc.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def request_count(self) -> float | None:
        """Its ``:tensorflow:serving:request_count``, summed over labels: 0 before its first request (a labelled
        counter has no series until then); None when its metrics page does not answer."""
        try:
            text = urllib.request.urlopen(self.metrics_url, timeout=2).read().decode()
        except OSError:
            return None
        names = (REQUEST_COUNT, REQUEST_COUNT + "_total")
        return sum(v for k, v in parse_metrics(text).items() if k.split("{")[0] in names)

    def status(self, timeout_s: float = 2.0) -> tuple[set[int], int | None]:
        """(AVAILABLE versions, the version ``stable`` resolves to) as the replica answers them now."""
        with grpc.insecure_channel(self.target) as ch:
            req = tfs.GetModelStatusRequest()
            req.model_spec.name = MODEL_NAME
            resp = tfs.ModelServiceStub(ch).GetModelStatus(req, timeout=timeout_s)
            available = {s.version for s in resp.model_version_status if s.state == tfs.AVAILABLE}
            meta = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
            meta.model_spec.name = MODEL_NAME
            meta.model_spec.version_label = "stable"
            try:
                stable = (
                    tfs.PredictionServiceStub(ch).GetModelMetadata(meta, timeout=timeout_s).model_spec.version.value
                )
            except grpc.RpcError:
                stable = None
        return available, stable

    def wait_for(self, available: set[int], stable: int, timeout_s: float = 60) -> float:
        """Seconds until it serves exactly ``available`` with ``stable`` resolving to ``stable``."""
        t0 = time.monotonic()
        last: object = None
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(grpc.RpcError):
                last = self.status()
                if last == (available, stable):
                    return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: wanted versions {available}, stable={stable}; last seen {last}")


class BackendCounter:
    """Sums the replicas' request_count over time, across restarts (a counter that went down restarted at 0)."""

    def __init__(self, replicas: list[Replica], every_s: float = 0.5) -> None:
        self.replicas = replicas
        self.total = 0.0
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True, name="backend-counter")

    def sample(self) -> float:
        """Read every replica now; returns the running total."""
        for r in self.replicas:
            value = r.request_count()
            with self._lock:
                if value is None:  # down (killed) or not up yet: its count resumes from 0 when it is back
                    continue
                last = self._last.get(r.name, 0.0)
                self.total += value - last if value >= last else value
                self._last[r.name] = value
        return self.total

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def start(self) -> BackendCounter:
        """Sample in the background."""
        self.sample()
        self._thread.start()
        return self

    @property
    def available(self) -> bool:
        """Whether any replica has counted a request (a stand-in without the metric never does)."""
        return self.total > 0

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)


# --- gateways and the Service in front of them --------------------------------------------------------------


def gateway_args(targets: list[str], model_dir: Path, version_label: str | None,
                 extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """``quickdraw serve`` options: deploy/k8s/base/gateway-deployment.yaml's settings, these backends."""
    args = ["--backend", "tfserving", "--tfserving-target", "ipv4:" + ",".join(targets), "--model-dir", str(model_dir),
            "--model-name", MODEL_NAME, "--no-http-api", "--max-batch-size", "128", "--max-concurrent-batches", "16",
            "--max-queued-drawings", "4096", "--preprocess-threads", "2", "--shutdown-grace-s", "10",
            "--max-connection-age-s", "60", "--max-connection-age-grace-s", "10", "--log-level", "WARNING"]  # fmt: skip
    if version_label:
        args += ["--tfserving-version-label", version_label]
    return [*args, *extra]


@dataclass(eq=False)
class Pod:
    """A gateway process under a pod name."""

    name: str
    gateway: Gateway

    @property
    def target(self) -> str:
        """host:port of its gRPC server."""
        return self.gateway.target


class Service:
    """A Kubernetes Service's endpoints: each new connection goes to the next ready gateway."""

    def __init__(self) -> None:
        self.endpoints: list[Pod] = []
        self._next = 0
        self._lock = threading.Lock()

    def add(self, pod: Pod) -> None:
        """A pod became ready."""
        with self._lock:
            self.endpoints.append(pod)

    def remove(self, pod: Pod) -> None:
        """A pod is terminating: no new connections to it; clients on it move at their next call."""
        with self._lock:
            self.endpoints = [p for p in self.endpoints if p is not pod]

    def pick(self) -> Pod | None:
        """The endpoint for a new connection (None when there is none)."""
        with self._lock:
            if not self.endpoints:
                return None
            self._next += 1
            return self.endpoints[self._next % len(self.endpoints)]


# --- the load -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One client call: when it was sent (monotonic), pinned or not, how it ended."""

    sent: float
    pinned: bool
    code: str  # OK, a gRPC status name, or LOST
    version: int
    latency_s: float
    pod: str


class _Conn:
    """One client connection, to one gateway, as through a Service's virtual IP."""

    def __init__(self, service: Service, deadline_s: float) -> None:
        self.service = service
        self.deadline_s = deadline_s
        self.pod: Pod | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.ClassifierStub | None = None

    def current(self) -> tuple[Pod, pb_grpc.ClassifierStub] | None:
        """The connection's gateway and stub, re-dialled through the Service when its gateway left the endpoints."""
        if self.pod is None or self.pod not in self.service.endpoints:
            if self.channel is not None:  # close once its calls have had their deadline
                old = self.channel
                asyncio.get_running_loop().call_later(self.deadline_s + 1, lambda: asyncio.ensure_future(old.close()))
            self.pod = self.service.pick()
            if self.pod is None:
                self.channel = self.stub = None
                return None
            self.channel = grpc.aio.insecure_channel(self.pod.target, options=[("grpc.use_local_subchannel_pool", 1)])
            self.stub = pb_grpc.ClassifierStub(self.channel)
        assert self.stub is not None
        return self.pod, self.stub


class Load:
    """Open-loop load on a thread of its own: calls due every 1/rate s whatever happens; every call recorded."""

    def __init__(self, service: Service, drawings: list[pb.Drawing], rate_per_s: float, deadline_s: float,
                 pinned_every: int, pinned_version: int = 2, connections: int = 8) -> None:  # fmt: skip
        self.service = service
        self.drawings = drawings
        self.rate_per_s = rate_per_s  # may be changed while running
        self.deadline_s = deadline_s
        self.pinned_every = pinned_every
        self.pinned_version = pinned_version
        self.connections = connections
        self.calls: list[Call] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True, name="load")

    def start(self) -> Load:
        """Start sending."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and wait for every call sent to end (by its deadline plus 100 ms at the latest)."""
        self._stop.set()
        self._thread.join(self.deadline_s + 30)

    async def _main(self) -> None:
        conns = [_Conn(self.service, self.deadline_s) for _ in range(self.connections)]
        tasks: set[asyncio.Task[None]] = set()
        due = time.monotonic()
        i = 0
        while not self._stop.is_set():
            due += 1.0 / self.rate_per_s
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            pinned = self.pinned_every > 0 and i % self.pinned_every == self.pinned_every - 1
            task = asyncio.get_running_loop().create_task(self._one(conns[i % len(conns)], i, pinned))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*list(tasks))
        for c in conns:
            if c.channel is not None:
                await c.channel.close()

    async def _one(self, conn: _Conn, i: int, pinned: bool) -> None:
        sent = time.monotonic()
        self.sent += 1
        got = conn.current()
        if got is None:  # no ready gateway: the Service refuses the connection
            self.calls.append(Call(sent, pinned, "UNAVAILABLE", 0, 0.0, "-"))
            return
        pod, stub = got
        req = pb.ClassifyRequest(drawings=[self.drawings[i % len(self.drawings)]], top_k=3,
                                 model=pb.ModelSpec(version=self.pinned_version) if pinned else None)  # fmt: skip
        version = 0
        try:
            resp = await asyncio.wait_for(stub.Classify(req, timeout=self.deadline_s), self.deadline_s + LATE_S)
            code, version = "OK", resp.model_version
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except TimeoutError:
            code = "LOST"
        self.calls.append(Call(sent, pinned, code, version, time.monotonic() - sent, pod.name))


def load_drawings(n: int = 256) -> list[pb.Drawing]:
    """Real bitmaps from the sample (loadtest's pool), else one drawn square."""
    from faults import bitmaps

    sample = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
    try:
        from loadtest.sources import load_pool

        return list(load_pool([sample], ["bitmap"], size=n).drawings)
    except (ValueError, OSError):
        return [pb.Drawing(bitmap=pb.Bitmap(pixels=b)) for b in bitmaps(1)]


# --- Prometheus ---------------------------------------------------------------------------------------------


class Prometheus:
    """Debian's prometheus with the repo's rule files, scraping static targets from a file (rewritten as pods
    come and go) with the ``namespace`` and ``pod`` labels Kubernetes relabelling gives them."""

    def __init__(self, workdir: Path, scrape_s: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError(
                "no prometheus on PATH (Debian: apt-get install prometheus), or use --no-prometheus"
            )
        self.dir = workdir / "prometheus"
        self.dir.mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        jobs = []
        for job, path in (("quickdraw-gateway", "/metrics"), ("tfserving", "/monitoring/prometheus/metrics")):
            sd = [{"files": [str(self.dir / f"{job}.json")], "refresh_interval": "1s"}]
            jobs.append({"job_name": job, "metrics_path": path, "file_sd_configs": sd})
            (self.dir / f"{job}.json").write_text("[]")
        rules = sorted(str(p) for p in (DEPLOY / "prometheus" / "rules").glob("*.yml"))
        config = {"global": {"scrape_interval": f"{scrape_s:g}s", "scrape_timeout": f"{scrape_s:g}s",
                             "evaluation_interval": f"{scrape_s:g}s"},
                  "rule_files": rules, "scrape_configs": jobs}  # fmt: skip
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.log = (self.dir / "prometheus.log").open("w")
        self.proc = subprocess.Popen([binary, f"--config.file={self.dir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip

    def set_targets(self, job: str, targets: dict[str, str]) -> None:
        """Scrape ``{pod name: host:port}`` under ``job`` from now on."""
        groups = [{"targets": [addr], "labels": {"namespace": NAMESPACE, "pod": pod}} for pod, addr in targets.items()]
        tmp = self.dir / f"{job}.json.tmp"
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.dir / f"{job}.json")

    def query(self, expr: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.load(urllib.request.urlopen(url, timeout=timeout_s))
        if body.get("status") != "success":
            raise RuntimeError(f"{expr}: {body}")
        return body["data"]["result"]

    def wait_up(self, n: int, timeout_s: float = 60) -> None:
        """Until ``n`` targets report up == 1."""
        end = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + (self.dir / "prometheus.log").read_text()[-2000:])
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                if len(self.query("up == 1")) >= n:
                    return
            if time.monotonic() > end:
                raise TimeoutError(f"prometheus: fewer than {n} targets up after {timeout_s} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop it."""
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# --- the topology -------------------------------------------------------------------------------------------


@dataclass
class Options:
    """How the rehearsal runs (see --help)."""

    rate_per_s: float = 40.0
    deadline_s: float = 2.0
    pinned_every: int = 20
    phase_s: float = 15.0
    short: bool = False
    prometheus: bool = True
    version_label: str | None = "stable"
    config_poll_s: float = 2.0
    fs_poll_s: float = 2.0
    prestop_s: float = 2.0
    gateway_extra: tuple[str, ...] = ()
    replica_extra: tuple[str, ...] = ()
    standin: Path = ROOT / "tests" / "tfserving_standin.py"


class Topology:
    """3 replicas on one model directory, 2 gateways behind a Service, Prometheus; use as a context manager."""

    def __init__(self, opts: Options, replicas: int = 3, gateways: int = 2) -> None:
        self.opts = opts
        self._tmp = tempfile.TemporaryDirectory(prefix="rehearsal-")
        self.workdir = Path(self._tmp.name)
        self.model_dir = self.workdir / "models" / MODEL_NAME
        self.model_dir.mkdir(parents=True)
        shipped = ROOT / "models" / MODEL_NAME / "1"
        shutil.copytree(shipped, self.model_dir / "1")
        # Version 2 is staged OUTSIDE the served directory (the trainer's output) and copied in at roll-out.
        self.staged_v2 = self.workdir / "staging" / "2"
        shutil.copytree(shipped, self.staged_v2)
        self.n_replicas = replicas
        self.n_gateways = gateways
        self.replicas: list[Replica] = []
        self.pods: list[Pod] = []
        self.service = Service()
        self.prometheus: Prometheus | None = None
        self._pod_serial = 0

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start Prometheus, the replicas (together), then the gateways (together)."""
        o = self.opts
        if o.prometheus:
            self.prometheus = Prometheus(self.workdir)
        self.replicas = [Replica(f"tfserving-{i}", self.workdir, self.model_dir,
                                 poll_offset_s=o.fs_poll_s * i / self.n_replicas, config_poll_s=o.config_poll_s,
                                 fs_poll_s=o.fs_poll_s, extra=o.replica_extra, standin=o.standin)
                         for i in range(self.n_replicas)]  # fmt: skip
        t0 = time.monotonic()
        self._parallel([r.start for r in self.replicas])
        say(f"{self.n_replicas} TF Serving stand-ins up in {time.monotonic() - t0:.1f} s: "
            + ", ".join(r.target for r in self.replicas))  # fmt: skip
        t0 = time.monotonic()
        pods = self._parallel([self.new_pod for _ in range(self.n_gateways)])
        for p in pods:
            self.service.add(p)
        say(f"{self.n_gateways} gateways up in {time.monotonic() - t0:.1f} s: " + ", ".join(p.target for p in pods))
        self._publish_targets()
        if self.prometheus is not None:
            self.prometheus.wait_up(self.n_replicas + self.n_gateways)
            say(f"Prometheus at {self.prometheus.base} scrapes all {self.n_replicas + self.n_gateways} targets")

    @staticmethod
    def _parallel(fns: list[Callable[[], Any]]) -> list[Any]:
        out: list[Any] = [None] * len(fns)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                out[i] = fns[i]()
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def new_pod(self, extra: tuple[str, ...] = ()) -> Pod:
        """Start a gateway (not yet in the Service); ``extra`` options win over the defaults."""
        name = f"quickdraw-gateway-{self._pod_serial}"
        self._pod_serial += 1
        gw = Gateway(*gateway_args([r.target for r in self.replicas], self.model_dir, self.opts.version_label,
                                   (*self.opts.gateway_extra, *extra)))  # fmt: skip
        pod = Pod(name, gw)
        self.pods.append(pod)
        return pod

    def _publish_targets(self) -> None:
        if self.prometheus is None:
            return
        self.prometheus.set_targets("quickdraw-gateway", {p.name: f"127.0.0.1:{p.gateway.http_port}"
                                                          for p in self.service.endpoints})  # fmt: skip
        self.prometheus.set_targets("tfserving", {r.name: f"127.0.0.1:{r.rest_port}" for r in self.replicas})

    # --- events ---------------------------------------------------------------------------------------------
    def roll_out(self, version: int = 2) -> None:
        """Copy the staged version beside the served ones under a temporary name, then rename it into place."""
        tmp = self.model_dir / f".{version}.incoming-{os.getpid()}"
        shutil.copytree(self.staged_v2, tmp)
        os.rename(tmp, self.model_dir / str(version))

    def remove_version(self, version: int = 2) -> None:
        """Take a version out of the served directory: renamed away at once, then deleted."""
        gone = self.model_dir.parent / f".{version}.removed-{os.getpid()}"
        os.rename(self.model_dir / str(version), gone)
        shutil.rmtree(gone)

    def replace_gateway(self, pod: Pod) -> tuple[Pod, int, float]:
        """Out of the Service, preStop sleep, SIGTERM; a new pod starts meanwhile and joins once ready.

        Returns (new pod, the old one's exit code, seconds from SIGTERM to its exit)."""
        self.service.remove(pod)
        result: list[Pod] = []
        starter = threading.Thread(target=lambda: result.append(self.new_pod()))
        starter.start()  # the ReplicaSet creates the new pod when the old one starts terminating
        time.sleep(self.opts.prestop_s)
        t0 = time.monotonic()
        code = pod.gateway.terminate()
        exit_s = time.monotonic() - t0
        starter.join()
        self.service.add(result[0])
        self._publish_targets()
        return result[0], code, exit_s

    def close(self) -> None:
        """Stop everything; remove the temp directory."""
        for p in self.pods:
            with contextlib.suppress(Exception):
                p.gateway.kill()
        for r in self.replicas:
            with contextlib.suppress(Exception):
                r.stop()
        if self.prometheus is not None:
            with contextlib.suppress(Exception):
                self.prometheus.stop()
        self._tmp.cleanup()


# --- phases and the table -----------------------------------------------------------------------------------


@dataclass
class Phase:
    """One event: what was done, when it started, and facts noted while it ran."""

    name: str
    started: float
    backend_at_start: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    """The counts of one phase."""

    event: str
    calls: int
    codes: Counter[str]
    lost: int
    versionless: int
    versionless_failed: int
    #: versionless failures other than DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (slowness, shedding): what a
    #: version skew between replicas or gateways would cause (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION...)
    versionless_skew: int
    pinned: int
    pinned_ok: int
    pinned_not_found: int
    answered_by: Counter[int]
    attempts_per_call: float | None
    p50_ms: float
    p99_ms: float
    notes: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dict(self.__dict__)
        d["codes"] = dict(self.codes)
        d["answered_by"] = {str(k): v for k, v in sorted(self.answered_by.items())}
        return d


def tabulate(phases: list[Phase], calls: list[Call], backend_end: float | None) -> list[Row]:
    """Every call under the phase during which it was sent."""
    starts = [p.started for p in phases]
    per: list[list[Call]] = [[] for _ in phases]
    for c in calls:
        i = bisect.bisect_right(starts, c.sent) - 1
        if i >= 0:
            per[i].append(c)
    rows = []
    for i, (p, cs) in enumerate(zip(phases, per, strict=True)):
        end_backend = phases[i + 1].backend_at_start if i + 1 < len(phases) else backend_end
        vl = [c for c in cs if not c.pinned]
        pinned = [c for c in cs if c.pinned]
        ok = np.array([c.latency_s for c in cs if c.code == "OK"]) * 1000
        attempts = None
        if end_backend is not None and cs:
            attempts = (end_backend - p.backend_at_start) / len(cs)
        rows.append(Row(
            event=p.name, calls=len(cs), codes=Counter(c.code for c in cs if c.code not in ("OK", "LOST")),
            lost=sum(c.code == "LOST" for c in cs), versionless=len(vl),
            versionless_failed=sum(c.code != "OK" for c in vl),
            versionless_skew=sum(c.code not in ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") for c in vl),
            pinned=len(pinned),
            pinned_ok=sum(c.code == "OK" for c in pinned), pinned_not_found=sum(c.code == "NOT_FOUND" for c in pinned),
            answered_by=Counter(c.version for c in vl if c.code == "OK"), attempts_per_call=attempts,
            p50_ms=float(np.percentile(ok, 50)) if ok.size else math.nan,
            p99_ms=float(np.percentile(ok, 99)) if ok.size else math.nan, notes="; ".join(p.notes),
        ))  # fmt: skip
    return rows


def markdown_table(rows: list[Row]) -> str:
    """The table as Markdown."""
    codes = sorted({k for r in rows for k in r.codes})
    head = ["event", "calls", "OK", *codes, "lost", "versionless failed", "pinned v2 OK", "pinned v2 NOT_FOUND",
            "versionless answered by", "backend attempts / call", "p50 ms", "p99 ms", "what happened"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by = ", ".join(f"v{k} {v}" for k, v in sorted(r.answered_by.items())) or "-"
        att = "n/a" if r.attempts_per_call is None else f"{r.attempts_per_call:.2f}"
        cells = [r.event, str(r.calls), str(r.calls - sum(r.codes.values()) - r.lost),
                 *(str(r.codes.get(c, 0)) for c in codes), f"**{r.lost}**",
                 f"**{r.versionless_failed}** of {r.versionless} ({r.versionless_skew} not deadline/shed)",
                 f"{r.pinned_ok} of {r.pinned}",
                 f"{r.pinned_not_found} of {r.pinned}", by, att, f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
                 r.notes.replace("|", "/")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reliability(rows: list[Row], command: str, opts: Options, elapsed_s: float) -> Path:
    """Replace (or add) RELIABILITY.md's rehearsal section; scripts/reliability_report.py keeps it."""
    path = ROOT / "RELIABILITY.md"
    text = path.read_text() if path.exists() else "# Reliability\n"
    before = text.split(SECTION)[0].rstrip() + "\n\n"
    cores = len(os.sched_getaffinity(0))
    label = f" --tfserving-version-label {opts.version_label}" if opts.version_label else ""
    prom = (
        "Prometheus scraping all of them every second with deploy/prometheus/rules loaded; " if opts.prometheus else ""
    )
    intro = (
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({platform.machine()}, {cores} cores "
        f"shared with other work, load average {os.getloadavg()[0]:.1f} at the end: latencies are indicative, the "
        f"counts exact; {elapsed_s:.0f} s). The production topology on one machine, real processes on 127.0.0.1 "
        "(scripts/rehearsal.py): 3 TF Serving stand-ins (tests/tfserving_standin.py) on one shared model directory, "
        f"each with its own model config file (label `stable`) polled every {opts.config_poll_s:g} s, file-system "
        f"polls every {opts.fs_poll_s:g} s out of phase, batching with deploy/tfserving/batching.config; 2 gateways "
        f"(`quickdraw serve --backend tfserving --tfserving-target ipv4:A,B,C{label}`) behind a Service stand-in "
        "(8 client connections; a terminating gateway leaves the endpoints, then gets SIGTERM "
        f"{opts.prestop_s:g} s later, as after a preStop sleep); {prom}open-loop load of {opts.rate_per_s:g} "
        f"Classify calls/s (one bitmap each, deadline {opts.deadline_s:g} s), every {opts.pinned_every}th pinned "
        "to version 2. Each call counts under the event during which it was sent; **lost** = no answer by the "
        f"deadline + 100 ms. Backend attempts / call = the stand-ins' `{REQUEST_COUNT}` increase (summed over "
        "replicas) over the client calls sent in that phase: above 1 means retries, below 1 that the gateways "
        "merged calls into batches. Versionless failures are split: DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED come "
        "from slowness or shedding (the replicas load versions on the same cores that serve), anything else would "
        "be a version skew."
    )
    section = f"{SECTION}\n\n{textwrap.fill(intro, 115)}\n\n{markdown_table(rows)}\n"
    path.write_text(before + section)
    return path


# --- the run ------------------------------------------------------------------------------------------------


class Rehearsal:
    """The events in turn under load; ``run`` returns the rows."""

    def __init__(self, topo: Topology, opts: Options) -> None:
        self.topo = topo
        self.opts = opts
        self.phases: list[Phase] = []
        self.counter = BackendCounter(topo.replicas)
        self.load = Load(topo.service, load_drawings(), opts.rate_per_s, opts.deadline_s, opts.pinned_every)

    def phase(self, name: str) -> Phase:
        """Start a new phase now."""
        backend = self.counter.sample()
        p = Phase(name, time.monotonic(), backend)
        self.phases.append(p)
        say(f"phase: {name}")
        return p

    def hold(self, p: Phase, at_least_s: float) -> None:
        """Let the load run until the phase is ``at_least_s`` old."""
        if (left := p.started + at_least_s - time.monotonic()) > 0:
            time.sleep(left)

    def wait_all(self, p: Phase, available: set[int], stable: int, replicas: list[Replica] | None = None) -> None:
        """Until every replica (or those given) serves ``available`` with ``stable``; noted in the phase."""
        took = []
        for r in replicas or self.topo.replicas:
            took.append(r.wait_for(available, stable, timeout_s=max(30.0, 6 * self.opts.fs_poll_s)))
        p.notes.append(f"replicas at {sorted(available)}/stable={stable} within {max(took) + 0:.1f} s")

    def run(self) -> list[Row]:
        """Every event in turn, then the table."""
        o, topo = self.opts, self.topo
        short = o.short
        self.counter.start()
        self.load.start()
        with live_progress(self.load, self.phases):
            return self._events(o, topo, short)

    def _events(self, o: Options, topo: Topology, short: bool) -> list[Row]:
        try:
            p = self.phase("1 steady")
            self.hold(p, o.phase_s if not short else o.phase_s / 2)

            p = self.phase("2 roll out v2 (atomic rename)")
            topo.roll_out(2)
            self.wait_all(p, {1, 2}, 1)
            self.hold(p, o.phase_s)

            p = self.phase("3 move stable 1->2, one replica at a time")
            for r in topo.replicas:
                t0 = time.monotonic()
                r.write_config(2)
                r.wait_for({1, 2}, 2, timeout_s=max(30.0, 6 * o.config_poll_s))
                p.notes.append(f"{r.name} {time.monotonic() - t0:.1f} s")
                time.sleep(o.config_poll_s)
            self.hold(p, o.phase_s)

            p = self.phase("4 roll back: stable->1 everywhere, then v2 removed")
            for r in topo.replicas:
                r.write_config(1)
            self.wait_all(p, {1, 2}, 1)
            topo.remove_version(2)
            self.wait_all(p, {1}, 1)
            self.hold(p, o.phase_s)

            p = self.phase("5 SIGKILL one replica, restart it")
            victim = topo.replicas[0]
            self.counter.sample()  # its count up to now
            victim.kill()
            t0 = time.monotonic()
            victim.start()
            p.notes.append(f"{victim.name} killed, serving again {time.monotonic() - t0:.1f} s later")
            self.hold(p, o.phase_s)

            if not short:
                p = self.phase("6 SIGTERM one gateway, start a new one")
                old = topo.service.endpoints[0]
                new, code, exit_s = topo.replace_gateway(old)
                p.notes.append(f"{old.name} exit {code} {exit_s:.1f} s after SIGTERM; {new.name} ready")
                self.hold(p, o.phase_s)
        finally:
            self.load.stop()
            end = self.counter.sample()
            self.counter.stop()
        return tabulate(self.phases, self.load.calls, end if self.counter.available else None)


def write_section(path: Path, heading: str, body: str) -> Path:
    """Replace the Markdown section under ``heading`` (up to the next ``## ``) in ``path``, or append it."""
    text = path.read_text()
    new = f"{heading}\n\n{body.strip()}\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        nxt = re.search(r"^## ", rest, flags=re.M)
        tail = rest[nxt.start() :] if nxt else ""
        text = head + new + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + new
    path.write_text(text)
    return path


def run_autoscaling(topo: Topology, opts: Options, args: argparse.Namespace, command: str) -> bool:
    """Part A: the HPAs fed live metrics under a stepped load; plot and deploy/README.md section."""
    import rehearsal_autoscaling as ra

    load = Load(topo.service, load_drawings(), 1.0, opts.deadline_s, pinned_every=0).start()
    try:
        result = ra.run(topo, load, capacity_per_s=args.capacity_per_s, window_scale=args.window_scale, say=say)
    finally:
        load.stop()
    failed = Counter(c.code for c in load.calls if c.code != "OK")
    say(f"autoscaling: {len(load.calls)} calls, not OK: {dict(failed) or 'none'}")
    gw = next(t for t in result.tracked if t.target_name == "quickdraw-gateway")
    desired = [d for _, _, d in gw.series]
    rose = max(desired, default=0) > 2
    fell = bool(desired) and desired[-1] <= 2
    say(f"autoscaling: gateway desired replicas rose above 2: {rose}; back to 2 or fewer at the end: {fell}")
    if not args.no_write:
        png = ra.plot(result, DEPLOY / "hpa-rehearsal.png")
        say(f"wrote {png} ({png.stat().st_size // 1024} KiB)")
        say(f"wrote {write_section(DEPLOY / 'README.md', '## Autoscaling evidence', ra.markdown(result, command))}")
    return rose and fell


def run_batching(topo: Topology, args: argparse.Namespace, command: str) -> None:
    """Part B: the batching grid; deploy/README.md section."""
    import rehearsal_batching as rb

    grid = [(c, d) for c in args.grid_concurrent for d in args.grid_delay_ms]
    cells = rb.run(topo, grid, args.grid_rates, level_s=args.grid_level_s, say=say)
    concurrent, delay = rb.pick(cells)
    say(f"batching: measured pick: QUICKDRAW_MAX_CONCURRENT_BATCHES={concurrent}, "
        f"QUICKDRAW_MAX_BATCH_DELAY_MS={delay:g}")  # fmt: skip
    if not args.no_write:
        body = rb.markdown(cells, command, len(os.sched_getaffinity(0)), os.getloadavg()[0])
        path = write_section(DEPLOY / "README.md", "## Batching: two layers, tuned by measurement", body)
        say(f"wrote {path}")


def print_table(rows: list[Row]) -> None:
    """The table on stdout."""
    print()
    print(markdown_table(rows))
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the rehearsal; 0 when no call was lost."""
    p = argparse.ArgumentParser(prog="scripts/rehearsal.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--short", action="store_true", help="the shorter variant: no gateway replacement, half-length "
                   "steady phase (tests/test_rehearsal.py runs it)")  # fmt: skip
    p.add_argument("--rate-per-s", type=float, default=40.0, help="client calls per second, open loop (default 40)")
    p.add_argument("--deadline-ms", type=float, default=2000.0, help="each call's deadline (default 2000)")
    p.add_argument("--pinned-every", type=int, default=20, help="every Nth call is pinned to version 2 (default 20)")
    p.add_argument("--phase-s", type=float, default=15.0, help="shortest length of each phase (default 15)")
    p.add_argument("--version-label", default="stable", help="the gateways' --tfserving-version-label ('' for none)")
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    p.add_argument(
        "--parts",
        default="events,autoscaling,batching",
        help="what to run, comma-separated: events (the table for RELIABILITY.md), autoscaling (A: "
        "deploy/README.md 'Autoscaling evidence' and deploy/hpa-rehearsal.png), batching (B: deploy/README.md "
        "'Batching: two layers, tuned by measurement'); default: all three",
    )
    p.add_argument(
        "--capacity-per-s",
        type=float,
        default=20.0,
        help="autoscaling: calls/s that define one gateway's capacity here (default 20)",
    )
    p.add_argument(
        "--window-scale",
        type=float,
        default=0.1,
        help="autoscaling: factor on the HPAs' stabilisation windows and policy periods (default 0.1)",
    )
    p.add_argument(
        "--grid-concurrent",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[4, 16],
        help="batching: QUICKDRAW_MAX_CONCURRENT_BATCHES values (default 4,16)",
    )
    p.add_argument(
        "--grid-delay-ms",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.0, 2.0],
        help="batching: QUICKDRAW_MAX_BATCH_DELAY_MS values (default 0,2)",
    )
    p.add_argument(
        "--grid-rates",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[30.0, 100.0, 200.0],
        help="batching: offered calls/s (default 20,60,120)",
    )
    p.add_argument("--grid-level-s", type=float, default=6.0, help="batching: measured seconds per cell (default 6)")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave RELIABILITY.md alone")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument(
        "--standin",
        type=Path,
        default=ROOT / "tests" / "tfserving_standin.py",
        help="the TF Serving stand-in to run (it takes tensorflow_model_server's flags)",
    )
    args = p.parse_args(argv)
    opts = Options(rate_per_s=args.rate_per_s, deadline_s=args.deadline_ms / 1000, pinned_every=args.pinned_every,
                   phase_s=args.phase_s, short=args.short, prometheus=not args.no_prometheus,
                   version_label=args.version_label or None, standin=args.standin)  # fmt: skip
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if unknown := parts - {"events", "autoscaling", "batching"}:
        p.error(f"unknown parts {sorted(unknown)}")
    given = " ".join(argv if argv is not None else sys.argv[1:])
    if argv is None and os.environ.get("MAKELEVEL"):
        command = "make rehearsal" + (f" ARGS='{given}'" if given else "")
    else:
        command = f"python scripts/rehearsal.py {given}".strip()
    t0 = time.monotonic()
    rows: list[Row] = []
    hpa_ok = True
    with Topology(opts) as topo:
        if "events" in parts:
            rows = Rehearsal(topo, opts).run()
            elapsed = time.monotonic() - t0
            print_table(rows)
            if args.out:
                args.out.write_text(json.dumps([r.as_json() for r in rows], indent=1) + "\n")
            if not args.no_write:
                say(f"wrote {write_reliability(rows, command, opts, elapsed)}")
        if "autoscaling" in parts:
            hpa_ok = run_autoscaling(topo, opts, args, command)
        if "batching" in parts:
            run_batching(topo, args, command)
    lost = sum(r.lost for r in rows)
    say(f"done in {time.monotonic() - t0:.0f} s: {sum(r.calls for r in rows)} calls in the events, {lost} lost")
    return 1 if lost or not hpa_ok else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
