"""Make a *bad* candidate model for roll-out rehearsals: the shipped weights perturbed until test top-1 drops.

    python scripts/perturb_model.py --model models/quickdraw/1 --out /tmp/bad/quickdraw --version 2

Loads the SavedModel, adds Gaussian noise to every variable (``scale`` x that variable's own standard deviation,
seeded), and measures top-1 on the test rows of the sample data (the last 10% of each class file, the split the
model card's ``test_top1`` uses; ``--rows-per-class`` of them). The scale doubles from ``--start-scale`` until
top-1 has dropped by at least ``--drop`` (0.10: 10 points) from the unperturbed model's on the same rows, then
bisection finds a smaller scale that still does (``--bisect-steps``). That version is exported under
``--out/<version>`` with the same signatures, assets (labels), model card (its metrics replaced by what was measured
here, and ``perturbed`` saying how it was made) and warm-up requests, so TF Serving and the gateway take it as they
take any version. Weights only: batch-norm statistics are left as they are. It is what ``make rehearsal``'s
refused shadow uses, and what ``quickdraw rollout status`` must refuse to promote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_ENV = "QUICKDRAW_DATA_DIR"


def test_rows(data_dir: Path, labels: list[str], per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` test rows of each of the model's classes, and their class indices."""
    from trainer.data import BitmapData, Split

    data = BitmapData.from_dir(data_dir, labels)
    if data.labels != sorted(labels) or sorted(labels) != labels:
        raise SystemExit(f"the data's classes ({data.labels}) are not the model's ({labels})")
    classes, rows = data.index(Split.TEST)
    keep = np.concatenate([np.flatnonzero(classes == c)[:per_class] for c in range(data.num_classes)])
    return data.gather(classes[keep], rows[keep]), classes[keep]


def top1(fn: Any, images: np.ndarray, truth: np.ndarray, batch: int = 512) -> float:
    """Top-1 of the signature ``fn`` on ``images``."""
    import tensorflow as tf

    from doodle.contract import INPUT_KEY, OUTPUT_KEY

    hits = 0
    for i in range(0, len(images), batch):
        probs = fn(**{INPUT_KEY: tf.constant(images[i : i + batch])})[OUTPUT_KEY].numpy()
        hits += int((probs.argmax(axis=1) == truth[i : i + batch]).sum())
    return hits / len(images)


def model_variables(saved: Any) -> list[Any]:
    """Every variable the loaded SavedModel's signatures use, once each, in a fixed order."""
    seen: dict[int, Any] = {}
    for name in sorted(saved.signatures.keys()):
        for var in saved.signatures[name].variables:
            seen.setdefault(id(var), var)
    return sorted(seen.values(), key=lambda v: v.name)


def perturb(variables: list[Any], originals: list[np.ndarray], scale: float, seed: int) -> None:
    """Set every variable to its original plus seeded noise of ``scale`` x its standard deviation."""
    rng = np.random.default_rng(seed)
    for var, orig in zip(variables, originals, strict=True):
        if not var.dtype.is_floating or orig.size < 2 or "moving_" in var.name:  # weights, not BN statistics
            continue
        noise = rng.standard_normal(orig.shape).astype(orig.dtype) * (scale * float(orig.std()))
        var.assign(orig + noise)


