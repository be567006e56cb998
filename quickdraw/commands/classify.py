"""``quickdraw classify``: send drawings from files to a running gateway and print the top 3 of each.

A drawing the model calls unknown (its out-of-class decision, issue 18) is printed as such, with its closest
classes, e.g. ``not a known class (known_score 0.12 < 0.50); closest: dog 0.67  cat 0.20  horse 0.05``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quickdraw.commands.common import add_security_options, client_security

CHUNK = 64  # drawings per call


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "classify",
        help="classify drawings with a running gateway (gRPC)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Send drawings to the gateway and print the top classes of each, e.g.\n"
            "  cat.ndjson:1  cat 0.93  dog 0.04  horse 0.01\n"
            "or, for a drawing the model does not know (models with an out-of-class decision):\n"
            "  car.ndjson:3  not a known class (known_score 0.12 < 0.50); closest: dog 0.67  cat 0.20  horse 0.05\n\n"
            "FILE is a PNG/JPEG (sent as an image), an .ndjson (each line, sent as strokes; raw files as raw\n"
            "strokes, normalised by the server), a .bin or .npz (strokes) or an .npy (each row, as a bitmap)."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--target", default="localhost:50051", help="gateway address (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes per drawing (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N drawings per file")
    p.add_argument("--version", type=int, default=None, help="model version (default: the highest served)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline per call (default: %(default)s)")
    add_security_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Classify every drawing in every file, CHUNK drawings a call; print one line each."""
    import grpc

    from doodle import Drawing
    from quickdraw.commands.common import iter_file_items
    from service.client import QuickDrawClient, describe_error

    try:
        security = client_security(args)
        client = QuickDrawClient(args.target, timeout_s=args.timeout_s, security=security)
    except ValueError as exc:
        print(f"quickdraw classify: {exc}", file=sys.stderr)
        return 2
    failed = 0
    with client:
        for path in args.files:
            items = [
                (name, item.google_strokes(), item.raw) if isinstance(item, Drawing) else (name, item, False)
                for name, item in iter_file_items(path, args.limit)
            ]
            width = max((len(n) for n, _, _ in items), default=0)
            for raw in (False, True):
                group = [(n, d) for n, d, r in items if r is raw]
                for start in range(0, len(group), CHUNK):
                    chunk = group[start : start + CHUNK]
                    try:
                        results = client.classify([d for _, d in chunk], top_k=args.top_k, version=args.version,
                                                  raw=raw)
                    except grpc.RpcError as err:
                        print(f"{path}: {describe_error(err)}", file=sys.stderr)
                        failed += 1
                        continue
                    for (name, _), result in zip(chunk, results, strict=True):
                        print(f"{name:<{width}}  {result}")
    return 1 if failed else 0
