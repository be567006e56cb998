"""``quickdraw evaluate``: accuracy, confusion matrix, curves and speed of an exported model."""

from __future__ import annotations

import argparse
from pathlib import Path

from quickdraw.commands.common import sample_dir
from quickdraw.extras import require


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "evaluate",
        help="evaluate a SavedModel on the test split (report.json, confusion.png, curves.png, reliability.png)",
        description=(
            "Evaluate MODEL_DIR (a version directory, or the base directory whose highest version is used) "
            "on the test split of --data, split exactly as training split it. Writes report.json "
            "(top-1, top-3, per-class accuracy, confusion matrix, ECE before and after calibration, out-of-class "
            "AUROC and FPR at 95%% TPR on the held-out unknown test classes, images/s at batch 1 and 128), "
            "confusion.png, curves.png and reliability.png."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="e.g. models/quickdraw or models/quickdraw/1")
    p.add_argument("--data", type=Path, default=sample_dir(), help="numpy_bitmap data (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: MODEL_DIR/<v>/evaluation)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="split to evaluate (default: test)")
    p.add_argument("--no-speed", action="store_true", help="skip the images/s measurement")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the headline figures."""
    require("tensorflow", "quickdraw evaluate")
    require("matplotlib", "quickdraw evaluate")
    from trainer.data import Split
    from trainer.evaluate import evaluate

    report = evaluate(args.model, args.data, args.out, Split(args.split), measure_speed=not args.no_speed)
    print(f"model {report['model_dir']} ({report['architecture']}, {report['parameters']:,} parameters)")
    print(f"{report['split']}: top-1 {report['top1']:.4f}  top-3 {report['top3']:.4f}  "
          f"on {report['drawings']} drawings")
    if "images_per_second" in report:
        s = report["images_per_second"]
        print(f"speed: {s['batch_1']:.0f} images/s at batch 1, {s['batch_128']:.0f} images/s at batch 128")
    cal = report["calibration"]
    print(f"calibration: ECE ({cal['bins']} bins) {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after "
          f"temperature scaling (T = {cal['temperature']})")
    o = report["out_of_class"]
    if "skipped" in o:
        print(f"out-of-class: skipped ({o['skipped']})")
    else:
        line = (f"out-of-class ({o['score']}; {o['unknown_n']} drawings of {o['test_classes']} held-out test classes "
                f"against {o['known_n']} known): AUROC {o['auroc']:.4f}, FPR at 95% TPR {o['fpr_at_95_tpr']:.4f}")
        if "threshold" in o:
            line += (f"; at the card's threshold {o['threshold']:.4g}: {o['known_kept']:.1%} of known kept, "
                     f"{o['unknown_called_known']:.1%} of unknown called known")
        print(line)
    worst = sorted(report["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
    print("weakest classes: " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
    out = Path(report["model_dir"]) / "evaluation" if args.out is None else args.out
    print(f"wrote {out}/report.json, confusion.png, curves.png, reliability.png")
    return 0
