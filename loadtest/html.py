"""The HTML report of ``quickdraw loadtest``: one self-contained file (inline CSS and SVG, no script, nothing
fetched), in the style of ghz's: per run a summary, a latency histogram, a percentiles table and the status code
distribution. Written beside the JSON report (``--out report.json`` gives ``report.html``)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The percentiles table's rows: (label, key in a run's summary).
PERCENTILES = (("p50", "p50_ms"), ("p90", "p90_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"), ("p99.9", "p99.9_ms"),
               ("max", "max_ms"))  # fmt: skip

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 980px;
       color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { padding: .25rem .8rem; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b7f3b; }
.note { background: #fff8e1; padding: .5rem .8rem; border-left: 3px solid #f0b400; }
svg text { font-size: 11px; fill: #444; }
"""


def _ms(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f} ms"


def _label(run: dict[str, Any]) -> str:
    return f"{run['offered_rate']:g}/s {run['arrival']}" if run["mode"] == "open" else f"{run['concurrency']} callers"


def histogram_svg(buckets: Sequence[dict[str, float]], width: int = 900, bar_h: int = 16) -> str:
    """Horizontal bars, one per latency bucket (upper bound in ms, count), as ghz draws its histogram."""
    if not buckets:
        return "<p>No calls recorded.</p>"
    top = max(b["count"] for b in buckets) or 1
    total = sum(b["count"] for b in buckets) or 1
    label_w, count_w = 110, 130
    bar_w = width - label_w - count_w
    rows = []
    for i, b in enumerate(buckets):
        y = i * (bar_h + 4)
        w = bar_w * b["count"] / top
        rows.append(
            f'<text x="{label_w - 8}" y="{y + bar_h - 4}" text-anchor="end">&#8804; {b["le_ms"]:.3f} ms</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4c8bf5"></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h - 4}">{b["count"]} ({100 * b["count"] / total:.1f}%)</text>'
        )
    height = len(buckets) * (bar_h + 4)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="latency histogram">{"".join(rows)}</svg>')  # fmt: skip


def run_section(i: int, run: dict[str, Any]) -> str:
    """One run: summary, histogram, percentiles, status codes."""
    errors = "bad" if run["errors"] else "ok"
    summary = [
        ("Load", html.escape(_label(run))),
        ("Mode", f"{run['mode']} loop, api {html.escape(str(run['api']))}{', streaming' if run['stream'] else ''}"),
        ("Duration", f"{run['duration_s']:.2f} s"),
        ("Calls", f"{run['calls']}"),
        ("Throughput (all answered calls)", f"{run['throughput_calls_per_s']:.1f} calls/s"),
        ("Goodput (answered OK)", f"{run['goodput_calls_per_s']:.1f} calls/s, {run['drawings_per_s']:.1f} drawings/s"),
        ("Errors", f'<span class="{errors}">{run["errors"]} ({run["error_pct"]:.2f}%)</span>'),
        ("Mean latency", _ms(run["mean_ms"])),
        ("Slowest", _ms(run["max_ms"])),
    ]
    if run["mode"] == "open":
        summary.append(("Late sends", f"{run['late_sends']} ({run['late_send_pct']:.1f}%): sent over 1 ms after due, "
                                      "measured from when due"))  # fmt: skip
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in summary)
    pct = "".join(f"<tr><td>{k}</td><td>{_ms(run[key])}</td></tr>" for k, key in PERCENTILES)
    total = run["calls"] or 1
    codes = "".join(f"<tr><td>{html.escape(code)}</td><td>{n}</td><td>{100 * n / total:.2f}%</td></tr>"
                    for code, n in sorted(run["codes"].items(), key=lambda kv: -kv[1]))  # fmt: skip
    return (f"<h2>Run {i + 1}: {html.escape(_label(run))}</h2>"
            f"<h3>Summary</h3><table>{rows}</table>"
            f"<h3>Latency histogram</h3>{histogram_svg(run.get('latency_histogram', []))}"
            f"<h3>Latency distribution</h3><table><tr><th>percentile</th><th>latency</th></tr>{pct}</table>"
            f"<h3>Status code distribution</h3><table><tr><th>code</th><th>calls</th><th>share</th></tr>{codes}"
            "</table>")  # fmt: skip


def render(target: str, runs: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """The whole page."""
    body = "".join(run_section(i, r) for i, r in enumerate(runs))
    extra = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>quickdraw loadtest: '
            f"{html.escape(target)}</title><style>{STYLE}</style></head><body>"
            f"<h1>quickdraw loadtest: {html.escape(target)}</h1><p>{len(runs)} run(s). Latency in open loop is "
            "measured from each call's due time (coordinated omission corrected); in closed loop from when it was "
            f"sent.</p>{extra}{body}</body></html>\n")  # fmt: skip


def write_html(path: Path, target: str, runs: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> None:
    """Write the page to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(target, runs, notes), encoding="utf-8")
