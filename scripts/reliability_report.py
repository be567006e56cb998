"""Write RELIABILITY.md's fault table from the tallies the fault tests and the soak left in test-artifacts/
(``make reliability``), through a committed copy of them, docs/data/reliability.json.

``python scripts/reliability_report.py`` gathers test-artifacts/reliability/*.json (and test-artifacts/soak.json
when the soak ran), writes them with the date and the machine to docs/data/reliability.json, and renders
RELIABILITY.md from that file (keeping the rehearsal's section, which scripts/rehearsal.py writes). ``--check``
writes nothing and exits 1 when RELIABILITY.md's table is not what the committed tallies give
(tests/test_docs.py runs it), so the table cannot be edited by hand or go stale against its data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "test-artifacts"
DATA = ROOT / "docs" / "data" / "reliability.json"
REPORT = ROOT / "RELIABILITY.md"
ORDER = ["backend-killed", "slow-backend", "wedged-backend", "overload-5x", "overload-5x-strokes", "largest-requests",
         "unread-stream", "sigterm", "sigterm-slow-backend", "hot-reload-embedded", "hot-reload-tfserving"]

REHEARSAL = "## Production-topology rehearsal"

HEAD = """# Reliability

What happened to every call while a fault was injected under load. Each row is one run of a fault test in
`tests/test_reliability.py` (real gateway and TF Serving stand-in processes, open-loop load, every call with
a deadline). **Lost** means no answer by the call's deadline plus 100 ms. The rows about TF Serving run against
`tests/tfserving_standin.py`, a **stand-in** (TF Serving's gRPC API over the real SavedModel, in TensorFlow),
with the delays, hangs and kills each row names injected into it: not the `tensorflow_model_server` binary.
Regenerate with `make reliability` (the fault tests, then this file, through the committed tallies in
`docs/data/reliability.json`); `tests/test_docs.py` fails when this table is not what those tallies give.

"""


def gather() -> dict[str, Any] | None:
    """The tallies of the last fault-test run (and soak, if any), with when and where; None if one is missing."""
    rows, missing = [], []
    for name in ORDER:
        f = ART / "reliability" / f"{name}.json"
        if not f.exists():
            missing.append(name)
            continue
        rows.append(json.loads(f.read_text()))
    if missing:
        print(f"missing tallies {missing}: run the fault tests first (make reliability)", file=sys.stderr)
        return None
    soak = ART / "soak.json"
    return {"measured": f"{datetime.now(UTC):%Y-%m-%d}", "machine": platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "rows": rows,
            "soak": json.loads(soak.read_text()) if soak.exists() else None}  # fmt: skip


def render(data: dict[str, Any]) -> str:
    """RELIABILITY.md's fault section (everything before the rehearsal's) from the tallies."""
    rows = data["rows"]
    codes = sorted({c for r in rows for c in r["codes"]})
    lines = [HEAD, "| fault | sent | OK | " + " | ".join(codes) + " | lost | notes | reproduce |",
             "|---" * (len(codes) + 6) + "|"]  # fmt: skip
    for r in rows:
        notes = ", ".join(f"{k} {v}" for k, v in r.items()
                          if k not in {"name", "fault", "sent", "ok", "codes", "lost", "command"})  # fmt: skip
        lines.append(f"| {r['fault']} | {r['sent']} | {r['ok']} | "
                     + " | ".join(str(r["codes"].get(c, 0)) for c in codes)
                     + f" | **{r['lost']}** | {notes} | `{r['command']}` |")  # fmt: skip
    s = data.get("soak")
    if s:
        lines += ["", "## Soak", "",
                  f"`{s['command']}`: {s['calls']:,} calls in {s['duration_s']:.0f} s "
                  f"({s['throughput_calls_per_s']:.0f}/s, mixed bitmaps, PNGs and strokes, 16 callers), "
                  f"errors {s['errors']}, p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; gateway RSS "
                  f"{s['rss_baseline_mib']} MiB after warm-up, {s['rss_final_mib']} MiB at the end "
                  f"({s['rss_growth']:+.2%}; limit +5%): {'passed' if s['passed'] else 'FAILED'}."]  # fmt: skip
    else:
        lines += ["", "No soak result in this report: `make soak` (ten minutes of steady load) writes "
                  "test-artifacts/soak.json, and the next `make reliability` adds it here."]  # fmt: skip
    lines += ["", f"Measured {data['measured']} on {data['machine']} with {data['cores']} cores "
              "(a shared machine: latencies are indicative, the counts are exact)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def fault_section(text: str) -> str:
    """The part of RELIABILITY.md this script writes (before the rehearsal's section)."""
    return text[: text.index(REHEARSAL)].rstrip("\n") + "\n" if REHEARSAL in text else text


def main(argv: list[str] | None = None) -> int:
    """Gather the tallies and write both files; with --check, compare RELIABILITY.md with the committed tallies."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if RELIABILITY.md's table is stale")
    args = p.parse_args(argv)
    old = REPORT.read_text() if REPORT.exists() else ""
    if args.check:
        if fault_section(old) != render(json.loads(DATA.read_text())):
            print(f"{REPORT.name} is not what {DATA.relative_to(ROOT)} gives: run python scripts/reliability_report.py "
                  "after make reliability's tests, or fix the table's source", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    data = gather()
    if data is None:
        return 1
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_text(json.dumps(data, indent=1) + "\n")
    # The rehearsal's section (scripts/rehearsal.py, `make rehearsal`) is generated separately: keep it.
    kept = old[old.index(REHEARSAL):] if REHEARSAL in old else ""
    REPORT.write_text(render(data) + ("\n" + kept if kept else ""))
    print(f"wrote {DATA.relative_to(ROOT)} and {REPORT.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
