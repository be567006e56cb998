"""Write RELIABILITY.md from the tallies the fault tests and the soak left in test-artifacts/ (``make reliability``)."""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "test-artifacts"
ORDER = ["backend-killed", "slow-backend", "wedged-backend", "overload-5x", "overload-5x-strokes", "largest-requests",
         "unread-stream", "sigterm", "sigterm-slow-backend", "hot-reload-embedded", "hot-reload-tfserving"]

REHEARSAL = "## Production-topology rehearsal"

HEAD = """# Reliability

What happened to every call while a fault was injected under load. Each row is one run of a fault test in
`tests/test_reliability.py` (real gateway and TF Serving stand-in processes, open-loop load, every call with
a deadline). **Lost** means no answer by the call's deadline plus 100 ms. Regenerate with `make reliability`
(the fault tests, then this file); the soak row comes from `make soak`.

"""


def main() -> int:
    """Build the table; fails if a tally is missing."""
    rows = []
    missing = []
    for name in ORDER:
        f = ART / "reliability" / f"{name}.json"
        if not f.exists():
            missing.append(name)
            continue
        rows.append(json.loads(f.read_text()))
    if missing:
        print(f"missing tallies {missing}: run the fault tests first (make reliability)", file=sys.stderr)
        return 1
    codes = sorted({c for r in rows for c in r["codes"]})
    lines = [HEAD, "| fault | sent | OK | " + " | ".join(codes) + " | lost | notes | reproduce |",
             "|---" * (len(codes) + 6) + "|"]  # fmt: skip
    for r in rows:
        notes = ", ".join(f"{k} {v}" for k, v in r.items()
                          if k not in {"name", "fault", "sent", "ok", "codes", "lost", "command"})  # fmt: skip
        lines.append(f"| {r['fault']} | {r['sent']} | {r['ok']} | "
                     + " | ".join(str(r["codes"].get(c, 0)) for c in codes)
                     + f" | **{r['lost']}** | {notes} | `{r['command']}` |")  # fmt: skip
    soak = ART / "soak.json"
    if soak.exists():
        s = json.loads(soak.read_text())
        lines += ["", "## Soak", "",
                  f"`{s['command']}`: {s['calls']:,} calls in {s['duration_s']:.0f} s "
                  f"({s['throughput_calls_per_s']:.0f}/s, mixed bitmaps, PNGs and strokes, 16 callers), "
                  f"errors {s['errors']}, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; gateway RSS "
                  f"{s['rss_baseline_mib']} MiB after warm-up, {s['rss_final_mib']} MiB at the end "
                  f"({s['rss_growth']:+.2%}; limit +5%): {'passed' if s['passed'] else 'FAILED'}."]  # fmt: skip
    lines += ["", f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()} with {_cores()} cores "
              "(a shared machine: latencies are indicative, the counts are exact)."]  # fmt: skip
    # The rehearsal's section (scripts/rehearsal.py, `make rehearsal`) is generated separately: keep it.
    old = (ROOT / "RELIABILITY.md").read_text() if (ROOT / "RELIABILITY.md").exists() else ""
    kept = old[old.index(REHEARSAL):] if REHEARSAL in old else ""
    (ROOT / "RELIABILITY.md").write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print(f"wrote {ROOT / 'RELIABILITY.md'}")
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
