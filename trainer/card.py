"""Add the validation distribution to an exported version's model card: ``python -m trainer.card MODEL_DIR``.

A training run writes the card's ``MODEL_CARD_DISTRIBUTION`` entry at export (``trainer.export``); a version
exported before issue 26 gets it from here, measured the same way (``trainer.distribution``) on the validation
split its card records, with its own signature: the SavedModel itself (``saved_model.pb``, ``variables/``) is
left as it is, and only ``model_card.json`` is rewritten (atomically, its other entries unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from doodle.contract import MODEL_CARD_DISTRIBUTION
from trainer.data import BitmapData, Split, SplitSpec
from trainer.distribution import DistributionCounter
from trainer.evaluate import LoadedModel
from trainer.export import CARD_FILE

BATCH_SIZE = 512


def split_spec(card: dict[str, Any]) -> SplitSpec:
    """The split the card's training run used (the defaults for what it does not say)."""
    d = card.get("data", {}).get("split", {})
    return SplitSpec(
        val_fraction=d.get("val_fraction", SplitSpec.val_fraction),
        test_fraction=d.get("test_fraction", SplitSpec.test_fraction),
        max_eval_per_class=d.get("max_eval_per_class", SplitSpec.max_eval_per_class),
    )


def measure(model: LoadedModel, data_dir: Path, split: Split = Split.VAL) -> dict[str, Any]:
    """The ``MODEL_CARD_DISTRIBUTION`` entry of ``model`` on ``split`` of ``data_dir``."""
    data = BitmapData.from_dir(data_dir, model.labels, split_spec(model.card))
    if data.labels != model.labels:
        raise ValueError("the data's classes do not match the model's labels")
    counter = DistributionCounter(model.labels, model.threshold if model.has_known_score else None)
    with tqdm(total=data.count(split), desc=f"{split} distribution", unit="drawing", disable=None) as bar:
        for x, _ in data.batches(split, BATCH_SIZE, shuffle=False):
            probs, known = model.predict_with_score(x) if model.has_known_score else (model.predict(x), None)
            counter.add(probs, known, x)
            bar.update(len(x))
    return counter.entry(f"{split.value} split: {counter.drawings} drawings, the exported signature's answers")


def write_card(version_dir: Path, card: dict[str, Any]) -> None:
    """``model_card.json`` replaced in one rename, written as the export writes it."""
    path = version_dir / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module)."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.card",
        description="Measure an exported version's answers on the validation split its model card records and "
        f"write them into the card under {MODEL_CARD_DISTRIBUTION!r} (the class mix of the top-1 predictions, "
        "histograms of the top-1 probability, of the known score and of the ink fraction, the out-of-class rate). "
        "The SavedModel is not changed.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL_DIR", help="e.g. models/quickdraw/1 (or models/quickdraw: "
                        "its highest version)")  # fmt: skip
    default_data = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", "../shared/quickdraw"))
    parser.add_argument("--data", type=Path, default=default_data,
                        help="numpy_bitmap data (default: $QUICKDRAW_SAMPLE_DIR or %(default)s)")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="write nothing: exit 1 when the card's entry differs "
                        "from what is measured now")  # fmt: skip
    args = parser.parse_args(argv)
    model = LoadedModel(args.model)
    entry = measure(model, args.data)
    card = json.loads((model.dir / CARD_FILE).read_text())
    if args.check:
        same = card.get(MODEL_CARD_DISTRIBUTION) == entry
        print(f"{model.dir / CARD_FILE}: {MODEL_CARD_DISTRIBUTION} {'up to date' if same else 'differs'}")
        return 0 if same else 1
    card[MODEL_CARD_DISTRIBUTION] = entry
    write_card(model.dir, card)
    ooc = entry.get("out_of_class_rate")
    print(f"{model.dir / CARD_FILE}: {MODEL_CARD_DISTRIBUTION} written ({entry['drawings']} drawings; top-1 "
          f"probability mean {entry['top1_probability']['mean']:.3f}; ink fraction mean "
          f"{entry['ink_fraction']['mean']:.3f}" + (f"; out-of-class rate {ooc:.3f}" if ooc is not None else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
