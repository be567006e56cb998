"""``quickdraw loadtest``: load the gateway (or TF Serving) with real drawings and report honest latency."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
from pathlib import Path

from quickdraw.commands.common import add_security_options, client_security
from quickdraw.extras import require

DEFAULT_DATA = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", "../shared/quickdraw"))

EPILOG = """\
examples:
  quickdraw loadtest --target localhost:50051 --concurrency 64 --duration-s 20
  quickdraw loadtest --target localhost:50051 --rate 300 --arrival poisson --kinds bitmap,png,strokes
  quickdraw loadtest --target localhost:50051 --sweep-rate 100,200,400,800 --slo-p99-ms 50 --plot-dir out/
  quickdraw loadtest --target localhost:8500 --api tfserving --concurrency 16      # TF Serving itself
  quickdraw loadtest --target localhost:50051 --rate 200 --fail-on 'p99>100ms,errors>1%' --out out/report.json

closed loop (--concurrency) measures each call from when it was sent: a stalled server stalls its callers
too, and the stall is hidden (coordinated omission). Open loop (--rate) keeps calls coming on schedule and
measures each from when it was due, so stalls show in the percentiles. Use open loop to check an SLO.

columns: calls/s counts every answered call, OK or not (throughput); ok/s only those answered OK (goodput),
as does drawings/s; err% is the share of calls that did not end OK.
late sends (open loop, column "late"): calls sent more than 1 ms after they were due, because the generator
fell behind its schedule (its CPU, or its cap on calls in flight). Each is still measured from when it was
due (coordinated omission corrected), so the wait is in the percentiles; but the offered rate was not fully
applied. Many late sends: give the generator more CPU or --channels, or lower --rate.

--fail-on: comma-separated conditions METRIC>VALUE or METRIC<VALUE; a run that meets one fails the command:
  p50 p90 p95 p99 p99.9 mean max   latency, with ms or s          p99>100ms  max>2s
  errors                           a share with %, or a count     errors>1%  errors>0
  goodput                          calls answered OK per second   goodput<50
