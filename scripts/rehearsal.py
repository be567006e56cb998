"""``make rehearsal``: the production topology on one machine, real processes, under open-loop load.

What runs, all on 127.0.0.1 free ports:

- 3 TF Serving stand-ins (tests/tfserving_standin.py, with tensorflow_model_server's flags) on ONE shared model
  directory (a temp copy of models/quickdraw/1 as version 1), each with its OWN model config file (the text
  ModelServerConfig of deploy/tfserving/models.config plus ``version_labels { key: "stable" }``) polled every
  few seconds, batching with deploy/tfserving/batching.config, and different file-system poll phases;
- 2 gateways (``quickdraw serve --backend tfserving --tfserving-target ipv4:A,B,C``), with the environment of
  deploy/k8s/base/gateway-deployment.yaml where it matters here, behind a stand-in for a Kubernetes Service:
  each client connection goes to one ready gateway; a gateway leaving the endpoints (as a terminating pod does,
  before its preStop sleep ends and SIGTERM arrives) sends its clients' next calls to another one;
- the real Prometheus (Debian's ``prometheus``; skipped with --no-prometheus) scraping both gateways and the 3
  stand-ins every second, with deploy/prometheus/rules loaded and static targets labelled ``namespace`` and
  ``pod`` as deploy/prometheus/prometheus.yml's relabelling labels them in Kubernetes;
- open-loop load throughout: calls due at a fixed rate whatever happens, each with a deadline; mostly
  versionless Classify calls, and every --pinned-every'th call pinned to version 2.

Events, in turn, while the load runs: steady; roll out version 2 (copied beside the shared directory's
versions under a temporary name, then os.rename, as the trainer's export does); move the ``stable`` label from
1 to 2 one replica at a time; roll back (``stable`` back to 1 on every replica, then version 2 removed); SIGKILL
one replica and restart it; take one gateway out of the Service, SIGTERM it after a preStop sleep, and start a
new one (added to the Service once ready).

Every call is counted by status code under the event during which it was SENT. A call is **lost** when it has
no answer by its deadline plus 100 ms (tests/faults.py's definition). Backend attempts per client call come
from the stand-ins' ``:tensorflow:serving:request_count`` (summed over replicas, resets on restart handled).
The table is printed and, unless --no-write, written into RELIABILITY.md's section "Production-topology
rehearsal". --short is the shorter variant tests/test_rehearsal.py runs.

With --autoscaling, the HPAs' prometheus-adapter queries are evaluated during a stepped load and the Kubernetes
HPA algorithm (scripts/hpa.py) turns them into desired replica counts (deploy/README.md "Autoscaling
evidence"). With --batching, a grid of gateway batching settings is measured (deploy/README.md "Batching: two
layers, tuned by measurement").
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import platform
import re
import signal
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rehearsal_autoscaling as ra
import rehearsal_batching as rb
import rehearsal_rollouts as rr
from rehearsal_topology import (
    DEPLOY,
    REQUEST_COUNT,
    ROOT,
    BackendCounter,
    Call,
    Load,
    Options,
    Phase,
    Replica,
    Topology,
    live_progress,
    load_drawings,
    say,
)

SECTION = "## Production-topology rehearsal"


# --- phases and the table -----------------------------------------------------------------------------------


@dataclass
class Row:
    """The counts of one phase."""

    event: str
    calls: int
    codes: Counter[str]
    lost: int
    versionless: int
    versionless_failed: int
    #: versionless failures other than DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (slowness, shedding): what a
    #: version skew between replicas or gateways would cause (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION...)
    versionless_skew: int
    pinned: int
    pinned_ok: int
    pinned_not_found: int
    answered_by: Counter[int]
    attempts_per_call: float | None
    p50_ms: float
    p99_ms: float
    notes: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready."""
        d = dict(self.__dict__)
        d["codes"] = dict(self.codes)
        d["answered_by"] = {str(k): v for k, v in sorted(self.answered_by.items())}
        return d


