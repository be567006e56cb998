"""Autoscaling evidence for ``make rehearsal``: the HPAs of deploy/k8s, fed the rehearsal's live metrics.

Read at run time: every HorizontalPodAutoscaler in deploy/k8s/base, and deploy/prometheus/adapter/config.yaml.
For each HPA metric:

- ``Pods`` / ``External``: the prometheus-adapter rule that serves it, its metricsQuery expanded as the adapter
  expands it (``namespace="quickdraw"``, the target's pods), evaluated against the rehearsal's Prometheus;
- ``Resource`` cpu: what metrics-server would report, the pod's CPU (its process and children, from
  /proc/<pid>/stat) over the last --cpu-window-s.

A load steps from half of one gateway's capacity to 3x it and back, and every --eval-s the Kubernetes HPA
algorithm (scripts/hpa.py) turns the values into a desired replica count. The replicas themselves are not
started or stopped (two cores cannot hold them): each HPA's current count follows its own decisions, and a
per-pod value is the measured total over that count, i.e. the load is assumed to spread evenly over the pods
the HPA asked for.

**One gateway's capacity** is defined, not discovered: this machine's cores are shared by 3 stand-ins, the
gateways, Prometheus and the load, so a gateway never reaches the 700m of CPU the production HPA targets. The
rehearsal measures the CPU per gateway pod while each gateway takes --capacity-per-s calls/s, calls that one
gateway's capacity, and scales every CPU target by (that CPU / the manifest's target), so the manifest's rule
"scale when a pod's CPU passes its target" reads "scale when a pod takes more than --capacity-per-s calls/s".
Stabilisation windows and policy periods are shortened by --window-scale (the run lasts minutes, not hours).
"""

from __future__ import annotations

import math
import os
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hpa import HPA, MetricTarget, quantity

if TYPE_CHECKING:
    from rehearsal_topology import Load, Topology

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s" / "base"
ADAPTER = ROOT / "deploy" / "prometheus" / "adapter" / "config.yaml"
TICK_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children now alive, in seconds."""
    pids = [pid]
    with_children = Path(f"/proc/{pid}/task")
    if with_children.exists():
        for task in with_children.iterdir():
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            pids += [int(c) for c in children]
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / TICK_S


def hpas() -> list[dict[str, Any]]:
    """The HorizontalPodAutoscalers in deploy/k8s/base."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "HorizontalPodAutoscaler":
                out.append(doc)
    return out


def cpu_request_cores(deployment: str) -> float | None:
    """The first container's CPU request of a Deployment in deploy/k8s/base (for Utilization targets)."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment" and doc["metadata"]["name"] == deployment:
                req = doc["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("requests", {})
                return quantity(req["cpu"]) if "cpu" in req else None
    return None


def adapter_rule(source: str, name: str) -> dict[str, Any] | None:
    """The adapter rule serving metric ``name`` (Pods: ``rules``; External: ``externalRules``)."""
    cfg = yaml.safe_load(ADAPTER.read_text())
    for rule in cfg.get("rules" if source == "Pods" else "externalRules", []) or []:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
        served = re.sub(rule["name"]["matches"], rule["name"].get("as", "$0").replace("$", "\\"), series)
        if served == name:
            return {**rule, "series": series}
    return None


def expand(rule: dict[str, Any], source: str, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends: the metricsQuery with its templates filled."""
    if source == "Pods":
        matchers, group_by = f'namespace="{namespace}",pod=~"{"|".join(pods)}"', "pod"
    else:
        matchers, group_by = f'namespace="{namespace}"', "namespace"
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["series"])
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def scale_ranges(promql: str, scale: float, floor_s: float = 4.0) -> str:
    """PromQL with every range selector (``[1m]``) multiplied by ``scale``, at least ``floor_s``."""
    unit = {"s": 1, "m": 60, "h": 3600}

    def one(m: re.Match[str]) -> str:
        return f"[{max(floor_s, float(m.group(1)) * unit[m.group(2)] * scale):g}s]"

    return re.sub(r"\[(\d+)([smh])\]", one, promql)


