"""``quickdraw rollout status|promote|abort``: the promotion gate of a shadowed candidate, read from Prometheus.

The gateways export, per (stable, candidate) pair of versions, what their shadow compared
(``quickdraw_shadow_*``, service.dataplane.rollout). ``status`` sums it over every gateway Prometheus scrapes and
decides:

- **wait**: fewer than ``--min-compared`` drawings compared (exit 3);
- **refuse**: top-1 agreement below ``--min-agreement``, or the candidate's latency at ``--latency-quantile``
  (p99) over ``--max-latency-ratio`` x the stable version's (with ``--latency-slack-ms`` of slack for fast
  models) (exit 1);
- **promote**: otherwise (exit 0).

``promote`` checks the same gate (``--force`` skips it) and moves traffic: with ``--rollout-file``, the gateways' plan
sends every versionless call to the candidate and stops the shadow (they re-read the file within
``rollout_watch_s``); with ``--model-config`` and ``--label``, the label's ``version_labels`` entry in a TF Serving
model config file moves to the candidate (TF Serving re-reads it every ``--model_config_file_poll_wait_seconds``).
``abort`` sends every versionless call back to the stable version and stops the shadow, with no gate.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quickdraw.commands.common import UsageError

#: Exit codes of ``status`` (and of a refused ``promote``).
PROMOTE, REFUSE, WAIT = 0, 1, 3


@dataclass
class Gate:
    """What the gate saw for one (stable, candidate) pair, and its decision."""

    stable: str
    candidate: str
    compared: float
    agreement: float
    top3_overlap: float
    total_variation: float
    out_of_class_agreement: float | None
    stable_latency_s: float | None
    candidate_latency_s: float | None
    dropped: dict[str, float]
    #: The latency quantile compared (``--latency-quantile``).
    quantile: float = 0.99
    decision: str = "wait"
    reasons: tuple[str, ...] = ()


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "rollout",
        help="canary and shadow roll-outs: the promotion gate (status), promote, abort",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("status", "promote", "abort"), help="what to do")
    p.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL (default: %(default)s)")
    p.add_argument("--candidate", help="the candidate version (default: the one with the most compared drawings)")
    p.add_argument("--window", default="", help="a PromQL range (30m, 1h) to judge only the recent comparisons; "
                   "default: everything the gateways counted since they started")  # fmt: skip
    p.add_argument("--min-compared", type=int, default=500, help="drawings compared before any decision (default "
                   "%(default)s: at 95%% agreement, a 95%% interval of about +-2 points)")  # fmt: skip
    p.add_argument("--min-agreement", type=float, default=0.95, help="least top-1 agreement with the stable version "
                   "(default %(default)s)")  # fmt: skip
    p.add_argument("--max-latency-ratio", type=float, default=1.5, help="most candidate / stable latency at "
                   "--latency-quantile (default %(default)s)")  # fmt: skip
    p.add_argument("--latency-quantile", type=float, default=0.99, help="the latency quantile compared (default "
                   "%(default)s: p99)")  # fmt: skip
    p.add_argument("--latency-slack-ms", type=float, default=5.0, help="latency differences below this always pass "
                   "(default %(default)s)")  # fmt: skip
    p.add_argument("--rollout-file", type=Path, help="the gateways' --rollout-file: promote/abort rewrite its plan")
    p.add_argument("--model-config", type=Path, help="a TF Serving model config file whose --label entry promote "
                   "moves to the candidate")  # fmt: skip
    p.add_argument("--label", default="stable", help="the TF Serving label that promote moves (default: stable)")
    p.add_argument("--force", action="store_true", help="promote even when the gate does not say promote")
    p.add_argument("--json", action="store_true", help="print the gate as JSON")
    p.set_defaults(func=run)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except OSError as exc:
        raise UsageError(f"cannot query Prometheus at {base}: {exc}") from None
    if body.get("status") != "success":
        raise UsageError(f"Prometheus refused {promql!r}: {body.get('error')}")
    return list(body["data"]["result"])


def _by_pair(base: str, promql: str) -> dict[tuple[str, str], float]:
    out = {}
    for row in query(base, promql):
        value = float(row["value"][1])
        if math.isfinite(value):
            out[(row["metric"].get("stable", ""), row["metric"].get("candidate", ""))] = value
    return out


def gate(args: argparse.Namespace) -> Gate | None:
    """Read the shadow's metrics and decide; None when nothing was compared at all."""
    base, w = args.prometheus, args.window

    def total(metric: str) -> str:
        inner = f"increase({metric}[{w}])" if w else metric
        return f"sum by (stable, candidate) ({inner})"

    compared = _by_pair(base, total("quickdraw_shadow_compared_drawings_total"))
    if args.candidate is not None:
        compared = {k: v for k, v in compared.items() if k[1] == str(args.candidate)}
    if not compared:
        return None
    pair = max(compared, key=lambda k: compared[k])
    n = compared[pair]
    agreed = _by_pair(base, total("quickdraw_shadow_top1_agreements_total")).get(pair, 0.0)
    top3 = _by_pair(base, total("quickdraw_shadow_top3_overlap_ratio_sum")).get(pair, 0.0)
    top3_n = _by_pair(base, total("quickdraw_shadow_top3_overlap_ratio_count")).get(pair, 0.0)
    tv = _by_pair(base, total("quickdraw_shadow_total_variation_ratio_sum")).get(pair, 0.0)
    tv_n = _by_pair(base, total("quickdraw_shadow_total_variation_ratio_count")).get(pair, 0.0)
    ood = _by_pair(base, total("quickdraw_shadow_out_of_class_agreements_total")).get(pair)
    ood_n = _by_pair(base, total("quickdraw_shadow_out_of_class_compared_drawings_total")).get(pair)
    buckets = "quickdraw_shadow_duration_seconds_bucket"
    inner = f"rate({buckets}[{w}])" if w else buckets
    q = args.latency_quantile
    latency: dict[tuple[str, str], float] = {}
    for row in query(base, f"histogram_quantile({q:g}, sum by (le, role, version) ({inner}))"):
        value = float(row["value"][1])
        if math.isfinite(value):
            latency[(row["metric"].get("role", ""), row["metric"].get("version", ""))] = value
    dropped_q = "quickdraw_shadow_dropped_drawings_total"
    dropped_inner = f"increase({dropped_q}[{w}])" if w else dropped_q
    dropped = {row["metric"].get("reason", ""): float(row["value"][1])
               for row in query(base, f"sum by (reason) ({dropped_inner})")}  # fmt: skip
    g = Gate(
        stable=pair[0], candidate=pair[1], compared=n, agreement=agreed / n if n else 0.0,
        top3_overlap=top3 / top3_n if top3_n else 0.0, total_variation=tv / tv_n if tv_n else 0.0,
        out_of_class_agreement=(ood / ood_n) if ood is not None and ood_n else None,
        stable_latency_s=latency.get(("stable", pair[0])), candidate_latency_s=latency.get(("candidate", pair[1])),
        dropped=dropped, quantile=q,
    )  # fmt: skip
    decide(g, args)
    return g