def tabulate(phases: list[Phase], calls: list[Call], backend_end: float | None) -> list[Row]:
    """Every call under the phase during which it was sent."""
    starts = [p.started for p in phases]
    per: list[list[Call]] = [[] for _ in phases]
    for c in calls:
        i = bisect.bisect_right(starts, c.sent) - 1
        if i >= 0:
            per[i].append(c)
    rows = []
    for i, (p, cs) in enumerate(zip(phases, per, strict=True)):
        end_backend = phases[i + 1].backend_at_start if i + 1 < len(phases) else backend_end
        vl = [c for c in cs if not c.pinned]
        pinned = [c for c in cs if c.pinned]
        ok = np.array([c.latency_s for c in cs if c.code == "OK"]) * 1000
        attempts = None
        if end_backend is not None and cs:
            attempts = (end_backend - p.backend_at_start) / len(cs)
        rows.append(Row(
            event=p.name, calls=len(cs), codes=Counter(c.code for c in cs if c.code not in ("OK", "LOST")),
            lost=sum(c.code == "LOST" for c in cs), versionless=len(vl),
            versionless_failed=sum(c.code != "OK" for c in vl),
            versionless_skew=sum(c.code not in ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") for c in vl),
            pinned=len(pinned),
            pinned_ok=sum(c.code == "OK" for c in pinned), pinned_not_found=sum(c.code == "NOT_FOUND" for c in pinned),
            answered_by=Counter(c.version for c in vl if c.code == "OK"), attempts_per_call=attempts,
            p50_ms=float(np.percentile(ok, 50)) if ok.size else math.nan,
            p99_ms=float(np.percentile(ok, 99)) if ok.size else math.nan, notes="; ".join(p.notes),
        ))  # fmt: skip
    return rows


def markdown_table(rows: list[Row]) -> str:
    """The table as Markdown."""
    codes = sorted({k for r in rows for k in r.codes})
    head = ["event", "calls", "OK", *codes, "lost", "versionless failed", "pinned v2 OK", "pinned v2 NOT_FOUND",
            "versionless answered by", "backend attempts / call", "p50 ms", "p99 ms", "what happened"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by = ", ".join(f"v{k} {v}" for k, v in sorted(r.answered_by.items())) or "-"
        att = "n/a" if r.attempts_per_call is None else f"{r.attempts_per_call:.2f}"
        cells = [r.event, str(r.calls), str(r.calls - sum(r.codes.values()) - r.lost),
                 *(str(r.codes.get(c, 0)) for c in codes), f"**{r.lost}**",
                 f"**{r.versionless_failed}** of {r.versionless} ({r.versionless_skew} not deadline/shed)",
                 f"{r.pinned_ok} of {r.pinned}",
                 f"{r.pinned_not_found} of {r.pinned}", by, att, f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
                 r.notes.replace("|", "/")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reliability(rows: list[Row], command: str, opts: Options, elapsed_s: float) -> Path:
    """Replace (or add) RELIABILITY.md's rehearsal section; scripts/reliability_report.py keeps it."""
    path = ROOT / "RELIABILITY.md"
    text = path.read_text() if path.exists() else "# Reliability\n"
    before = text.split(SECTION)[0].rstrip() + "\n\n"
    cores = len(os.sched_getaffinity(0))
    label = f" --tfserving-version-label {opts.version_label}" if opts.version_label else ""
    prom = (
        "Prometheus scraping all of them every second with deploy/prometheus/rules loaded; " if opts.prometheus else ""
    )
    intro = (
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({platform.machine()}, {cores} cores "
        f"shared with other work, load average {os.getloadavg()[0]:.1f} at the end: latencies are indicative, the "
        f"counts exact; {elapsed_s:.0f} s). The production topology on one machine, real processes on 127.0.0.1 "
        "(scripts/rehearsal.py): 3 TF Serving stand-ins (tests/tfserving_standin.py) on one shared model directory, "
        f"each with its own model config file (label `stable`) polled every {opts.config_poll_s:g} s, file-system "
        f"polls every {opts.fs_poll_s:g} s out of phase, batching with deploy/tfserving/batching.config; 2 gateways "
        f"(`quickdraw serve --backend tfserving --tfserving-target ipv4:A,B,C{label}`) behind a Service stand-in "
        "(8 client connections; a terminating gateway leaves the endpoints, then gets SIGTERM "
        f"{opts.prestop_s:g} s later, as after a preStop sleep); {prom}open-loop load of {opts.rate_per_s:g} "
        f"Classify calls/s (one bitmap each, deadline {opts.deadline_s:g} s), every {opts.pinned_every}th pinned "
        "to version 2. Each call counts under the event during which it was sent; **lost** = no answer by the "
        f"deadline + 100 ms. Backend attempts / call = the stand-ins' `{REQUEST_COUNT}` increase (summed over "
        "replicas) over the client calls sent in that phase: above 1 means retries, below 1 that the gateways "
        "merged calls into batches. Versionless failures are split: DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED come "
        "from slowness or shedding (the replicas load versions on the same cores that serve), anything else would "
        "be a version skew."
    )
    if any(r.event.startswith("7 ") for r in rows):
        intro += (
            " Rows 7-9 (scripts/rehearsal_rollouts.py, docs/rollouts.md) go through the gateways' --rollout-file and "
            "`quickdraw rollout` against Prometheus: a 10% canary by TF Serving label (version 2, retrained) with "
            "its binomial check; version 2 shadowed on every call, gated and promoted; version 3 (the shipped "
            "weights perturbed by scripts/perturb_model.py until test top-1 fell 10 points) shadowed, refused by "
            "the gate, aborted. The gate's decision is in the notes."
        )
    section = f"{SECTION}\n\n{textwrap.fill(intro, 115)}\n\n{markdown_table(rows)}\n"
    path.write_text(before + section)
    return path


# --- the run ------------------------------------------------------------------------------------------------


class Rehearsal:
    """The events in turn under load; ``run`` returns the rows."""

    def __init__(self, topo: Topology, opts: Options) -> None:
        self.topo = topo
        self.opts = opts
        self.phases: list[Phase] = []
        self.counter = BackendCounter(topo.replicas)
        self.load = Load(topo.service, load_drawings(), opts.rate_per_s, opts.deadline_s, opts.pinned_every)

    def phase(self, name: str) -> Phase:
        """Start a new phase now."""
        backend = self.counter.sample()
        p = Phase(name, time.monotonic(), backend)
        self.phases.append(p)
        say(f"phase: {name}")
        return p

    def hold(self, p: Phase, at_least_s: float) -> None:
        """Let the load run until the phase is ``at_least_s`` old."""
        if (left := p.started + at_least_s - time.monotonic()) > 0:
            time.sleep(left)

    def wait_all(self, p: Phase, available: set[int], stable: int, replicas: list[Replica] | None = None) -> None:
        """Until every replica (or those given) serves ``available`` with ``stable``; noted in the phase."""
        took = []
        for r in replicas or self.topo.replicas:
            took.append(r.wait_for(available, stable, timeout_s=max(30.0, 6 * self.opts.fs_poll_s)))
        p.notes.append(f"replicas at {sorted(available)}/stable={stable} within {max(took) + 0:.1f} s")

    def run(self) -> list[Row]:
        """Every event in turn, then the table."""
        o, topo = self.opts, self.topo
        short = o.short
        self.counter.start()
        self.load.start()
        with live_progress(self.load, self.phases):
            return self._events(o, topo, short)

    def _events(self, o: Options, topo: Topology, short: bool) -> list[Row]:
        try:
            p = self.phase("1 steady")
            self.hold(p, o.phase_s if not short else o.phase_s / 2)

            p = self.phase("2 roll out v2 (atomic rename)")
            topo.roll_out(2)
            self.wait_all(p, {1, 2}, 1)
            self.hold(p, o.phase_s)

            p = self.phase("3 move stable 1->2, one replica at a time")
            for r in topo.replicas:
                t0 = time.monotonic()
                r.write_config(2)
                r.wait_for({1, 2}, 2, timeout_s=max(30.0, 6 * o.config_poll_s))
                p.notes.append(f"{r.name} {time.monotonic() - t0:.1f} s")
                time.sleep(o.config_poll_s)
            self.hold(p, o.phase_s)

            p = self.phase("4 roll back: stable->1 everywhere, then v2 removed")
            for r in topo.replicas:
                r.write_config(1)
            self.wait_all(p, {1, 2}, 1)
            topo.remove_version(2)
            self.wait_all(p, {1}, 1)
            self.hold(p, o.phase_s)

            p = self.phase("5 SIGKILL one replica, restart it")
            victim = topo.replicas[0]
            self.counter.sample()  # its count up to now
            victim.kill()
            t0 = time.monotonic()
            victim.start()
            p.notes.append(f"{victim.name} killed, serving again {time.monotonic() - t0:.1f} s later")
            self.hold(p, o.phase_s)

            if not short:
                p = self.phase("6 SIGTERM one gateway, start a new one")
                old = topo.service.endpoints[0]
                new, code, exit_s = topo.replace_gateway(old)
                p.notes.append(f"{old.name} exit {code} {exit_s:.1f} s after SIGTERM; {new.name} ready")
                self.hold(p, o.phase_s)

            if o.rollouts and topo.prometheus is not None:  # the gate reads Prometheus
                rr.run(self, topo, o)
        finally:
            self.load.stop()
            end = self.counter.sample()
            self.counter.stop()
        rows = tabulate(self.phases, self.load.calls, end if self.counter.available else None)
        rr.annotate(rows)
        return rows


def write_section(path: Path, heading: str, body: str) -> Path:
    """Replace the Markdown section under ``heading`` (up to the next ``## ``) in ``path``, or append it."""
    text = path.read_text()
    new = f"{heading}\n\n{body.strip()}\n"
    if heading in text:
        head, rest = text.split(heading, 1)
        nxt = re.search(r"^## ", rest, flags=re.M)
        tail = rest[nxt.start() :] if nxt else ""
        text = head + new + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + new
    path.write_text(text)
    return path


def run_autoscaling(topo: Topology, opts: Options, args: argparse.Namespace, command: str) -> bool:
    """Part A: the HPAs fed live metrics under a stepped load; plot and deploy/README.md section."""
    load = Load(topo.service, load_drawings(), 1.0, opts.deadline_s, pinned_every=0).start()
    try:
        result = ra.run(topo, load, capacity_per_s=args.capacity_per_s, window_scale=args.window_scale, say=say)
    finally:
        load.stop()
    failed = Counter(c.code for c in load.calls if c.code != "OK")
    say(f"autoscaling: {len(load.calls)} calls, not OK: {dict(failed) or 'none'}")
    gw = next(t for t in result.tracked if t.target_name == "quickdraw-gateway")
    desired = [d for _, _, d in gw.series]
    rose = max(desired, default=0) > 2
    fell = bool(desired) and desired[-1] <= 2
    say(f"autoscaling: gateway desired replicas rose above 2: {rose}; back to 2 or fewer at the end: {fell}")
    if not args.no_write:
        png = ra.plot(result, DEPLOY / "hpa-rehearsal.png")
        say(f"wrote {png} ({png.stat().st_size // 1024} KiB)")
        say(f"wrote {write_section(DEPLOY / 'README.md', '## Autoscaling evidence', ra.markdown(result, command))}")
    return rose and fell


def run_batching(topo: Topology, args: argparse.Namespace, command: str) -> None:
    """Part B: the batching grid; deploy/README.md section."""
    grid = [(c, d) for c in args.grid_concurrent for d in args.grid_delay_ms]
    cells = rb.run(topo, grid, args.grid_rates, level_s=args.grid_level_s, say=say)
    concurrent, delay = rb.pick(cells)
    say(f"batching: measured pick: QUICKDRAW_MAX_CONCURRENT_BATCHES={concurrent}, "
        f"QUICKDRAW_MAX_BATCH_DELAY_MS={delay:g}")  # fmt: skip
    if not args.no_write:
        body = rb.markdown(cells, command, len(os.sched_getaffinity(0)), os.getloadavg()[0])
        path = write_section(DEPLOY / "README.md", "## Batching: two layers, tuned by measurement", body)
        say(f"wrote {path}")


def print_table(rows: list[Row]) -> None:
    """The table on stdout."""
    print()
    print(markdown_table(rows))
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the rehearsal; 0 when no call was lost."""
    p = argparse.ArgumentParser(prog="scripts/rehearsal.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--short", action="store_true", help="the shorter variant: no gateway replacement, half-length "
                   "steady phase (tests/test_rehearsal.py runs it)")  # fmt: skip
    p.add_argument("--rate-per-s", type=float, default=40.0, help="client calls per second, open loop (default 40)")
    p.add_argument("--deadline-ms", type=float, default=2000.0, help="each call's deadline (default 2000)")
    p.add_argument("--pinned-every", type=int, default=20, help="every Nth call is pinned to version 2 (default 20)")
    p.add_argument("--phase-s", type=float, default=15.0, help="shortest length of each phase (default 15)")
    p.add_argument("--version-label", default="stable", help="the gateways' --tfserving-version-label ('' for none)")
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus (no roll-out rows either)")
    p.add_argument("--no-rollouts", action="store_true", help="leave out rows 7-9 (canary, promoted shadow, refused "
                   "shadow: scripts/rehearsal_rollouts.py)")  # fmt: skip
    p.add_argument(
        "--parts",
        default="events,autoscaling,batching",
        help="what to run, comma-separated: events (the table for RELIABILITY.md), autoscaling (A: "
        "deploy/README.md 'Autoscaling evidence' and deploy/hpa-rehearsal.png), batching (B: deploy/README.md "
        "'Batching: two layers, tuned by measurement'); default: all three",
    )
    p.add_argument(
        "--capacity-per-s",
        type=float,
        default=20.0,
        help="autoscaling: calls/s that define one gateway's capacity here (default 20)",
    )
    p.add_argument(
        "--window-scale",
        type=float,
        default=0.1,
        help="autoscaling: factor on the HPAs' stabilisation windows and policy periods (default 0.1)",
    )
    p.add_argument(
        "--grid-concurrent",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[4, 16],
        help="batching: QUICKDRAW_MAX_CONCURRENT_BATCHES values (default 4,16)",
    )
    p.add_argument(
        "--grid-delay-ms",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.0, 2.0],
        help="batching: QUICKDRAW_MAX_BATCH_DELAY_MS values (default 0,2)",
    )
    p.add_argument(
        "--grid-rates",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[30.0, 100.0, 200.0],
        help="batching: offered calls/s (default 20,60,120)",
    )
    p.add_argument("--grid-level-s", type=float, default=6.0, help="batching: measured seconds per cell (default 6)")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave RELIABILITY.md alone")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument(
        "--standin",
        type=Path,
        default=ROOT / "tests" / "tfserving_standin.py",
        help="the TF Serving stand-in to run (it takes tensorflow_model_server's flags)",
    )
    args = p.parse_args(argv)
    opts = Options(rate_per_s=args.rate_per_s, deadline_s=args.deadline_ms / 1000, pinned_every=args.pinned_every,
                   phase_s=args.phase_s, short=args.short, prometheus=not args.no_prometheus,
                   version_label=args.version_label or None, standin=args.standin,
                   rollouts=not args.no_rollouts)  # fmt: skip
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if unknown := parts - {"events", "autoscaling", "batching"}:
        p.error(f"unknown parts {sorted(unknown)}")
    given = " ".join(argv if argv is not None else sys.argv[1:])
    if argv is None and os.environ.get("MAKELEVEL"):
        command = "make rehearsal" + (f" ARGS='{given}'" if given else "")
    else:
        command = f"python scripts/rehearsal.py {given}".strip()
    t0 = time.monotonic()
    rows: list[Row] = []
    hpa_ok = True
    if "events" in parts and opts.rollouts and opts.prometheus:
        rr.candidates()  # made (or found cached) before the load starts: training and perturbing take a minute each
    with Topology(opts) as topo:
        if "events" in parts:
            rows = Rehearsal(topo, opts).run()
            elapsed = time.monotonic() - t0
            print_table(rows)
            if args.out:
                args.out.write_text(json.dumps([r.as_json() for r in rows], indent=1) + "\n")
            if not args.no_write:
                say(f"wrote {write_reliability(rows, command, opts, elapsed)}")
        if "autoscaling" in parts:
            hpa_ok = run_autoscaling(topo, opts, args, command)
        if "batching" in parts:
            run_batching(topo, args, command)
    lost = sum(r.lost for r in rows)
    say(f"done in {time.monotonic() - t0:.0f} s: {sum(r.calls for r in rows)} calls in the events, {lost} lost")
    return 1 if lost or not hpa_ok else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
