"""``make soak``: a long steady load on a real gateway; fails on any error or on RSS growth of 5% or more.

Starts ``quickdraw serve`` (embedded backend, the shipped model) as its own process, loads it with
``quickdraw loadtest``'s engine (closed loop, mixed input kinds), warms up, records the gateway's RSS, then
keeps the load on for ``--duration-s`` (default 600: ten minutes) or until ``--calls`` calls, sampling RSS.
Writes test-artifacts/soak.json (read by RELIABILITY.md's generator) and exits 1 if it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


#: Without a terminal (CI logs, a pipe, a file), a plain progress line this often instead of a live bar.
PLAIN_PROGRESS_EVERY_S = 60.0


class Progress:
    """The soak's progress: a live tqdm bar on a terminal; elsewhere one plain line every ``every_s`` seconds.

    A bar redrawn on a carriage-return line is right for a terminal, but in a log every redraw is kept: ``make
    soak`` once wrote about 2,000 of them onto one line of a CI log.
    """

    def __init__(self, total_s: float, stream: TextIO | None = None, every_s: float = PLAIN_PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        from tqdm import tqdm

        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.clock = clock
        self.t0 = clock()
        self._next = self.t0 + every_s
        self.total_s = round(total_s)
        self.bar = tqdm(total=self.total_s, unit="s", desc="soak", file=self.stream, disable=not self.interactive,
                        bar_format="{desc}: {n_fmt}/{total_fmt}s |{bar}| {postfix}")  # fmt: skip

    def update(self, status: str) -> None:
        """Show ``status`` (calls, errors, RSS so far)."""
        elapsed = self.clock() - self.t0
        if self.interactive:
            self.bar.n = min(self.total_s, round(elapsed))
            self.bar.set_postfix_str(status)
            self.bar.refresh()
        elif self.clock() >= self._next:
            self._next += self.every_s * max(1, int((self.clock() - self._next) // self.every_s) + 1)
            print(f"soak: {elapsed:.0f}/{self.total_s} s, {status}", file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar (on a terminal)."""
        self.bar.close()


def main() -> int:
    """Run the soak; 0 when it passes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=float(os.environ.get("SOAK_DURATION_S", 600)))
    p.add_argument("--calls", type=int, default=1_000_000, help="stop early after this many calls")
    p.add_argument("--warmup-s", type=float, default=60.0, help="load before the RSS baseline is taken")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="fraction of the baseline (default 0.05)")
    args = p.parse_args()

    from faults import Gateway

    from loadtest.engine import LoadConfig, RunStats, run_load, summary
    from loadtest.sources import load_pool

    sample = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
    pool = load_pool([sample], ["bitmap", "png", "strokes"], size=1024)
    gw = Gateway("--preprocess-threads", "1")
    rss: list[tuple[float, float]] = []
    try:
        warm = asyncio.run(run_load(LoadConfig(gw.target, concurrency=args.concurrency, duration_s=args.warmup_s,
                                               warmup_s=0.0), pool))  # fmt: skip
        baseline = gw.rss_mib()
        print(f"soak: warmed up ({warm.calls} calls in {args.warmup_s:.0f} s); gateway RSS {baseline:.1f} MiB",
              flush=True)  # fmt: skip
        stop = threading.Event()
        t0 = time.monotonic()

        def sample_rss() -> None:
            while not stop.wait(5.0):
                rss.append((time.monotonic() - t0, gw.rss_mib()))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        bar = Progress(args.duration_s)

        def progress(stats: RunStats) -> None:
            bar.update(f"{stats.calls} calls, {stats.throughput if stats.calls else 0:.0f}/s, "
                       f"errors {stats.errors}, RSS {rss[-1][1] if rss else baseline:.1f} MiB")  # fmt: skip

        cfg = LoadConfig(gw.target, concurrency=args.concurrency, duration_s=args.duration_s, count=args.calls,
                         warmup_s=0.0)  # fmt: skip
        stats = asyncio.run(run_load(cfg, pool, progress))
        stop.set()
        bar.close()
        final = gw.rss_mib()
    finally:
        gw.kill()
    result = summary(stats)
    growth = (final - baseline) / baseline
    ok = stats.errors == 0 and growth < args.max_rss_growth
    out = {
        "calls": stats.calls, "duration_s": round(stats.elapsed_s, 1), "errors": stats.errors,
        "codes": result["codes"], "throughput_calls_per_s": round(stats.throughput, 1),
        "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "p99.9_ms": result["p99.9_ms"],
        "rss_baseline_mib": round(baseline, 1), "rss_final_mib": round(final, 1),
        "rss_max_mib": round(max([final, *(r for _, r in rss)]), 1), "rss_growth": round(growth, 4),
        "passed": ok, "command": "make soak",
    }  # fmt: skip
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "soak.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"soak: {stats.calls} calls in {stats.elapsed_s:.0f} s ({stats.throughput:.0f}/s), errors {stats.errors}, "
          f"p99 {result['p99_ms']:.1f} ms; RSS {baseline:.1f} -> {final:.1f} MiB ({growth:+.2%}, limit "
          f"{args.max_rss_growth:.0%}): {'PASSED' if ok else 'FAILED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
