"""``make rehearsal``'s roll-out rows: a 10% canary, a good candidate shadowed and promoted, a bad one refused.

They run after the other events, under the same open-loop load, through the gateways' ``--rollout-file`` (every
gateway re-reads it within half a second) and TF Serving version labels in each replica's model config file:

7. **canary**: a retrained candidate rolled out as version 2 under the label ``canary``; the plan sends 10% of
   versionless calls to ``canary`` (90% to ``stable``) and shadows a quarter of the calls to it; held until the
   gateways have split 2,000 versionless calls; the row gives the canary's share as the gateways counted it
   (``quickdraw_split_calls_total`` in Prometheus) against the binomial 99% interval, and the gate's decision
   (``quickdraw rollout status``, reading Prometheus);
8. **shadow, promoted**: no split, a quarter of the calls shadowed to ``canary``; once enough drawings are compared,
   ``quickdraw rollout promote`` is asked (the gate must say promote) and rewrites the plan: every versionless call
   to version 2; then the platform moves ``stable`` to 2 on every replica;
9. **shadow, refused**: the shipped weights perturbed (scripts/perturb_model.py: test top-1 down 10 points or more)
   rolled out as version 3 under ``canary``, a quarter of the calls shadowed to it; ``quickdraw rollout promote``
   must refuse, and ``quickdraw rollout abort`` resets the plan.

The candidates are made once and kept under ``.rehearsal/candidates`` (keyed by the shipped model): the retrained
one by ``quickdraw train --init-from`` (one epoch on 400 drawings a class at learning rate 1e-4, another seed: test
top-1 within a point of the shipped model's, top-1 agreement with it about 0.97), the bad one by
``scripts/perturb_model.py`` (agreement about 0.82).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rehearsal_topology import ROOT, Options, Phase, Topology, say

from service.dataplane.rollout import RolloutPlan

CACHE = ROOT / ".rehearsal" / "candidates"
SHIPPED = ROOT / "models" / "quickdraw" / "1"
#: Versionless calls the gateways split in the canary row (its split is judged on them).
CANARY_CALLS = 2000
#: Compared drawings the gate asks for here (``quickdraw rollout status --min-compared``).
MIN_COMPARED = 400
#: The gate's latency test here: the medians over the last minute. Three replicas, two gateways, Prometheus and the
#: load share two cores with whatever else runs on the machine, and a candidate version's first calls after its
#: load are slow: a p99 of a few hundred shadowed calls since start is that noise, not the candidate.
GATE_WINDOW = "60s"
GATE_LATENCY = ("--latency-quantile", "0.5", "--window", GATE_WINDOW)
#: Share of calls shadowed. Each shadowed call is one more Predict for the replicas, which share this machine's
#: cores with everything else here and pad every batch to 16 drawings (batching.config): a quarter of the calls is
#: what they have room for at the rehearsal's rate, as an operator picks a fraction the fleet has headroom for.
SHADOW_FRACTION = 0.25


def binomial_interval(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """The central ``level`` interval of Binomial(n, p), from its exact CDF (in log space)."""
    tail, cdf, lo = (1 - level) / 2, 0.0, None
    for k in range(n + 1):
        log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        cdf += math.exp(log_pmf + k * math.log(p) + (n - k) * math.log1p(-p))
        if lo is None and cdf >= tail:
            lo = k
        if cdf >= 1 - tail:
            return lo or 0, k
    return lo or 0, n


def candidates() -> tuple[Path, Path]:
    """(the retrained candidate, the bad one): version directories, made once per shipped model."""
    key = hashlib.sha256((SHIPPED / "saved_model.pb").read_bytes()).hexdigest()[:12]
    where = CACHE / key
    good, bad = where / "good" / "quickdraw" / "2", where / "bad" / "quickdraw" / "3"
    if not good.is_dir():
        say("training the retrained candidate once (quickdraw train --init-from, 1 epoch; cached)...")
        subprocess.run([sys.executable, "-m", "quickdraw", "train", "--init-from", str(SHIPPED), "--epochs", "1",
                        "--per-class", "400", "--seed", "7", "--learning-rate", "1e-4", "--out", str(good.parent),
                        "--version", "2", "--workdir", str(where / "runs")], check=True, cwd=ROOT)  # fmt: skip
    if not bad.is_dir():
        say("perturbing the shipped weights for the bad candidate once (scripts/perturb_model.py; cached)...")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "perturb_model.py"), "--model", str(SHIPPED),
                        "--out", str(bad.parent), "--version", "3"], check=True, cwd=ROOT)  # fmt: skip
    return good, bad


def write_plan(topo: Topology, plan: dict[str, Any]) -> None:
    """The gateways' rollout file, replaced whole; then time for every gateway to have read it."""
    RolloutPlan.model_validate(plan).write(topo.rollout_file)
    time.sleep(1.5)


def rollout(topo: Topology, action: str, candidate: int) -> tuple[int, str]:
    """``quickdraw rollout ACTION`` against the rehearsal's Prometheus: (exit code, its output)."""
    assert topo.prometheus is not None
    args = [sys.executable, "-m", "quickdraw", "rollout", action, "--prometheus", topo.prometheus.base,
            "--candidate", str(candidate), "--min-compared", str(MIN_COMPARED), *GATE_LATENCY,
            "--rollout-file", str(topo.rollout_file)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60)
    out = (done.stdout + done.stderr).strip()
    for line in out.splitlines():
        say(f"  {line}")
    return done.returncode, out


