"""``quickdraw download``: fetch class files from Google's public bucket (or a mirror), resumably."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _names(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    from trainer.download import BASE_URL_ENV, DEFAULT_BASE_URL, FORMATS

    p = sub.add_parser(
        "download",
        help="download Quick, Draw! class files from Google's bucket (resumable, size-checked)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Download one file per class into OUT/<format>/<class><suffix>, keeping Google's file names\n"
            "(spaces included). Interrupted downloads resume from OUT/.../<file>.part; files already\n"
            "complete are skipped; every file's size is checked against the server's.\n\n"
            "examples:\n"
            "  quickdraw download --classes 'cat,dog,alarm clock' --format numpy_bitmap --out data\n"
            "  quickdraw download --all --format simplified --out data\n"
            f"  {BASE_URL_ENV}=http://mirror.local/quickdraw quickdraw download --classes cat --out data"
        ),
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--classes", type=_names, metavar="A,B,...",
                       help="comma-separated class names, case-insensitive ('alarm clock' has a space)")
    which.add_argument("--all", action="store_true", help="all 345 classes")
    p.add_argument("--format", choices=list(FORMATS), default="numpy_bitmap",
                   help="which of Google's formats (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: %(default)s)")
    p.add_argument("--base-url", default=None,
                   help=f"bucket or mirror URL (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})")
    p.add_argument("--retries", type=int, default=5, help="resume attempts per file (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Download, print one line per file, and fail if any file failed."""
    from trainer.categories import CATEGORIES
    from trainer.download import download, resolve_classes

    classes = list(CATEGORIES) if args.all else resolve_classes(args.classes)
    results = download(classes, args.format, args.out, base_url=args.base_url, progress=args.progress,
                       retries=args.retries)
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        if r.status == "failed":
            print(f"failed      {r.name}: {r.error}", file=sys.stderr)
        else:
            print(f"{r.status:<11} {r.path} ({r.size_bytes:,} bytes)")
    done = len(results) - len(failed)
    print(f"{done} of {len(results)} files in {args.out / args.format}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
