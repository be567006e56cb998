"""``quickdraw render``: vector drawings to an (N, 784) uint8 array, one row per drawing, in order."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from doodle import BITMAP_PIXELS, Drawing, drawing_to_bitmap
from doodle.formats import Format, count_lines, detect_format, read_binary, read_ndjson, read_stroke3


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "render",
        help="render strokes to 28x28 bitmaps as in Google's numpy_bitmap files",
        description=(
            "Render every drawing of FILE (.ndjson simplified or raw, .bin, sketch-rnn .npz) to a 28x28 "
            "uint8 bitmap, strokes 255 on 0, centred, exactly as Google's numpy_bitmap files hold them. "
            "Raw strokes are simplified first. Writes an (N, 784) uint8 .npy, one row per drawing in "
            "file order."
        ),
    )
    p.add_argument("file", type=Path, metavar="FILE", help="a .ndjson, .bin or .npz file")
    p.add_argument("--out", type=Path, required=True, help="the .npy file to write")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="render only the first N drawings")
    p.set_defaults(func=run)


def _drawings(path: Path, fmt: Format, limit: int | None) -> Iterator[Drawing]:
    if fmt in (Format.SIMPLIFIED, Format.RAW):
        return read_ndjson(path, limit=limit)
    if fmt is Format.BINARY:
        return read_binary(path, limit=limit)
    if fmt is Format.SKETCHRNN:
        gen = read_stroke3(path)
        return (d for i, d in enumerate(gen) if limit is None or i < limit)
    raise SystemExit(f"quickdraw render: {path} is {fmt}, not a vector format; nothing to render")


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _count(path: Path, fmt: Format, limit: int | None) -> int:
    n = count_lines(path) if fmt in (Format.SIMPLIFIED, Format.RAW) else sum(1 for _ in _drawings(path, fmt, limit))
    return n if limit is None else min(n, limit)


def run(args: argparse.Namespace) -> int:
    """Render, writing to a temporary file first so that a failure leaves no partial output."""
    if args.limit is not None and args.limit < 0:
        raise SystemExit("quickdraw render: --limit must be >= 0")
    fmt = detect_format(args.file)
    total = _count(args.file, fmt, args.limit)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".render-", suffix=".npy", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the output gets the mode open() would give it
    try:
        if total == 0:  # a zero-length memory map is not allowed
            np.save(tmp, np.zeros((0, BITMAP_PIXELS), dtype=np.uint8))
            os.replace(tmp, out)
            print(f"wrote {out} (0, {BITMAP_PIXELS}) uint8 from {args.file.name}")
            return 0
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, BITMAP_PIXELS))
        n = 0
        for drawing in tqdm(_drawings(args.file, fmt, args.limit), total=total, unit="drawing",
                            desc=args.file.name, disable=None):
            rows[n] = drawing_to_bitmap(drawing).reshape(-1)
            n += 1
        rows.flush()
        del rows
        if n != total:
            raise SystemExit(f"quickdraw render: counted {total} drawings but read {n}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {out} ({total}, {BITMAP_PIXELS}) uint8 from {args.file.name}")
    return 0
