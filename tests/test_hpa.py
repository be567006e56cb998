"""scripts/hpa.py: the Kubernetes HPA replica calculation (tolerance, stabilisation, rate policies, bounds).

Pure arithmetic on made-up clocks; runs in well under a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from hpa import HPA, MetricTarget, desired_for_metric, quantity  # noqa: E402

PODS16 = MetricTarget("Pods", "inflight", "AverageValue", 16)


def test_quantities() -> None:
    assert quantity("16") == 16 and quantity("500m") == 0.5 and quantity("2k") == 2000 and quantity(3) == 3


def test_desired_is_ceil_of_ratio_times_current_outside_the_tolerance() -> None:
    assert desired_for_metric(PODS16, 2, 48) == 6  # 3x the target per pod
    assert desired_for_metric(PODS16, 2, 17.5) == 2  # ratio 1.09: inside the tolerance
    assert desired_for_metric(PODS16, 2, 17.7) == 3  # just outside: ceil(2.2125)
    assert desired_for_metric(PODS16, 4, 4) == 1
    util = MetricTarget("Resource", "cpu", "Utilization", 70)
    assert desired_for_metric(util, 3, 140) == 6


def test_external_average_value_divides_the_total_by_the_replicas() -> None:
    ext = MetricTarget("External", "outstanding", "AverageValue", 4)
    assert desired_for_metric(ext, 2, 24) == 6  # 24 in all / 4 per replica
    assert desired_for_metric(ext, 2, 8.5) == 2  # ratio 8.5 / 8 inside the tolerance


def hpa(**behavior: dict) -> HPA:
    return HPA.from_manifest({"metadata": {"name": "g"}, "spec": {
        "minReplicas": 2, "maxReplicas": 20, "behavior": behavior,
        "metrics": [{"type": "Pods", "pods": {
            "metric": {"name": "inflight"}, "target": {"type": "AverageValue", "averageValue": "16"}}}]}})  # fmt: skip


def test_scale_up_is_limited_by_the_most_permissive_policy_per_period() -> None:
    h = hpa(
        scaleUp={
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 30},
                {"type": "Pods", "value": 4, "periodSeconds": 30},
            ],
        }
    )
    assert h.evaluate(0, 2, {"inflight": 16 * 10}) == 6  # wants 20: 2 + 4 pods beats 2 x 2
    assert h.evaluate(10, 6, {"inflight": 16 * 20 / 6}) == 6  # same period: 2 at its start, both limits spent
    assert h.evaluate(31, 6, {"inflight": 16 * 20 / 6}) == 12  # a new period: 6 x 2 beats 6 + 4


def test_min_select_policy_takes_the_least_permissive() -> None:
    h = hpa(
        scaleUp={
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Min",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 30},
                {"type": "Pods", "value": 1, "periodSeconds": 30},
            ],
        }
    )
    assert h.evaluate(0, 2, {"inflight": 160}) == 3


def test_scale_down_waits_for_the_stabilisation_window_then_follows_the_policy() -> None:
    h = hpa(scaleDown={"stabilizationWindowSeconds": 60, "selectPolicy": "Min",
                       "policies": [{"type": "Percent", "value": 20, "periodSeconds": 60}]})  # fmt: skip
    assert h.evaluate(0, 10, {"inflight": 16}) == 10  # at target
    assert h.evaluate(15, 10, {"inflight": 1.6}) == 10  # wants 1, but 10 was recommended 15 s ago
    assert h.evaluate(61, 10, {"inflight": 1.6}) == 8  # window passed: 20 % of 10 per minute
    assert h.evaluate(70, 8, {"inflight": 2}) == 8  # the minute's 20 % is spent
    assert h.evaluate(122, 8, {"inflight": 2}) == 6  # floor(8 x 0.8)
    assert h.evaluate(200, 6, {"inflight": 0}) == 4
    assert h.evaluate(300, 4, {"inflight": 0}) == 3
    assert h.evaluate(400, 3, {"inflight": 0}) == 2  # minReplicas


def test_scale_up_window_takes_the_lowest_recent_recommendation() -> None:
    h = hpa(scaleUp={"stabilizationWindowSeconds": 30, "policies": [{"type": "Pods", "value": 10,
                                                                     "periodSeconds": 15}]})  # fmt: skip
    assert h.evaluate(0, 2, {"inflight": 16}) == 2
    assert h.evaluate(10, 2, {"inflight": 64}) == 2  # a spike: 2 is still in the window
    assert h.evaluate(31, 2, {"inflight": 64}) == 8


def test_disabled_direction_and_bounds() -> None:
    h = hpa(scaleDown={"selectPolicy": "Disabled", "policies": [{"type": "Pods", "value": 1, "periodSeconds": 1}]})
    assert h.evaluate(0, 5, {"inflight": 0}) == 5
    assert h.evaluate(1000, 5, {"inflight": 16 * 100}) == 10  # default scale-up: 100 % (beats 4 pods) per 15 s
    assert h.evaluate(2000, 19, {"inflight": 16 * 100}) == 20  # maxReplicas
    assert h.evaluate(3000, 3, {}) == 3  # no metric value: no change


def _value(h: HPA, per_replica: float, replicas: int) -> dict[str, float]:
    """Each metric's value as the HPA reads it when every replica carries ``per_replica`` x its target."""
    out = {}
    for m in h.metrics:
        v = per_replica * m.target
        out[m.name] = v * replicas if (m.source == "External" and m.target_type == "AverageValue") else v
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "k8s" / "base").glob("*hpa.yaml")), ids=lambda p: p.name)
def test_the_shipped_hpas_scale_as_their_targets_say(path: Path) -> None:
    """Each shipped HPA, read from deploy/ and driven by the HPA algorithm: at its target it holds; at 3x its
    target it scales up within its policies; held there it reaches maxReplicas and no further; with no load it
    comes back to minReplicas only after its scale-down stabilisation window, and never below."""
    h = HPA.from_manifest(yaml.safe_load(path.read_text()), window_scale=0.1)
    assert h.metrics and 1 <= h.min_replicas < h.max_replicas
    assert all(p["periodSeconds"] > 0 for p in h.scale_up["policies"] + h.scale_down["policies"])
    lo = h.min_replicas
    assert h.evaluate(0, lo, _value(h, 1.0, lo)) == lo, "at its target an HPA holds"
    up_window = h.scale_up["stabilizationWindowSeconds"]
    now, n, trail = 0.0, lo, []
    for _ in range(int(up_window) + 200):  # 3x per replica whatever the count: up to the maximum, then stay
        now += 1.0
        n = h.evaluate(now, n, _value(h, 3.0, n))
        trail.append((now, n))
    first_up = next(t for t, r in trail if r > lo)
    assert up_window - 1.0 <= first_up <= up_window + 2.0, f"scaled up at {first_up:.0f} s (window {up_window})"
    counts = [r for _, r in trail]
    assert counts == sorted(counts) and n == h.max_replicas and max(counts) == h.max_replicas, trail[-5:]
    window = h.scale_down["stabilizationWindowSeconds"]
    idle_from = now + 1.0
    down: list[tuple[float, int]] = []
    for _ in range(int(window) + 400):
        now += 1.0
        n = h.evaluate(now, n, _value(h, 0.0, n))
        down.append((now, n))
    assert n == lo and min(r for _, r in down) == lo, down[-5:]
    first_drop = next(t for t, r in down if r < h.max_replicas)
    assert first_drop - idle_from >= window - 1.0, f"scaled down {first_drop - idle_from:.0f} s into idle ({window})"