def decision(out: str) -> str:
    """The gate's decision line, short."""
    for line in out.splitlines():
        if line.startswith("decision:"):
            return line.removeprefix("decision: ")
    return out.splitlines()[-1] if out else "no output"


def split_counts(topo: Topology) -> dict[str, float]:
    """Versionless calls each split target got so far, over every gateway, as Prometheus has them."""
    assert topo.prometheus is not None
    rows = topo.prometheus.query("sum by (target) (quickdraw_split_calls_total)")
    return {r["metric"].get("target", ""): float(r["value"][1]) for r in rows}


def compared(topo: Topology, candidate: int) -> float:
    """Drawings compared with ``candidate`` over the gate's window, over every gateway, as Prometheus has them."""
    assert topo.prometheus is not None
    rows = topo.prometheus.query(f'sum(increase(quickdraw_shadow_compared_drawings_total{{candidate="{candidate}"}}'
                                 f"[{GATE_WINDOW}]))")  # fmt: skip
    return float(rows[0]["value"][1]) if rows else 0.0


def hold_until_compared(topo: Topology, candidate: int, timeout_s: float = 120) -> float:
    """Until Prometheus has ``MIN_COMPARED`` drawings (and a margin) compared with ``candidate`` within the gate's
    window."""
    t0 = time.monotonic()
    while (n := compared(topo, candidate)) < MIN_COMPARED * 1.25:
        if time.monotonic() - t0 > timeout_s:
            break
        time.sleep(1.0)
    time.sleep(2.0)  # a scrape past the last comparison
    return n


def run(reh: Any, topo: Topology, o: Options) -> None:
    """Rows 7-9 (see the module); ``reh`` is the running ``rehearsal.Rehearsal``."""
    good, bad = candidates()

    p: Phase = reh.phase("7 canary: 10% of versionless calls to label canary (v2, retrained)")
    topo.roll_out(2, good)
    reh.wait_all(p, {1, 2}, 1)
    for r in topo.replicas:
        r.write_config(1, canary=2)
    time.sleep(2 * o.config_poll_s)  # every replica's config poll has seen the canary label
    shadow = {"target": "canary", "fraction": SHADOW_FRACTION}
    before = split_counts(topo)
    write_plan(topo, {"split": {"stable": 90, "canary": 10}, "shadow": shadow})
    t0 = time.monotonic()
    while True:  # until the gateways have split CANARY_CALLS calls, as Prometheus counts them
        after = split_counts(topo)
        routed = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        if sum(routed.values()) >= CANARY_CALLS or time.monotonic() - t0 > 4 * CANARY_CALLS / o.rate_per_s:
            break
        time.sleep(1.0)
    n, k = round(sum(routed.values())), round(routed.get("canary", 0.0))
    lo, hi = binomial_interval(n, 0.10)
    write_plan(topo, {"split": {}, "shadow": shadow})  # the split ends here
    p.notes.append(f"split by the gateways: canary {k} of {n} versionless calls ({k / max(n, 1):.3f}); binomial 99% "
                   f"interval {lo}..{hi}: {'inside' if lo <= k <= hi else 'OUTSIDE'}")  # fmt: skip
    _, out = rollout(topo, "status", 2)
    p.notes.append(f"gate: {decision(out)}")

    p = reh.phase("8 shadow v2 (25% of calls); gate says promote; promoted")
    hold_until_compared(topo, 2)
    code, out = rollout(topo, "promote", 2)
    p.notes.append(f"promote exit {code}: {decision(out)}")
    time.sleep(1.5 + o.phase_s / 2)  # the gateways read the promoted plan; then calls go to version 2
    for r in topo.replicas:  # the platform then moves the label, and the plan goes back to empty
        r.write_config(2, canary=2)
    reh.wait_all(p, {1, 2}, 2)
    write_plan(topo, {"split": {}})

    p = reh.phase("9 shadow v3 (perturbed; 25% of calls); gate refuses; aborted")
    topo.roll_out(3, bad)
    reh.wait_all(p, {2, 3}, 2)  # models.config keeps the two newest versions loaded
    for r in topo.replicas:
        r.write_config(2, canary=3)
    time.sleep(2 * o.config_poll_s)
    write_plan(topo, {"split": {}, "shadow": {"target": "canary", "fraction": SHADOW_FRACTION}})
    hold_until_compared(topo, 3)
    code, out = rollout(topo, "promote", 3)
    p.notes.append(f"promote exit {code}: {decision(out)}")
    code, _ = rollout(topo, "abort", 3)
    p.notes.append(f"abort exit {code}")
    reh.hold(p, o.phase_s / 2)


def annotate(rows: list[Any]) -> None:
    """The canary row's answers by version, beside the split the gateways counted (in its notes)."""
    for row in rows:
        if row.event.startswith("7 canary"):
            n = sum(row.answered_by.values())
            row.notes = f"answered: v2 {row.answered_by.get(2, 0)} of {n} versionless OK; " + row.notes