exit status: 0 every run passed; 1 a call failed in some run (unless --fail-on has an errors condition, which
then decides), or the target is unreachable; 2 bad arguments; 3 a --fail-on condition was met, or no run met
--slo-p99-ms."""

#: Exit status when a threshold (--fail-on) or the SLO (--slo-p99-ms) fails the run.
EXIT_THRESHOLD = 3


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "loadtest",
        help="load-test the gateway or TF Serving: closed/open loop, sweeps, HdrHistogram percentiles, plots",
        description="Send real Quick, Draw! drawings to a gRPC target and report throughput and latency "
        "percentiles (HdrHistogram), errors by status code, a JSON report and PNG plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default="localhost:50051", help="HOST:PORT to load (default: localhost:50051)")
    p.add_argument("--api", choices=["quickdraw", "tfserving", "v2"], default="quickdraw",
                   help="quickdraw.v1.Classifier (default), TF Serving's PredictionService/Predict (bitmaps; "
                        "works against TF Serving itself and against the gateway), or v2: the Open Inference "
                        "Protocol's ModelInfer (KServe v2; bitmaps; the gateway, Triton ...)")  # fmt: skip
    p.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_DATA],
                   help=f"data directory (numpy_bitmap/, simplified/) or .npy/.ndjson files (default: {DEFAULT_DATA})")
    p.add_argument("--kinds", default="bitmap",
                   help="input kinds to mix, comma-separated: bitmap, png, strokes (default: bitmap)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: this many callers (default: 8)")
    load.add_argument("--rate", type=float, help="open loop: calls per second")
    load.add_argument("--sweep-concurrency", type=_floats, metavar="N,N,...", help="closed-loop sweep")
    load.add_argument("--sweep-rate", type=_floats, metavar="R,R,...", help="open-loop sweep")
    p.add_argument("--arrival", choices=["constant", "poisson"], default="constant",
                   help="open loop: evenly spaced calls, or a Poisson process (default: constant)")
    p.add_argument("--duration-s", type=float, default=10.0, help="measured time per run (default: 10)")
    p.add_argument("--count", type=int, help="stop each run after this many measured calls")
    p.add_argument("--warmup-s", type=float, default=1.0, help="load before measuring, excluded (default: 1)")
    p.add_argument("--drawings-per-call", type=int, default=1, help="drawings in each call (default: 1)")
    p.add_argument("--stream", action="store_true", help="use ClassifyStream instead of unary Classify")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections) to spread calls over")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call (default: 10)")
    p.add_argument("--slo-p99-ms", type=float, help="sweeps: report the highest throughput whose p99 meets this "
                   f"(exit {EXIT_THRESHOLD} when no run does)")
    p.add_argument("--fail-on", metavar="CONDITIONS",
                   help="fail (exit 3) when a run meets any condition, e.g. 'p99>100ms,errors>1%%' (see below)")
    p.add_argument("--connect-timeout-s", type=float, default=5.0,
                   help="give up on an unreachable target after this long, saying why (default: 5)")
    p.add_argument("--out", type=Path, help="write the JSON report here, and an HTML report beside it (.html)")
    p.add_argument("--plot-dir", type=Path, help="write latency-vs-throughput.png and latency-over-time.png here")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    add_security_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the drawing pool, run each load, print and save the report."""
    if args.plot_dir:  # before the load runs, not after it
        require("matplotlib", "quickdraw loadtest --plot-dir")
    from tqdm import tqdm

    from loadtest import thresholds
    from loadtest.engine import LoadConfig, RunStats, Unreachable, check_reachable, run_load, summary
    from loadtest.html import write_html
    from loadtest.report import best_under_slo, late_note, plot, table, write_json
    from loadtest.sources import load_pool

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        limits = thresholds.parse(args.fail_on) if args.fail_on is not None else []
    except thresholds.ThresholdError as exc:
        print(f"quickdraw loadtest: --fail-on: {exc}", file=sys.stderr)
        return 2
    try:
        security = client_security(args)
        pool = load_pool(args.data, kinds)
    except (ValueError, OSError) as exc:
        print(f"quickdraw loadtest: {exc}", file=sys.stderr)
        return 2
    loads: list[tuple[int | None, float | None]]
    if args.sweep_concurrency:
        loads = [(int(c), None) for c in args.sweep_concurrency]
    elif args.sweep_rate:
        loads = [(None, r) for r in args.sweep_rate]
    elif args.rate is not None:
        loads = [(None, args.rate)]
    else:
        loads = [(args.concurrency or 8, None)]
    results = []
    for concurrency, rate in loads:
        cfg = LoadConfig(
            target=args.target, api=args.api, concurrency=concurrency, rate=rate, arrival=args.arrival,
            duration_s=args.duration_s, count=args.count, warmup_s=args.warmup_s,
            drawings_per_call=args.drawings_per_call, stream=args.stream, channels=args.channels,
            timeout_s=args.timeout_s, security=security, connect_timeout_s=args.connect_timeout_s,
        )  # fmt: skip
        if not results:  # once, before any load: an unreachable target fails fast, with its reason
            try:
                asyncio.run(check_reachable(cfg))
            except Unreachable as exc:
                print(f"quickdraw loadtest: cannot reach {args.target}: {exc}", file=sys.stderr)
                return 1
        label = f"{rate:g}/s {args.arrival}" if rate is not None else f"{concurrency} callers"
        bar = tqdm(total=round(args.warmup_s + args.duration_s), unit="s", desc=label, disable=args.no_progress,
                   bar_format="{desc}: {n_fmt}/{total_fmt}s |{bar}| {postfix}")  # fmt: skip

        def progress(stats: RunStats, bar: tqdm = bar, warm: float = args.warmup_s) -> None:
            import time

            elapsed = time.monotonic() - stats.started_s + warm if stats.started_s else 0.0
            bar.n = min(bar.total, max(0, round(elapsed)))
            bar.set_postfix_str(
                f"{stats.goodput if stats.calls else 0:.0f} ok/s  p99 {stats.percentile_ms(99):.1f} ms  "
                f"errors {stats.errors}"
            )

        try:
            stats = asyncio.run(run_load(cfg, pool, progress))
        except (TimeoutError, OSError) as exc:
            bar.close()
            reason = str(exc) or f"no connection within {args.connect_timeout_s:g} s"
            print(f"quickdraw loadtest: cannot reach {args.target}: {reason}", file=sys.stderr)
            return 1
        bar.close()
        results.append(summary(stats))
    print(table(results))
    notes = [n for n in (late_note(results),) if n]
    for note in notes:
        print(textwrap.fill(note, width=110, subsequent_indent="  "))
    status = 0 if all(r["errors"] == 0 for r in results) else 1
    if args.slo_p99_ms is not None:
        best = best_under_slo(results, args.slo_p99_ms)
        if best is None:
            print(f"FAILED: no run met p99 <= {args.slo_p99_ms:g} ms without errors", file=sys.stderr)
            notes.append(f"FAILED: no run met p99 <= {args.slo_p99_ms:g} ms without errors")
            status = EXIT_THRESHOLD
        else:
            print(f"highest throughput with p99 <= {args.slo_p99_ms:g} ms: {best['throughput_calls_per_s']:.1f} "
                  f"calls/s (p99 {best['p99_ms']:.2f} ms)")  # fmt: skip
    if limits:
        crossed = thresholds.failures(limits, results)
        for line in crossed:
            print(f"FAILED: {line}", file=sys.stderr)
            notes.append(f"FAILED --fail-on: {line}")
        if crossed:
            status = EXIT_THRESHOLD
        else:
            print(f"passed: {args.fail_on}")
            if any(t.metric == "errors" for t in limits):  # errors are judged by the condition given, not any error
                status = 0 if status == 1 else status
    if args.out:
        write_json(args.out, args.target, results, args.slo_p99_ms)
        html_path = args.out.with_suffix(".html")
        write_html(html_path, args.target, results, notes)
        print(f"report: {args.out}, {html_path}")
    if args.plot_dir:
        for path in plot(args.plot_dir, results, args.slo_p99_ms, args.target):
            print(f"plot: {path}")
    return status
