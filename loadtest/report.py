"""Reports: a text table, a JSON file, and PNG plots (latency percentiles against throughput, and over time)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(runs: Sequence[dict[str, Any]]) -> str:
    """One line per run: load, throughput and goodput, latency (mean and percentiles), errors, late sends.

    ``calls/s`` counts every answered call, OK or not; ``ok/s`` (goodput) and ``drawings/s`` only those answered
    OK. ``err%`` is the share of calls that did not end OK; ``late`` the open loop's late sends (:func:`late_note`).
    """
    head = (f"{'load':>16} {'calls/s':>9} {'ok/s':>9} {'drawings/s':>10} {'mean ms':>8} {'p50 ms':>8} {'p90 ms':>8} "
            f"{'p95 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'err%':>6} {'late':>6}  errors")  # fmt: skip
    lines = [head]
    for r in runs:
        load = f"{r['offered_rate']:.0f}/s {r['arrival']}" if r["mode"] == "open" else f"{r['concurrency']} callers"
        errs = ", ".join(f"{k} {v}" for k, v in r["codes"].items() if k != "OK") or "0"
        late = f"{r['late_sends']}" if r["mode"] == "open" else "-"
        lines.append(
            f"{load:>16} {r['throughput_calls_per_s']:9.1f} {r['goodput_calls_per_s']:9.1f} "
            f"{r['drawings_per_s']:10.1f} {r['mean_ms']:8.2f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} "
            f"{r['p95_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['p99.9_ms']:9.2f} {r['max_ms']:8.1f} {r['error_pct']:5.1f}% {late:>6}  {errs}"
        )
    return "\n".join(lines)


def late_note(runs: Sequence[dict[str, Any]]) -> str | None:
    """What the late sends of open-loop runs mean, when there were any (None otherwise)."""
    late = [(r, r["late_sends"]) for r in runs if r["mode"] == "open" and r["late_sends"]]
    if not late:
        return None
    worst = max(late, key=lambda x: x[0]["late_send_pct"])[0]
    return (f"late sends: {sum(n for _, n in late)} calls were sent more than 1 ms after they were due (worst run: "
            f"{worst['late_send_pct']:.0f}% of its calls). The load generator fell behind its schedule (its CPU, or "
            "its cap on calls in flight). Their latency is still measured from when they were due (coordinated "
            "omission corrected), so the percentiles include the wait; but the offered rate was not fully "
            "applied: give the generator more CPU or --channels, or lower --rate.")  # fmt: skip


def best_under_slo(runs: Sequence[dict[str, Any]], slo_p99_ms: float) -> dict[str, Any] | None:
    """The run with the highest throughput whose p99 meets the SLO and that had no errors."""
    ok = [r for r in runs if r["p99_ms"] <= slo_p99_ms and r["errors"] == 0]
    return max(ok, key=lambda r: r["throughput_calls_per_s"]) if ok else None


def write_json(path: Path, target: str, runs: Sequence[dict[str, Any]], slo_p99_ms: float | None) -> None:
    """The whole report (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    best = best_under_slo(runs, slo_p99_ms) if slo_p99_ms is not None else None
    doc = {"target": target, "slo_p99_ms": slo_p99_ms, "runs": list(runs), "best_under_slo": best}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(doc), indent=1) + "\n")


#: A timeline's last second is plotted only when the run covered at least this share of it: its calls are shown
#: as a rate over the part of the second the run lasted, and a sliver of a second is too short for a rate.
MIN_PARTIAL_SECOND = 0.5


def call_rates(run: dict[str, Any]) -> list[tuple[float, float]]:
    """(second, calls answered per second) over a run's timeline, for the throughput plot.

    The timeline counts the calls that finished in each whole second since the warm-up ended, and the run stops
    part of the way through its last second: that second's count is divided by the part it covered (a plain
    count would draw a drop towards 0 calls/s that never happened), or left out when the part is under
    ``MIN_PARTIAL_SECOND``. Seconds after the run's end (calls still answered while it stopped) are left out too.
    """
    duration = float(run.get("duration_s") or 0.0)
    out = []
    for point in run["timeline"]:
        covered = min(1.0, duration - point["t_s"]) if duration else 1.0
        if covered >= MIN_PARTIAL_SECOND:
            out.append((point["t_s"], point["calls"] / covered))
    return out


def plot(out_dir: Path, runs: Sequence[dict[str, Any]], slo_p99_ms: float | None, title: str) -> list[Path]:
    """``latency-vs-throughput.png`` and ``latency-over-time.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    runs = sorted(runs, key=lambda r: r["throughput_calls_per_s"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["throughput_calls_per_s"] for r in runs]
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-"), ("p99.9_ms", "v-")):
        ax.plot(x, [r[key] for r in runs], style, label=key.removesuffix("_ms"))
    if slo_p99_ms is not None:
        ax.axhline(slo_p99_ms, color="red", linestyle="--", linewidth=1, label=f"p99 SLO {slo_p99_ms:g} ms")
    ax.set_xlabel("throughput (calls/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{title}: latency percentiles against throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out_dir / "latency-vs-throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in runs:
        tl = r["timeline"]
        label = f"{r['offered_rate']:.0f}/s" if r["mode"] == "open" else f"{r['concurrency']} callers"
        t = [s["t_s"] for s in tl]
        line = top.plot(t, [s["p99_ms"] for s in tl], "-", label=f"p99, {label}")[0]
        top.plot(t, [s["p50_ms"] for s in tl], ":", color=line.get_color(), label=f"p50, {label}")
        rates = call_rates(r)
        bottom.plot([x for x, _ in rates], [y for _, y in rates], "-", color=line.get_color(), label=label)
    top.set_ylabel("latency (ms): p99 solid, p50 dotted")
    top.set_yscale("log")
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=7)
    top.set_title(f"{title}: latency over time")
    bottom.set_ylabel("calls answered per second")
    bottom.set_xlabel("seconds since warm-up ended")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    p = out_dir / "latency-over-time.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written
