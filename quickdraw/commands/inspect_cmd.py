"""``quickdraw inspect``: what a Quick, Draw! file holds (format, classes and counts)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from doodle.formats import (
    Format,
    class_from_path,
    count_lines,
    detect_format,
    open_bitmaps,
    read_binary,
    read_ndjson,
    read_stroke3,
)

#: A file's progress bar appears only once reading it has taken this long (on a terminal).
PROGRESS_DELAY_S = 1.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "inspect",
        help="print a file's format, classes and counts",
        description=(
            "Print the format, the classes and the drawing counts of Quick, Draw! files. A directory "
            "is inspected file by file. Every record is parsed, so a malformed one is reported with "
            "its line or byte offset."
        ),
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="files or directories to inspect")
    p.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    p.set_defaults(func=run)


def inspect_file(path: Path) -> dict[str, Any]:
    """Summarise one file: format, size, classes with counts, and format-specific facts."""
    fmt = detect_format(path)
    info: dict[str, Any] = {"file": str(path), "format": str(fmt), "bytes": path.stat().st_size}
    classes: Counter[str] = Counter()
    if fmt is Format.NUMPY_BITMAP:
        rows = open_bitmaps(path)
        classes[class_from_path(path)] = len(rows)
        info["shape"] = list(rows.shape)
        info["dtype"] = str(rows.dtype)
    elif fmt is Format.SKETCHRNN:
        splits: Counter[str] = Counter()
        for d in read_stroke3(path):
            classes[d.word] += 1
            splits[d.extra["split"]] += 1
        info["splits"] = dict(splits)
    else:
        recognized = 0
        points = 0
        if fmt is Format.BINARY:
            drawings = read_binary(path)
            total = None
        else:
            drawings = read_ndjson(path)
            total = count_lines(path)
        # Only on a terminal, and only for a file that takes a while: a bar that is drawn and cleared at once
        # leaves "<name>:" behind wherever the terminal's output is kept as text (a log, a copied transcript).
        for d in tqdm(drawings, total=total, unit="drawing", desc=path.name, disable=None, leave=False,
                      delay=PROGRESS_DELAY_S):
            classes[d.word] += 1
            recognized += bool(d.recognized)
            points += d.n_points
        n = sum(classes.values())
        info["recognized"] = recognized
        info["mean_points"] = round(points / n, 1) if n else 0.0
    info["count"] = sum(classes.values())
    info["classes"] = dict(sorted(classes.items()))
    return info


def _expand(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix in {".npy", ".ndjson", ".bin", ".npz"}))
        else:
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    """Inspect each file and print a summary."""
    for path in _expand(args.files):
        info = inspect_file(path)
        if args.json:
            print(json.dumps(info))
            continue
        print(f"{info['file']}")
        print(f"  {'format':<12} {info['format']}  ({info['bytes']:,} bytes)")
        print(f"  {'count':<12} {info['count']:,} drawings")
        for key in ("shape", "splits", "recognized", "mean_points"):
            if key in info:
                print(f"  {key:<12} {info[key]}")
        classes = info["classes"]
        shown = ", ".join(f"{k} ({v:,})" for k, v in list(classes.items())[:10])
        more = f", ... {len(classes) - 10} more" if len(classes) > 10 else ""
        print(f"  {'classes':<12} {len(classes)}: {shown}{more}")
    return 0
