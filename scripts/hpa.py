"""The Kubernetes HorizontalPodAutoscaler's replica calculation (autoscaling/v2), as a small pure model.

Follows kube-controller-manager's podautoscaler (replica_calculator.go, horizontal.go):

- per metric: usage ratio = metric / target (a Pods or AverageValue metric: the mean per pod, or the total over
  the current replica count for an External AverageValue; Utilization: mean % of requests over the target %);
  within the tolerance (|ratio - 1| <= 0.1) the count stays, else desired = ceil(ratio x current replicas);
  an External metric with a Value target: desired = ceil(ratio x current) too;
- several metrics: the largest desired count;
- stabilisation: the recommendation is held between the lowest recommendation of the scale-up window and the
  highest of the scale-down window (both include the current one);
- rate policies (``behavior``): a scale-up may reach at most, per policy, the replicas at the start of its
  period plus ``value`` pods or ``value`` percent (Max: the most permissive policy, Min: the least); a
  scale-down likewise; ``selectPolicy: Disabled`` forbids that direction; no ``behavior`` means Kubernetes'
  defaults (up: 0 s window, 100 % or 4 pods per 15 s, Max; down: 300 s window, 100 % per 15 s);
- then min/max replicas.

Times are seconds on any clock the caller chooses; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 0.1

DEFAULT_SCALE_UP: dict[str, Any] = {
    "stabilizationWindowSeconds": 0,
    "selectPolicy": "Max",
    "policies": [
        {"type": "Percent", "value": 100, "periodSeconds": 15},
        {"type": "Pods", "value": 4, "periodSeconds": 15},
    ],
}
DEFAULT_SCALE_DOWN: dict[str, Any] = {
    "stabilizationWindowSeconds": 300,
    "selectPolicy": "Max",
    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("16", "500m", "1k", "2Ki") as a number."""
    if isinstance(value, int | float):
        return float(value)
    s = str(value).strip()
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("m", 1e-3), ("k", 1e3), ("M", 1e6),
                           ("G", 1e9)):  # fmt: skip
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


@dataclass(frozen=True)
class MetricTarget:
    """One entry of ``spec.metrics``: its type (Pods, External, Resource), metric name and target."""

    source: str  # Pods | External | Resource | ContainerResource | Object
    name: str
    target_type: str  # AverageValue | Value | Utilization
    target: float

    @staticmethod
    def from_spec(m: dict[str, Any]) -> MetricTarget:
        """From one ``spec.metrics`` item."""
        source = m["type"]
        body = m[source[0].lower() + source[1:]]
        name = body["metric"]["name"] if "metric" in body else body["name"]
        t = body["target"]
        kind = t["type"]
        value = (
            t["averageUtilization"]
            if kind == "Utilization"
            else t["averageValue" if kind == "AverageValue" else "value"]
        )
        return MetricTarget(source, name, kind, quantity(value))


def desired_for_metric(metric: MetricTarget, current: int, value: float) -> int:
    """The replica count one metric asks for, given its value as the HPA reads it.

    ``value``: for Pods and Resource metrics the mean over the current pods (per pod; % of requests for
    Utilization); for External metrics the total the adapter returns."""
    if current <= 0:
        return current
    if metric.source == "External" and metric.target_type == "AverageValue":
        ratio = value / (metric.target * current)
    else:
        ratio = value / metric.target
    if abs(ratio - 1.0) <= TOLERANCE:
        return current
    return math.ceil(ratio * current)


