"""The raw model in-process: images/s of the shipped SavedModel at batch 1, 8, 32, 128 and 512.

The ceiling everything else is measured against: no gRPC, no validation, no batcher, just the
``serving_default`` signature called in a loop on random uint8 bitmaps (the model's cost does not depend on
the pixels). Each batch size runs for about the same time, twice, interleaved; the better run counts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "quickdraw"
BATCHES = (1, 8, 32, 64, 128, 512)
SECONDS = float(os.environ.get("BENCH_MODEL_S", "2.0"))  # per batch size and round


def measure() -> dict[int, float]:
    """images/s per batch size (best of 2 interleaved rounds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from service.backends import find_versions

    fn = tf.saved_model.load(str(MODEL / str(find_versions(MODEL)[-1]))).signatures["serving_default"]
    rng = np.random.default_rng(0)
    best: dict[int, float] = {}
    for _ in range(2):
        for b in BATCHES:
            x = tf.constant(rng.integers(0, 256, (b, 28, 28, 1), dtype=np.uint8))
            fn(image=x)  # warm
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < SECONDS or n < 3:
                fn(image=x)["probabilities"].numpy()
                n += 1
            best[b] = max(best.get(b, 0.0), n * b / elapsed)
    return best


def run() -> list[str]:
    """Print the table; return the summary lines."""
    rates = measure()
    for b, r in rates.items():
        print(f"  batch {b:>3}: {r:8.0f} images/s  ({r / rates[1]:.2f}x batch 1)", flush=True)
    peak = max(rates, key=lambda b: rates[b])
    return [
        f"raw model: {rates[1]:.0f} images/s at batch 1, {rates[128]:.0f} at 128, {rates[512]:.0f} at 512; "
        f"best/batch-1 = {rates[peak] / rates[1]:.2f}x (batch {peak}): the most any batching can gain here"
    ]
