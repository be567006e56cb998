"""Training data over memory-mapped numpy_bitmap files: deterministic splits and shuffled batches.

Nothing here concatenates the data set: each class file stays a read-only memory map, an epoch is a
shuffled array of (class, row) pairs (8 bytes a drawing), and a batch gathers its rows class by class
from the maps. This module is numpy-only so that benchmarks and tools can use it without TensorFlow.

The split follows Google's row order within each class file of R rows: the last ``test_fraction`` of
the rows are the test set, the ``val_fraction`` before them the validation set, and training uses
rows from the start (at most ``per_class`` of them). The same file always splits the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from doodle import BITMAP_PIXELS, BITMAP_SIDE
from doodle.formats import class_from_path, open_bitmaps


class Split(StrEnum):
    """The three deterministic splits of every class file."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True, slots=True)
class SplitSpec:
    """How each class file is split; fractions of the file's rows, taken from its end."""

    val_fraction: float = 0.05
    test_fraction: float = 0.10
    #: Use at most this many training rows per class (the first ones); None for all.
    per_class: int | None = None
    #: Cap on validation and test rows per class, so Google's 100k-row files evaluate quickly.
    max_eval_per_class: int | None = 5000

    def ranges(self, rows: int) -> dict[Split, range]:
        """Row ranges of each split for a file of ``rows`` rows."""
        n_test = math.ceil(rows * self.test_fraction)
        n_val = math.ceil(rows * self.val_fraction)
        if self.max_eval_per_class is not None:
            n_test = min(n_test, self.max_eval_per_class)
            n_val = min(n_val, self.max_eval_per_class)
        test_start = rows - n_test
        val_start = test_start - n_val
        if val_start <= 0:
            raise ValueError(f"a class file of {rows} rows is too small to split")
        n_train = val_start if self.per_class is None else min(val_start, self.per_class)
        return {
            Split.TRAIN: range(0, n_train),
            Split.VAL: range(val_start, test_start),
            Split.TEST: range(test_start, rows),
        }


def find_class_files(data_dir: str | os.PathLike[str], classes: Sequence[str] | None = None) -> list[Path]:
    """The numpy_bitmap files to train on, sorted by class name.

    ``data_dir`` may hold the ``.npy`` files or a ``numpy_bitmap/`` folder of them (as
    ``quickdraw download`` and the shared sample lay them out).
    """
    root = Path(data_dir)
    if (root / "numpy_bitmap").is_dir():
        root = root / "numpy_bitmap"
    available = {class_from_path(p): p for p in root.glob("*.npy")}
    if not available:
        raise FileNotFoundError(f"no numpy_bitmap .npy files in {root}")
    if classes:
        missing = [c for c in classes if c not in available]
        if missing:
            raise FileNotFoundError(f"no numpy_bitmap file for class(es) {missing} in {root}")
        return [available[c] for c in sorted(set(classes))]
    return [available[c] for c in sorted(available)]


class BitmapData:
    """The class files of a data set, memory-mapped, with their splits and a batch iterator."""

    def __init__(self, files: Sequence[Path], spec: SplitSpec | None = None) -> None:
        self.spec = spec or SplitSpec()
        self.files = list(files)
        self.labels = [class_from_path(p) for p in self.files]
        self.maps = [open_bitmaps(p) for p in self.files]
        self.splits = [self.spec.ranges(len(m)) for m in self.maps]

    @classmethod
    def from_dir(
        cls, data_dir: str | os.PathLike[str], classes: Sequence[str] | None = None, spec: SplitSpec | None = None
    ) -> BitmapData:
        """Open every (or the named) class file under ``data_dir``."""
        return cls(find_class_files(data_dir, classes), spec)

    @property
    def num_classes(self) -> int:
        """How many classes, i.e. the width of the model's output."""
        return len(self.labels)

    def count(self, split: Split) -> int:
        """Drawings in a split over all classes."""
        return sum(len(s[split]) for s in self.splits)

    def counts(self, split: Split) -> dict[str, int]:
        """Drawings in a split, per class."""
        return {label: len(s[split]) for label, s in zip(self.labels, self.splits, strict=True)}

    def row_ranges(self, split: Split) -> dict[str, list[int]]:
        """``[start, stop)`` row numbers of a split per class, for the model card."""
        return {label: [s[split].start, s[split].stop] for label, s in zip(self.labels, self.splits, strict=True)}

    def index(self, split: Split) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
        """(class id, row) for every drawing of a split, class by class in row order."""
        classes = [np.full(len(s[split]), c, dtype=np.int32) for c, s in enumerate(self.splits)]
        rows = [np.arange(s[split].start, s[split].stop, dtype=np.int64) for s in self.splits]
        return np.concatenate(classes), np.concatenate(rows)

    def gather(self, classes: NDArray[np.int32], rows: NDArray[np.int64]) -> NDArray[np.uint8]:
        """Rows as an (n, 28, 28, 1) uint8 array, read class by class from the memory maps."""
        out = np.empty((len(rows), BITMAP_PIXELS), dtype=np.uint8)
        for c in np.unique(classes):
            where = np.flatnonzero(classes == c)
            wanted = rows[where]
            order = np.argsort(wanted, kind="stable")  # sequential reads within a file
            out[where[order]] = self.maps[c][wanted[order]]
        return out.reshape(-1, BITMAP_SIDE, BITMAP_SIDE, 1)

    def steps(self, split: Split, batch_size: int, num_shards: int = 1, drop_remainder: bool = False) -> int:
        """Batches one shard yields per epoch (only full batches, equally many, when sharded)."""
        n = self.count(split)
        if num_shards > 1:
            return (n // batch_size) // num_shards
        return n // batch_size if drop_remainder else math.ceil(n / batch_size)

    def batches(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        shard: int = 0,
        num_shards: int = 1,
        drop_remainder: bool = False,
    ) -> Iterator[tuple[NDArray[np.uint8], NDArray[np.int32]]]:
        """Yield (images uint8 [b, 28, 28, 1], labels int32 [b]) for one epoch.

        With ``shuffle``, the order is a permutation seeded by (seed, epoch), identical on every
        worker; worker ``shard`` of ``num_shards`` takes every ``num_shards``-th batch of it, so the
        workers of a distributed run see disjoint batches. With several shards every shard yields
        the same number of full batches, as synchronous training needs.
        """
        classes, rows = self.index(split)
        if shuffle:
            perm = np.random.default_rng([seed, epoch]).permutation(len(rows))
            classes, rows = classes[perm], rows[perm]
        n_batches = self.steps(split, batch_size, num_shards, drop_remainder)
        for b in range(n_batches):
            start = (b * num_shards + shard) * batch_size
            sl = slice(start, start + batch_size)
            yield self.gather(classes[sl], rows[sl]), classes[sl]