def decide(g: Gate, args: argparse.Namespace) -> None:
    """Set the gate's decision and reasons from its numbers and the thresholds in ``args``."""
    reasons = []
    if g.compared < args.min_compared:
        g.decision, g.reasons = "wait", (f"{g.compared:.0f} drawings compared, fewer than --min-compared "
                                         f"{args.min_compared}",)  # fmt: skip
        return
    if g.agreement < args.min_agreement:
        reasons.append(f"top-1 agreement {g.agreement:.4f} is below --min-agreement {args.min_agreement}")
    if g.stable_latency_s is not None and g.candidate_latency_s is not None:
        stable, name = g.stable_latency_s, f"p{g.quantile * 100:g}"
        bound = max(stable * args.max_latency_ratio, stable + args.latency_slack_ms / 1000.0)
        if g.candidate_latency_s > bound:
            reasons.append(f"candidate {name} {g.candidate_latency_s * 1000:.1f} ms is over {bound * 1000:.1f} ms "
                           f"(--max-latency-ratio {args.max_latency_ratio} x stable {name} "
                           f"{stable * 1000:.1f} ms)")  # fmt: skip
    g.decision = "refuse" if reasons else "promote"
    g.reasons = tuple(reasons) or (f"top-1 agreement {g.agreement:.4f} >= {args.min_agreement} over "
                                   f"{g.compared:.0f} drawings; latency within bounds",)  # fmt: skip