@dataclass
class HPA:
    """One HorizontalPodAutoscaler's state: its spec, past recommendations and scale events."""

    name: str
    min_replicas: int
    max_replicas: int
    metrics: list[MetricTarget]
    scale_up: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCALE_UP))
    scale_down: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCALE_DOWN))
    #: (time, recommendation) of past evaluations
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    #: (time, replica change) of past scale events
    events: list[tuple[float, int]] = field(default_factory=list)

    @staticmethod
    def from_manifest(obj: dict[str, Any], window_scale: float = 1.0) -> HPA:
        """From an autoscaling/v2 HorizontalPodAutoscaler object; ``window_scale`` shortens every stabilisation
        window and policy period by that factor (for a rehearsal that cannot wait five minutes)."""
        spec = obj["spec"]
        behavior = spec.get("behavior") or {}

        def rules(key: str, default: dict[str, Any]) -> dict[str, Any]:
            r = {**default, **(behavior.get(key) or {})}
            r["stabilizationWindowSeconds"] = r.get("stabilizationWindowSeconds", 0) * window_scale
            r["policies"] = [{**p, "periodSeconds": p["periodSeconds"] * window_scale} for p in r["policies"]]
            r.setdefault("selectPolicy", "Max")
            return r

        return HPA(name=obj["metadata"]["name"], min_replicas=int(spec.get("minReplicas", 1)),
                   max_replicas=int(spec["maxReplicas"]), metrics=[MetricTarget.from_spec(m) for m in spec["metrics"]],
                   scale_up=rules("scaleUp", DEFAULT_SCALE_UP),
                   scale_down=rules("scaleDown", DEFAULT_SCALE_DOWN))  # fmt: skip

    def evaluate(self, now: float, current: int, values: dict[str, float]) -> int:
        """One reconcile: the new replica count for metric ``values`` (by metric name); records the scale event.

        A metric missing from ``values`` is skipped (as the HPA does when the adapter has no value)."""
        desired = [desired_for_metric(m, current, values[m.name]) for m in self.metrics if m.name in values]
        if not desired:
            return current
        proposed = max(desired)
        stabilised = self._stabilise(now, current, proposed)
        limited = self._rate_limit(now, current, stabilised)
        new = min(self.max_replicas, max(self.min_replicas, limited))
        if new != current:
            self.events.append((now, new - current))
        return new

    def _stabilise(self, now: float, current: int, proposed: int) -> int:
        up_cut = now - self.scale_up["stabilizationWindowSeconds"]
        down_cut = now - self.scale_down["stabilizationWindowSeconds"]
        up = down = proposed
        for t, r in self.recommendations:
            if t > up_cut:
                up = min(up, r)
            if t > down_cut:
                down = max(down, r)
        self.recommendations.append((now, proposed))
        keep = now - max(self.scale_up["stabilizationWindowSeconds"], self.scale_down["stabilizationWindowSeconds"])
        self.recommendations = [(t, r) for t, r in self.recommendations if t > keep]
        rec = current
        rec = max(rec, up)
        return min(rec, down)

    def _changed_within(self, now: float, period: float, sign: int) -> int:
        return sum(abs(d) for t, d in self.events if t > now - period and d * sign > 0)

    def _rate_limit(self, now: float, current: int, desired: int) -> int:
        if desired > current:
            rules = self.scale_up
            if rules["selectPolicy"] == "Disabled":
                return current
            pick_max = rules["selectPolicy"] == "Max"
            limit = None
            for p in rules["policies"]:
                start = current - self._changed_within(now, p["periodSeconds"], +1)
                proposed = start + p["value"] if p["type"] == "Pods" else math.ceil(start * (1 + p["value"] / 100))
                limit = proposed if limit is None else (max(limit, proposed) if pick_max else min(limit, proposed))
            limit = max(limit if limit is not None else current, current)
            return min(desired, limit, self.max_replicas)
        if desired < current:
            rules = self.scale_down
            if rules["selectPolicy"] == "Disabled":
                return current
            pick_max = rules["selectPolicy"] == "Max"  # the policy allowing the biggest change: the lowest floor
            limit = None
            for p in rules["policies"]:
                start = current + self._changed_within(now, p["periodSeconds"], -1)
                proposed = start - p["value"] if p["type"] == "Pods" else int(start * (1 - p["value"] / 100))
                limit = proposed if limit is None else (min(limit, proposed) if pick_max else max(limit, proposed))
            limit = min(limit if limit is not None else current, current)
            return max(desired, limit, self.min_replicas)
        return desired
