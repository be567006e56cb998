"""``quickdraw train``: numpy_bitmap files to a versioned SavedModel under ``models/quickdraw/``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from quickdraw.commands.common import sample_dir
from quickdraw.extras import require


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    from trainer import ARCH_NAMES, DEFAULT_ARCH  # no Keras import: --help stays fast
    p = sub.add_parser(
        "train",
        help="train a model on numpy_bitmap files and export a SavedModel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train on Google's numpy_bitmap files, memory-mapped, and export a SavedModel in TF Serving's\n"
            "layout (models/quickdraw/<version>/). The split is deterministic: in each class file the last\n"
            "10%% of rows are the test set and the 5%% before them validation.\n\n"
            "Distributed: set TF_CONFIG on each worker and run the same command; MultiWorkerMirroredStrategy\n"
            "is used whenever TF_CONFIG names more than one worker (see README)."
        ),
    )
    p.add_argument("--data", type=Path, default=sample_dir(),
                   help="directory of <class>.npy files or with a numpy_bitmap/ folder (default: %(default)s)")
    p.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=None,
                   help="comma-separated class names (default: every file in --data)")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="use at most N training rows per class (default: all rows before validation)")
    p.add_argument("--arch", choices=sorted(ARCH_NAMES), default=DEFAULT_ARCH,
                   help="architecture; each has its own recipe (default: %(default)s; 'seed' is the starting point)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the architecture's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the recipe's)")
    p.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="turn augmentation off")
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16"], default=None,
                   help="training compute precision (default: the recipe's; the export is always float32)")
    p.add_argument("--tta", choices=["none", "flip", "flip-zoom"], default=None,
                   help="test-time views averaged by the exported model (default: the recipe's; qdnet: flip-zoom)")
    p.add_argument("--seed", type=int, default=1, help="random seed for shuffling, augmentation and weights")
    p.add_argument("--out", type=Path, default=Path("models/quickdraw"),
                   help="model base directory; the export goes to OUT/<version>/ (default: %(default)s)")
    p.add_argument("--version", type=int, default=None, help="version number (default: highest existing + 1)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="checkpoints, TensorBoard logs and history (default: runs/<arch>)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL_DIR",
                   help="start from the weights of an exported version (same architecture and classes): fine-tune")
    p.add_argument("--oe-weight", type=float, default=None,
                   help="weight of the outlier-exposure loss (cross-entropy to uniform; default: the recipe's)")
    p.add_argument("--oe-loss", choices=("uniform", "energy"), default=None,
                   help="outlier-exposure loss: cross-entropy to uniform, or energy margins on logsumexp(logits) "
                   "(Liu et al. 2020) (default: the recipe's)")
    p.add_argument("--oe-batch-size", type=int, default=None,
                   help="outlier-exposure drawings a step, beside --batch-size (default: the recipe's)")
    p.add_argument("--no-outlier-exposure", dest="outlier_exposure", action="store_const", const=False, default=None,
                   help="do not train on the unknown classes of --data's simplified/ and raw/ (outlier exposure)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("QUICKDRAW_TRAIN_THREADS", "0")),
                   help="TensorFlow intra-op threads (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and print where the export went."""
    require("tensorflow", "quickdraw train")
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from trainer.models import TTA_CHOICES
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(
        data_dir=args.data, out=args.out, workdir=args.workdir, classes=args.classes, per_class=args.per_class,
        arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        augment=args.augment, precision=args.precision, tta=None if args.tta is None else TTA_CHOICES[args.tta],
        seed=args.seed, resume=args.resume, version=args.version, init_from=args.init_from,
        outlier_exposure=args.outlier_exposure, oe_weight=args.oe_weight, oe_batch_size=args.oe_batch_size,
        oe_loss=args.oe_loss,
    )
    result = train(cfg)
    if result.export_dir is not None:
        print(f"exported {result.export_dir} after {result.train_seconds:.0f}s of training")
        print(f"TensorBoard: tensorboard --logdir {cfg.workdir or Path('runs') / cfg.arch}/logs")
    return 0