@dataclass
class Tracked:
    """One HPA under evaluation: its model, its simulated replica count, and what it decided over time."""

    hpa: HPA
    target_name: str
    current: int
    #: (t since start, {metric: value as the HPA reads it}, desired)
    series: list[tuple[float, dict[str, float], int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What the autoscaling run measured and decided."""

    capacity_per_s: float
    cpu_at_capacity_cores: float
    window_scale: float
    load: list[tuple[float, float]]  # (t, offered calls/s)
    tracked: list[Tracked]
    queries: dict[str, str]
    real_gateways: int


class CpuMeter:
    """Per-process CPU rate over a sliding window, from periodic /proc samples."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: dict[int, list[tuple[float, float]]] = {}

    def sample(self, pids: list[int]) -> None:
        """Read every pid now."""
        now = time.monotonic()
        for pid in pids:
            s = self.samples.setdefault(pid, [])
            s.append((now, cpu_seconds(pid)))
            while len(s) > 2 and s[1][0] <= now - self.window_s:
                s.pop(0)

    def cores(self, pid: int) -> float:
        """CPU cores used by ``pid`` over the window (0 before two samples)."""
        s = self.samples.get(pid, [])
        if len(s) < 2 or s[-1][0] <= s[0][0]:
            return 0.0
        return (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0])


def run(topo: Topology, load: Load, capacity_per_s: float = 20.0, window_scale: float = 0.1,
        eval_s: float = 2.0, cpu_window_s: float = 6.0, low_s: float = 20.0, high_s: float = 50.0,
        after_s: float = 60.0, say: Any = print) -> Result:  # fmt: skip
    """Calibrate, then step the load low -> 3x capacity -> low while evaluating every HPA every ``eval_s``."""
    gateways = list(topo.service.endpoints)
    meter = CpuMeter(cpu_window_s)

    def pids_of(target: str) -> dict[str, int]:
        if target == "quickdraw-gateway":
            return {p.name: p.gateway.pid for p in topo.service.endpoints}
        return {r.name: r.proc.pid for r in topo.replicas if r.proc is not None}

    def all_pids() -> list[int]:
        return [*pids_of("quickdraw-gateway").values(), *pids_of("tfserving").values()]

    # Calibration: each gateway takes capacity_per_s calls/s; its CPU then is "one gateway at capacity".
    load.rate_per_s = capacity_per_s * len(gateways)
    t_end = time.monotonic() + max(cpu_window_s + 4, 10)
    while time.monotonic() < t_end:
        meter.sample(all_pids())
        time.sleep(0.5)
    at_capacity = sum(meter.cores(p.gateway.pid) for p in gateways) / len(gateways)
    say(f"autoscaling: at {capacity_per_s:g} calls/s per gateway, a gateway uses {at_capacity * 1000:.0f}m of CPU")
    # Every Pods metric a gateway HPA reads, over the calibration window: its value at one gateway's capacity.
    calibrated: dict[str, float] = {}
    for obj in hpas():
        if obj["spec"]["scaleTargetRef"]["name"] != "quickdraw-gateway" or topo.prometheus is None:
            continue
        for m in HPA.from_manifest(obj).metrics:
            if m.source == "Pods" and (rule := adapter_rule("Pods", m.name)) is not None:
                promql = scale_ranges(expand(rule, "Pods", "quickdraw", [p.name for p in gateways]), 0, floor_s=8)
                vals = [float(x["value"][1]) for x in topo.prometheus.query(promql)]
                calibrated[m.name] = sum(vals) / len(gateways) if vals else 0.0
                say(f"autoscaling: at capacity, {m.name} = {calibrated[m.name]:.4g} per gateway")

    tracked: list[Tracked] = []
    queries: dict[str, str] = {}
    for obj in hpas():
        h = HPA.from_manifest(obj, window_scale=window_scale)
        target = obj["spec"]["scaleTargetRef"]["name"]
        current = len(pids_of(target))
        t = Tracked(h, target, max(h.min_replicas, min(h.max_replicas, current)))
        scaled = []
        for m in h.metrics:
            if m.source == "Resource" and m.name == "cpu" and target == "quickdraw-gateway":
                manifest_cores = m.target
                if m.target_type == "Utilization":
                    req = cpu_request_cores(target) or 1.0
                    manifest_cores = m.target / 100 * req
                scale = at_capacity / manifest_cores
                new_target = m.target * scale
                scaled.append(MetricTarget(m.source, m.name, m.target_type, new_target))
                queries[f"{h.name}: cpu"] = (f"process CPU from /proc, {cpu_window_s:g} s window; target "
                                             f"{m.target:g}{'%' if m.target_type == 'Utilization' else ' cores'} "
                                             f"scaled x{scale:.4f} to {new_target:.4g}")  # fmt: skip
            elif m.source in ("Pods", "External") and (rule := adapter_rule(m.source, m.name)) is not None:
                promql = scale_ranges(expand(rule, m.source, "quickdraw", ["<pods>"]), window_scale)
                if m.source == "Pods" and target == "quickdraw-gateway" and calibrated.get(m.name):
                    scale = calibrated[m.name] / m.target
                    scaled.append(MetricTarget(m.source, m.name, m.target_type, calibrated[m.name]))
                    queries[f"{h.name}: {m.name}"] = (f"`{promql}`; target {m.target:g} scaled x{scale:.4g} to "
                                                      f"{calibrated[m.name]:.4g}")  # fmt: skip
                else:
                    scaled.append(m)
                    queries[f"{h.name}: {m.name}"] = f"`{promql}`; target {m.target:g} as in the manifest"
            else:
                t.skipped.append(f"{m.source} {m.name}: no source in the rehearsal")
        h.metrics = scaled
        tracked.append(t)

    def values(t: Tracked) -> dict[str, float]:
        out: dict[str, float] = {}
        pods = pids_of(t.target_name)
        for m in t.hpa.metrics:
            if m.source == "Resource":
                total = sum(meter.cores(pid) for pid in pods.values())
                per_pod = total / t.current
                if m.target_type == "Utilization":
                    per_pod = per_pod / (cpu_request_cores(t.target_name) or 1.0) * 100
                out[m.name] = per_pod
                continue
            if topo.prometheus is None:
                continue
            rule = adapter_rule(m.source, m.name)
            assert rule is not None
            try:
                result = topo.prometheus.query(
                    scale_ranges(expand(rule, m.source, "quickdraw", list(pods)), window_scale)
                )
            except (OSError, RuntimeError):
                continue
            vals = [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]
            if not vals:
                continue
            out[m.name] = sum(vals) / t.current if m.source == "Pods" else sum(vals)
        return out

    steps = [(0.0, 0.5 * capacity_per_s), (low_s, 3 * capacity_per_s), (low_s + high_s, 0.5 * capacity_per_s)]
    total_s = low_s + high_s + after_s
    t0 = time.monotonic()
    load_series: list[tuple[float, float]] = []
    next_eval = t0
    while (now := time.monotonic()) - t0 < total_s:
        rate = [r for start, r in steps if now - t0 >= start][-1]
        if rate != load.rate_per_s:
            say(f"autoscaling: offered load {rate:g} calls/s ({rate / capacity_per_s:g}x one gateway's capacity)")
            load.rate_per_s = rate
        meter.sample(all_pids())
        if now >= next_eval:
            next_eval += eval_s
            load_series.append((now - t0, rate))
            for t in tracked:
                v = values(t)
                t.current = t.hpa.evaluate(now - t0, t.current, v)
                t.series.append((now - t0, v, t.current))
        time.sleep(0.5)
    for t in tracked:
        say(f"autoscaling: {t.hpa.name} desired replicas over time: "
            + " ".join(f"{d}@{s:.0f}s" for s, _, d in _changes(t.series)))  # fmt: skip
    return Result(capacity_per_s, at_capacity, window_scale, load_series, tracked, queries, len(gateways))


def _changes(series: list[tuple[float, dict[str, float], int]]) -> list[tuple[float, dict[str, float], int]]:
    """The first point and every point where the desired count changed."""
    out = []
    for s in series:
        if not out or s[2] != out[-1][2]:
            out.append(s)
    return out


def plot(result: Result, path: Path) -> Path:
    """Offered load and each HPA's desired replicas over time, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.2), dpi=90)
    ts = [t for t, _ in result.load]
    ax.step(ts, [r / result.capacity_per_s for _, r in result.load], where="post", color="0.6",
            label="offered load (x one gateway's capacity)")  # fmt: skip
    for t in result.tracked:
        ax.step([s for s, _, _ in t.series], [d for _, _, d in t.series], where="post", linewidth=2,
                label=f"{t.hpa.name}: desired replicas")  # fmt: skip
    ax.set_xlabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"HPA rehearsal (windows x{result.window_scale:g}; one gateway = {result.capacity_per_s:g} calls/s)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(result: Result, command: str) -> str:
    """deploy/README.md's section body."""
    lines = [
        f"Generated by `{command}` (scripts/rehearsal_autoscaling.py) with the rehearsal's 3 TF Serving stand-ins, "
        f"{result.real_gateways} gateways and Prometheus. The HPAs and adapter rules are read from deploy/k8s/base "
        "and deploy/prometheus/adapter/config.yaml at run time; the queries evaluated:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in result.queries.items()]
    for t in result.tracked:
        lines += [f"- {t.hpa.name}: skipped {s}" for s in t.skipped]
    lines += [
        "",
        f"**One gateway's capacity is defined, not found**: this machine's two cores are shared by every process, so "
        f"a gateway never reaches its production target. Here one gateway's capacity = {result.capacity_per_s:g} "
        f"calls/s; at that rate a gateway used {result.cpu_at_capacity_cores * 1000:.0f}m of CPU (process and "
        "children, /proc), so each CPU target is scaled to make that CPU exactly the target (the factor is in the list "
        "above). The load steps from 0.5x to 3x that capacity and back. The "
        "replicas are not really added: each HPA's current count follows its own decisions and the measured total "
        "is divided over it (even spreading assumed). Every time constant of the pipeline is multiplied by "
        f"{result.window_scale:g}: the queries' range selectors (at least 4 s; `[1m]` -> "
        f"`[{max(4, 60 * result.window_scale):g}s]`), the stabilisation windows and the policy periods (300 s "
        f"scale-down window -> {300 * result.window_scale:g} s). Pods metrics of the gateway HPA get the same "
        "treatment as CPU: the target becomes the value the query returned at one gateway's capacity. Other HPAs "
        "keep their manifest's targets: the TF Serving stand-ins run TensorFlow on the same shared cores, far "
        "slower than a GPU, so their queue (outstanding batches) is long at any load here and that HPA asks for "
        "more replicas, up to its maximum: it shows the adapter rule and the algorithm at work, not a GPU's "
        "capacity. Decisions every 2 s (the HPA's sync period is 15 s).",
        "",
        "| t (s) | offered (x capacity) | " + " | ".join(f"{t.hpa.name} desired" for t in result.tracked) + " |",
        "|---|---|" + "---|" * len(result.tracked),
    ]
    times = sorted(
        {s for t in result.tracked for s, _, _ in _changes(t.series)} | {t for t, _ in _load_changes(result)}
    )
    for when in times:
        rate = [r for t, r in result.load if t <= when + 1e-9][-1]
        cells = []
        for t in result.tracked:
            d = [x for x in t.series if x[0] <= when + 1e-9][-1]
            metric = ", ".join(f"{k} {v:.3g}" for k, v in d[1].items())
            cells.append(f"{d[2]} ({metric})" if metric else str(d[2]))
        lines.append(f"| {when:.0f} | {rate / result.capacity_per_s:g} | " + " | ".join(cells) + " |")
    lines += ["", "![desired replicas under a stepped load](hpa-rehearsal.png)"]
    return "\n".join(wrap(line) for line in lines)


def _load_changes(result: Result) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for t, r in result.load:
        if not out or r != out[-1][1]:
            out.append((t, r))
    return out


def wrap(line: str) -> str:
    """A prose line or list item wrapped at 115 columns; table rows and images as they are."""
    if not line or line[0] in "|!":
        return line
    return textwrap.fill(line, 115, subsequent_indent="  " if line.startswith("- ") else "", break_on_hyphens=False)
