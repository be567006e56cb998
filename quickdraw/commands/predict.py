"""``quickdraw predict``: "your drawing is ..." offline, from a SavedModel on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from quickdraw.commands.common import iter_file_bitmaps
from quickdraw.extras import require

BATCH = 256


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "predict",
        help="classify drawings offline with a SavedModel and print the top 3",
        description=(
            "Classify every drawing in FILE... with the SavedModel in --model, offline (no server). FILE is "
            "a PNG/JPEG image, an .ndjson (each line), a .bin or .npz (each drawing) or an .npy (each row). "
            "Prints the top 3 classes with their scores for each drawing."
        ),
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("--model", type=Path, default=None,
                   help="version directory or base directory (highest version) (default: models/quickdraw, in the "
                        "working directory or else in the project)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N drawings per file")
    p.add_argument("--top", type=int, default=3, help="how many classes to print (default: 3)")
    p.set_defaults(func=run)


def format_top(labels: list[str], probs: np.ndarray, k: int) -> str:
    """``cat 0.93  dog 0.04  horse 0.01``."""
    best = np.argsort(-probs)[:k]
    return "  ".join(f"{labels[i]} {probs[i]:.2f}" for i in best)


def run(args: argparse.Namespace) -> int:
    """Load the model once, then classify file by file in batches."""
    from quickdraw.commands.common import check_files, resolve_model_dir

    require("tensorflow", "quickdraw predict")
    check_files(args.files)
    model_dir = resolve_model_dir(args.model, "--model")
    from trainer.evaluate import LoadedModel

    model = LoadedModel(model_dir)
    for path in args.files:
        items = list(iter_file_bitmaps(path, args.limit))
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            probs = model.predict(np.stack([img for _, img in chunk]))
            for (name, _), p in zip(chunk, probs, strict=True):
                print(f"{name}: {format_top(model.labels, p, args.top)}")
    return 0
