"""The embedded backend: the SavedModel run in-process by TensorFlow, off the event loop.

It loads the highest version under the model directory (or every version), reads the labels from
``assets/labels.txt``, and warms up with every power-of-two batch size up to ``max_batch_size`` before it
reports ready, so the first real call does not pay for graph and kernel setup. Batches run on a thread pool
with one thread per concurrent batch; TensorFlow releases the GIL while it computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.backends import ModelDescription, find_versions, read_labels

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT_KEY = "image"
OUTPUT_KEY = "probabilities"


class ModelNotFoundError(RuntimeError):
    """No SavedModel version under the model directory."""


class EmbeddedBackend:
    """Runs ``serving_default`` of a local SavedModel."""

    name = "embedded"

    def __init__(
        self,
        model_dir: Path,
        model_name: str,
        *,
        all_versions: bool = False,
        max_batch_size: int = 128,
        concurrency: int = 2,
        threads: int = 0,
        warmup: bool = True,
    ) -> None:
        self._model_dir = model_dir
        self._model_name = model_name
        self._all_versions = all_versions
        self._max_batch_size = max_batch_size
        self._threads = threads
        self._warmup = warmup
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="embedded-backend")
        self._signatures: dict[int, Any] = {}
        self._tf: Any = None

    async def start(self) -> ModelDescription:
        """Load (and warm up) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> ModelDescription:
        import tensorflow as tf

        if self._threads:
            tf.config.threading.set_intra_op_parallelism_threads(self._threads)
        self._tf = tf
        versions = find_versions(self._model_dir)
        if not versions:
            raise ModelNotFoundError(
                f"no SavedModel under {self._model_dir.resolve()}: expected <version>/saved_model.pb "
                "(train one with 'make train' or point --model-dir elsewhere)"
            )
        if not self._all_versions:
            versions = versions[-1:]
        labels: tuple[str, ...] | None = None
        for v in versions:
            t0 = time.perf_counter()
            loaded = tf.saved_model.load(str(self._model_dir / str(v)))
            self._signatures[v] = (loaded, loaded.signatures[SIGNATURE])
            these = read_labels(self._model_dir / str(v))
            if labels is not None and these != labels:
                raise ValueError(f"version {v} has different labels from version {versions[0]}; serve one at a time")
            labels = these
            log.info("loaded %s version %d (%d classes) in %.1fs", self._model_name, v, len(these),
                     time.perf_counter() - t0)
            if self._warmup:
                self._warm(v)
        assert labels is not None
        return ModelDescription(self._model_name, tuple(versions), labels)

    def _warm(self, version: int) -> None:
        t0 = time.perf_counter()
        sizes, b = [], 1
        while b < self._max_batch_size:
            sizes.append(b)
            b *= 2
        sizes.append(self._max_batch_size)
        for n in sizes:
            self._run(np.zeros((n, 28, 28, 1), np.uint8), version)
        log.info("warmed up version %d with batch sizes %s in %.1fs", version, sizes, time.perf_counter() - t0)

    def _run(self, images: NDArray[np.uint8], version: int) -> NDArray[np.float32]:
        _, fn = self._signatures[version]
        out = fn(**{INPUT_KEY: self._tf.constant(images)})
        return np.asarray(out[OUTPUT_KEY].numpy(), dtype=np.float32)

    def predict(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> asyncio.Future[NDArray[np.float32]]:
        """Submit one batch to the pool at once (not when a task gets round to it); await the result.

        ``deadline_s`` is not used: a TensorFlow run in progress cannot be interrupted, and the batcher has
        already dropped every expired call."""
        return asyncio.get_running_loop().run_in_executor(self._pool, self._run, images, version)

    async def close(self) -> None:
        """Wait for running batches and drop the models."""
        self._pool.shutdown(wait=True)
        self._signatures.clear()
