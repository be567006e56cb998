"""The rehearsal's production topology on one machine, and the open-loop load it runs under.

The pieces every part of ``make rehearsal`` uses (scripts/rehearsal.py's events, scripts/rehearsal_autoscaling.py,
scripts/rehearsal_batching.py): the TF Serving stand-in replicas on one model directory, the gateways behind a
stand-in for a Kubernetes Service, Prometheus, the load and its calls, and the progress lines. It imports none
of those scripts; they import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import grpc  # noqa: E402
from faults import LATE_S, Gateway, Process, free_port  # noqa: E402
from harness import parse_metrics  # noqa: E402

from quickdraw_client.v1 import classifier_pb2 as pb  # noqa: E402
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402
from service.protos import tfs  # noqa: E402

DEPLOY = ROOT / "deploy"
MODEL_NAME = "quickdraw"
NAMESPACE = "quickdraw"
REQUEST_COUNT = ":tensorflow:serving:request_count"


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


@dataclass
class Phase:
    """One event: what was done, when it started, and facts noted while it ran."""

    name: str
    started: float
    backend_at_start: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- the model directory and the stand-in replicas ----------------------------------------------------------


def model_config_text(base_path: Path, stable: int, canary: int | None = None) -> str:
    """deploy/tfserving/models.config with this base path and ``version_labels { key: "stable" }`` (and
    ``canary``, when given: the roll-out rows' candidate)."""
    text = (DEPLOY / "tfserving" / "models.config").read_text()
    text, n = re.subn(r'base_path:\s*"[^"]*"', f'base_path: "{base_path}"', text)
    assert n == 1, "deploy/tfserving/models.config: expected one base_path"
    labels = f'    version_labels {{ key: "stable" value: {stable} }}\n'
    if canary is not None:
        labels += f'    version_labels {{ key: "canary" value: {canary} }}\n'
    text, n = re.subn(r'(model_platform:\s*"[^"]*"\n)', lambda m: m.group(1) + labels, text)
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

    def write_config(self, stable: int, canary: int | None = None) -> None:
        """Point ``stable`` at ``stable`` (and ``canary`` at ``canary``) in this replica's config file (written
        whole, then renamed)."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(model_config_text(self.base_path, stable, canary))
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
    #: Rows 7-9 (scripts/rehearsal_rollouts.py): canary, promoted shadow, refused shadow; need Prometheus.
    rollouts: bool = True


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
        #: Every gateway's --rollout-file (the canary split and shadow plan; empty: neither).
        self.rollout_file = self.workdir / "rollout.json"
        self.rollout_file.write_text('{"split": {}}\n')

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
        plan = ("--rollout-file", str(self.rollout_file), "--rollout-watch-s", "0.5")
        gw = Gateway(*gateway_args([r.target for r in self.replicas], self.model_dir, self.opts.version_label,
                                   (*plan, *self.opts.gateway_extra, *extra)))  # fmt: skip
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
    def roll_out(self, version: int = 2, source: Path | None = None) -> None:
        """Copy the staged version (or ``source``) beside the served ones under a temporary name, then rename it
        into place."""
        tmp = self.model_dir / f".{version}.incoming-{os.getpid()}"
        shutil.copytree(source or self.staged_v2, tmp)
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
