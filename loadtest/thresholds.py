"""Pass/fail thresholds for ``quickdraw loadtest --fail-on``: a run that crosses one fails the command (CI gates).

Grammar (comma-separated conditions, each one ``METRIC OP VALUE``, blanks allowed around the parts)::

    METRIC  p50 | p90 | p95 | p99 | p99.9 | mean | max      latency, VALUE with ms or s   (p99>100ms, max>2s)
            errors                                          VALUE with % (share of calls) or none (a count)
            goodput                                         calls answered OK per second, VALUE bare or /s
    OP      >  or  <                                        the condition that FAILS the run

``--fail-on 'p99>100ms,errors>1%,goodput<50'`` fails a run whose p99 is over 100 ms, or that had more than 1%
of calls end in an error, or that answered fewer than 50 calls/s OK. A latency condition on a run that
recorded no call fails too (nothing was shown to be fast enough).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Latency metrics and the key of each in a run's summary (milliseconds).
LATENCY_KEYS = {"p50": "p50_ms", "p90": "p90_ms", "p95": "p95_ms", "p99": "p99_ms", "p99.9": "p99.9_ms",
                "mean": "mean_ms", "max": "max_ms"}  # fmt: skip
METRICS = (*LATENCY_KEYS, "errors", "goodput")

_CONDITION = re.compile(r"\s*([a-z0-9.]+)\s*([<>])\s*([0-9]*\.?[0-9]+)\s*(ms|s|%|/s)?\s*", re.IGNORECASE)


class ThresholdError(ValueError):
    """A --fail-on expression that does not parse; the message says which part and what is expected."""


@dataclass(frozen=True)
class Threshold:
    """One condition: the run fails when ``metric op value`` holds (value in ms, %, a count, or calls/s)."""

    text: str
    metric: str
    op: str
    value: float
    percent: bool = False  # errors: a share of calls rather than a count

    def measured(self, run: Mapping[str, Any]) -> float:
        """The run's value of this metric, in this threshold's unit."""
        if self.metric in LATENCY_KEYS:
            v = run[LATENCY_KEYS[self.metric]]
            return float("nan") if v is None else float(v)
        if self.metric == "errors":
            return float(run["error_pct"] if self.percent else run["errors"])
        return float(run["goodput_calls_per_s"])

    def unit(self) -> str:
        """How the value is shown."""
        if self.metric in LATENCY_KEYS:
            return " ms"
        if self.metric == "errors":
            return "%" if self.percent else " calls"
        return " calls/s"

    def crossed(self, run: Mapping[str, Any]) -> bool:
        """Whether the run fails this condition (a latency with no recorded call fails)."""
        v = self.measured(run)
        if math.isnan(v):
            return True
        return v > self.value if self.op == ">" else v < self.value


def parse(expression: str) -> list[Threshold]:
    """The conditions of a --fail-on expression (ThresholdError, naming the bad part, when it does not parse)."""
    out = []
    parts = expression.split(",")
    if not expression.strip():
        raise ThresholdError("empty --fail-on expression: give conditions such as 'p99>100ms,errors>1%'")
    for part in parts:
        m = _CONDITION.fullmatch(part)
        if m is None:
            raise ThresholdError(f"cannot parse {part.strip()!r}: expected METRIC>VALUE or METRIC<VALUE, e.g. "
                                 "p99>100ms, errors>1%, goodput<50")  # fmt: skip
        metric, op, number, unit = m.group(1).lower(), m.group(2), float(m.group(3)), (m.group(4) or "").lower()
        if metric not in METRICS:
            raise ThresholdError(f"unknown metric {metric!r} in {part.strip()!r}: use one of {', '.join(METRICS)}")
        if metric in LATENCY_KEYS:
            if unit not in ("ms", "s"):
                raise ThresholdError(f"{part.strip()!r}: a latency needs a unit, ms or s (e.g. {metric}>100ms)")
            value = number * 1000.0 if unit == "s" else number
            out.append(Threshold(part.strip(), metric, op, value))
        elif metric == "errors":
            if unit not in ("", "%"):
                raise ThresholdError(f"{part.strip()!r}: errors take a percentage (errors>1%) or a count (errors>0)")
            out.append(Threshold(part.strip(), metric, op, number, percent=unit == "%"))
        else:
            if unit not in ("", "/s"):
                raise ThresholdError(f"{part.strip()!r}: goodput is in calls per second (goodput<50 or goodput<50/s)")
            out.append(Threshold(part.strip(), metric, op, number))
    return out


def failures(thresholds: Sequence[Threshold], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (run, crossed condition): what was measured against the limit. Empty when every run passes."""
    lines = []
    for i, run in enumerate(runs):
        label = f"{run['offered_rate']:g}/s" if run.get("mode") == "open" else f"{run.get('concurrency')} callers"
        for t in thresholds:
            if t.crossed(run):
                v = t.measured(run)
                shown = "no calls" if math.isnan(v) else f"{v:.2f}{t.unit()}"
                lines.append(f"run {i + 1} ({label}): {t.text} crossed: {t.metric} = {shown}")
    return lines