def describe(g: Gate) -> str:
    """The gate as a few lines for a terminal."""

    def ms(s: float | None) -> str:
        return "n/a" if s is None else f"{s * 1000:.1f} ms"

    ood = "n/a" if g.out_of_class_agreement is None else f"{g.out_of_class_agreement:.4f}"
    dropped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(g.dropped.items()) if v) or "none"
    return "\n".join([
        f"candidate {g.candidate} against stable {g.stable}: {g.compared:.0f} drawings compared",
        f"  top-1 agreement        {g.agreement:.4f}",
        f"  top-3 overlap          {g.top3_overlap:.4f}",
        f"  total variation (mean) {g.total_variation:.4f}",
        f"  out-of-class agreement {ood}",
        f"  p{g.quantile * 100:g} latency{' ' * max(0, 12 - len(f'{g.quantile * 100:g}'))}stable "
        f"{ms(g.stable_latency_s)}, candidate {ms(g.candidate_latency_s)}",
        f"  dropped shadow work    {dropped}",
        f"decision: {g.decision.upper()}: " + "; ".join(g.reasons),
    ])  # fmt: skip


def write_plan(path: Path, plan: dict[str, Any]) -> None:
    """The rollout file, checked as the gateways check it and replaced atomically (``RolloutPlan.write``)."""
    from service.dataplane.rollout import RolloutPlan

    RolloutPlan.model_validate(plan).write(path)


def move_label(config: Path, label: str, version: str) -> int:
    """Point ``label`` at ``version`` in a TF Serving text model config; the version it pointed at before."""
    text = config.read_text(encoding="utf-8")
    pattern = re.compile(r'(version_labels\s*\{\s*key:\s*"' + re.escape(label) + r'"\s*value:\s*)(\d+)')
    found = pattern.search(text)
    if found is None:
        raise UsageError(f"{config} has no version_labels entry for {label!r}")
    tmp = config.with_name(f".{config.name}.tmp")
    tmp.write_text(pattern.sub(rf"\g<1>{version}", text, count=1), encoding="utf-8")
    tmp.replace(config)
    return int(found.group(2))


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if args.action == "abort":
        if args.rollout_file is None:
            raise UsageError("abort needs --rollout-file (the gateways' plan to reset)")
        write_plan(args.rollout_file, {"split": {}})
        print(f"aborted: {args.rollout_file} now sends every versionless call to the stable version, no shadow")
        return 0
    g = gate(args)
    if g is None:
        print("no shadow comparison found in Prometheus (quickdraw_shadow_compared_drawings_total is empty)")
        return WAIT
    print(json.dumps(asdict(g), indent=1) if args.json else describe(g))
    code = {"promote": PROMOTE, "refuse": REFUSE, "wait": WAIT}[g.decision]
    if args.action == "status":
        return code
    if code != PROMOTE and not args.force:
        print(f"not promoted: the gate says {g.decision} (--force promotes anyway)", file=sys.stderr)
        return code
    if args.rollout_file is None and args.model_config is None:
        raise UsageError("promote needs --rollout-file or --model-config (what to move)")
    if args.rollout_file is not None:
        write_plan(args.rollout_file, {"split": {g.candidate: 100}})
        print(f"promoted: {args.rollout_file} sends every versionless call to version {g.candidate}, no shadow")
    if args.model_config is not None:
        before = move_label(args.model_config, args.label, g.candidate)
        print(f"promoted: label {args.label!r} in {args.model_config} moved from {before} to {g.candidate}")
    return PROMOTE