def export(saved: Any, src: Path, dest: Path, card_update: dict[str, Any]) -> None:
    """Save ``saved`` as version directory ``dest`` (appearing whole, by a rename), with ``src``'s assets, warm-up
    requests and model card (updated with ``card_update``)."""
    import tensorflow as tf

    if dest.exists():
        raise SystemExit(f"{dest} exists; remove it or pick another --version")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tf.saved_model.save(saved, str(tmp), signatures=dict(saved.signatures))
        for extra in ("assets", "assets.extra"):
            if (src / extra).is_dir():
                shutil.copytree(src / extra, tmp / extra, dirs_exist_ok=True)
        card_path = src / "model_card.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        card["version"] = int(dest.name)
        for key, value in card_update.items():
            card[key] = {**card.get(key, {}), **value} if isinstance(value, dict) else value
        (tmp / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
        os.rename(tmp, dest)  # appears whole, as the trainer's export does
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def perturbed_copy(src: Path, dest: Path, scale: float, seed: int = 26) -> None:
    """``src`` with its weights perturbed at ``scale`` (no search, no measurement), exported as ``dest``: what the
    tests use (about 0.3 costs the shipped model some 8 points of top-1 on its test rows)."""
    import tensorflow as tf

    saved = tf.saved_model.load(str(src))
    variables = model_variables(saved)
    perturb(variables, [v.numpy() for v in variables], scale, seed)
    export(saved, src, dest, {"perturbed": {"from": str(src), "noise_scale": scale, "seed": seed}})


def main(argv: list[str] | None = None) -> int:
    """Perturb, measure, export; see the module."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "quickdraw" / "1", help="version to perturb")
    p.add_argument("--out", type=Path, required=True, help="model base directory to export into")
    p.add_argument("--version", type=int, default=2, help="version number of the bad candidate (default 2)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get(DATA_ENV, ROOT.parent / "shared" / "quickdraw")),
                   help=f"numpy_bitmap data (default: ${DATA_ENV} or ../shared/quickdraw)")  # fmt: skip
    p.add_argument("--drop", type=float, default=0.10, help="least top-1 drop, as a fraction (default 0.10)")
    p.add_argument("--start-scale", type=float, default=0.05, help="first noise scale (x each variable's std)")
    p.add_argument("--rows-per-class", type=int, default=100, help="test rows per class measured (default 100)")
    p.add_argument("--bisect-steps", type=int, default=5, help="bisection steps once a scale drops enough")
    p.add_argument("--seed", type=int, default=26)
    args = p.parse_args(argv)

    import tensorflow as tf

    from doodle.contract import SIGNATURE_NAME
    from service.backends import read_labels

    labels = list(read_labels(args.model))
    images, truth = test_rows(args.data, labels, args.rows_per_class)
    saved = tf.saved_model.load(str(args.model))
    fn = saved.signatures[SIGNATURE_NAME]
    base = top1(fn, images, truth)
    print(f"unperturbed: test top-1 {base:.4f} on {len(images)} rows", flush=True)
    variables = model_variables(saved)
    originals = [v.numpy() for v in variables]
    low, high = 0.0, args.start_scale
    while True:  # double the scale until top-1 drops enough
        perturb(variables, originals, high, args.seed)
        got = top1(fn, images, truth)
        print(f"noise scale {high:.4f}: test top-1 {got:.4f} (drop {base - got:+.4f})", flush=True)
        if base - got >= args.drop:
            break
        if high > 64:
            raise SystemExit(f"no noise scale up to {high:g} dropped top-1 by {args.drop}")
        low, high = high, high * 2
    found = (high, got)
    for _ in range(args.bisect_steps):  # then the smallest scale that still does, as far as bisection finds it
        mid = (low + high) / 2
        perturb(variables, originals, mid, args.seed)
        got = top1(fn, images, truth)
        print(f"noise scale {mid:.4f}: test top-1 {got:.4f} (drop {base - got:+.4f})", flush=True)
        if base - got >= args.drop:
            high, found = mid, (mid, got)
        else:
            low = mid
    scale, got = found
    perturb(variables, originals, scale, args.seed)
    dest = args.out / str(args.version)
    export(saved, args.model, dest, {
        "metrics": {"test_top1": got, "test_n": len(images)},
        "perturbed": {"from": str(args.model), "noise_scale": scale, "seed": args.seed, "test_top1_before": base,
                      "test_top1_after": got, "rows_per_class": args.rows_per_class},
    })  # fmt: skip
    print(f"wrote {dest}: test top-1 {got:.4f}, {base - got:.4f} below the original's {base:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
