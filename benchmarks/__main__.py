"""Run every benchmark module (``python -m benchmarks [NAME...]``) and print a summary of ratios."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import benchmarks


def main() -> int:
    """Discover ``benchmarks.bench_*`` modules and run the chosen ones (all by default)."""
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {names})")
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {names}")
    summary: list[str] = []
    for name in args.only or names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}: {module.__doc__.strip().splitlines()[0]}", flush=True)
        summary.extend(module.run())
    print("\n== summary (ratios measured side by side in this run)")
    for line in summary:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
