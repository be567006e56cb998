"""The embedded backend: the SavedModel run in-process by TensorFlow, off the event loop.

It loads the highest version under the model directory (or every version), reads the labels from
``assets/labels.txt``, and warms up with every power-of-two batch size up to ``max_batch_size`` before it
reports ready, so the first real call does not pay for graph and kernel setup. Batches run on a thread pool
with one thread per concurrent batch; TensorFlow releases the GIL while it computes.

Hot reload, as TF Serving does it: every ``watch_s`` seconds it looks at the model directory. A new highest
version is loaded and warmed up on a separate thread while the current one keeps serving, then becomes the
served version in one step (``on_change``); the version it replaces stays loaded for ``retire_s`` more, so
calls already queued for it finish. In ``all`` mode, every new version is added. Removals are followed too: when
the served version's directory is deleted (a rollback), the highest remaining version is loaded (unless still
loaded) and served; in ``all`` mode a deleted version stops being served. A batch for a version no longer loaded
gets NOT_FOUND. When no version is left, the loaded ones keep serving.

Each version's signature is wrapped in a TensorFlow function that returns ``probabilities`` alone, so TensorFlow
prunes what only the other outputs need (the top-k, the ``top_k_labels`` strings): the gateway ranks
probabilities itself. The names (signature, input, output, labels file) are ``doodle.contract``'s.

Out-of-class detection (issue 18): when a version's signature also gives ``KNOWN_SCORE``, the wrapper returns it
too and each batch answers ``Answered(probabilities, version, known)``; the threshold comes from that version's
``model_card.json`` (``ModelDescription.out_of_class``). A version without the output (exported before issue 18)
answers probabilities alone, as before, and its predictions carry no decision; one with the output but no
threshold in its card is served the same way (with a warning). A card whose entry is unusable fails the load.

``signature_defs`` is what TF Serving's GetModelMetadata reports for the served version: every SignatureDef of
its ``saved_model.pb`` (the ``serve`` meta graph), as a ``service.protos.tfs`` ``SignatureDefMap``.

The watcher is supervised: if it dies, ``on_failure`` is told (the gateway then reports NOT_SERVING and
refuses calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from doodle.contract import INPUT_KEY, KNOWN_SCORE, MODEL_CARD_OOD, OUTPUT_KEY, SIGNATURE_NAME
from service.backends import (
    Answered,
    ModelDescription,
    OutOfClassInfo,
    find_versions,
    read_labels,
    read_out_of_class,
)
from service.core.errors import BackendError, NotFound
from service.protos import tfs

log = logging.getLogger(__name__)

#: The meta graph TF Serving loads from a SavedModel (``tf.saved_model.SERVING``; its ``--saved_model_tags``).
SERVE_TAG = "serve"


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
        watch_s: float = 0.0,
        retire_s: float = 30.0,
    ) -> None:
        self._model_dir = model_dir
        self._model_name = model_name
        self._all_versions = all_versions
        self._max_batch_size = max_batch_size
        self._threads = threads
        self._warmup = warmup
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="embedded-backend")
        #: Per loaded version: (the loaded object, its signature as a function giving only the probabilities, or
        #: the probabilities and ``KNOWN_SCORE`` when the signature has that output: the bool).
        self._signatures: dict[int, tuple[Any, Any, bool]] = {}
        #: Per loaded version that makes an out-of-class decision: its model card's threshold and operating point.
        self._out_of_class: dict[int, OutOfClassInfo] = {}
        #: Per loaded version: every SignatureDef of its saved_model.pb (a ``service.protos.tfs.SignatureDefMap``).
        self._signature_defs: dict[int, Any] = {}
        self._tf: Any = None
        self._watch_s = watch_s
        self._retire_s = retire_s
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-loader")
        self._watcher: asyncio.Task[None] | None = None
        self._description: ModelDescription | None = None
        #: The version a call names is the one it gets (hot reload swaps versions in one step).
        self.versionless = False
        #: No top-k outputs alone: the batcher always asks for probabilities.
        self.top_k_width = 0
        #: Unused: the embedded backend counts nothing of its own.
        self.metrics: Any = None
        #: Called with the new description when the served versions change (hot reload).
        self.on_change: Callable[[ModelDescription | None], None] | None = None
        #: Called with what died and why when the version watcher dies.
        self.on_failure: Callable[[str, BaseException | None], None] | None = None

    async def start(self) -> ModelDescription:
        """Load (and warm up) off the event loop; then watch the directory for new versions."""
        self._description = await asyncio.get_running_loop().run_in_executor(self._loader, self._load)
        if self._watch_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="embedded-watch")
            self._watcher.add_done_callback(self._watcher_done)
        return self._description

    def _watcher_done(self, task: asyncio.Task[None]) -> None:
        """The watcher ended: expected when cancelled by close(); anything else is a death, reported."""
        if task.cancelled():
            return
        exc = task.exception()
        if self.on_failure is not None:
            self.on_failure("the embedded backend's version watcher", exc)
        else:
            log.error("the embedded backend's version watcher died; versions are no longer followed", exc_info=exc)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        said = ""
        while True:
            await asyncio.sleep(self._watch_s)
            assert self._description is not None
            current = self._description.versions
            try:
                found = find_versions(self._model_dir)
            except OSError as exc:
                log.warning("cannot list %s: %s", self._model_dir, exc)
                continue
            if not found:
                if said != "none":
                    log.warning("no version left under %s; still serving %s", self._model_dir, list(current))
                    said = "none"
                continue
            said = ""
            versions = tuple(found) if self._all_versions else (found[-1],)
            if versions == current:
                continue
            wanted = [v for v in versions if v not in self._signatures]
            try:
                for v in wanted:
                    await loop.run_in_executor(self._loader, self._load_version, v, self._description.labels)
            except Exception:
                log.exception("could not load version(s) %s from %s; still serving %s", wanted, self._model_dir,
                              list(current))  # fmt: skip
                await asyncio.sleep(self._watch_s)  # do not retry in a tight loop
                continue
            self._description = self._describe(versions, self._description.labels)
            retired = [v for v in current if v not in versions]
            removed = [v for v in retired if v not in found]
            log.info("now serving %s versions %s%s", self._model_name, list(versions),
                     f" (version(s) {removed} were removed)" if removed else "")  # fmt: skip
            if self.on_change is not None:
                self.on_change(self._description)
            if retired:
                loop.call_later(self._retire_s, self._retire, retired)

    def _retire(self, versions: list[int]) -> None:
        """Drop versions no longer served (after calls queued for them have had time to finish)."""
        assert self._description is not None
        for v in versions:
            if v not in self._description.versions:
                self._signatures.pop(v, None)
                self._signature_defs.pop(v, None)
                self._out_of_class.pop(v, None)
                log.info("unloaded %s version %d", self._model_name, v)

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
            labels = self._load_version(v, labels)
        assert labels is not None
        return self._describe(tuple(versions), labels)

    def _describe(self, versions: tuple[int, ...], labels: tuple[str, ...]) -> ModelDescription:
        """The description of ``versions`` (loaded), with the out-of-class decision of those that make one."""
        ood = {v: self._out_of_class[v] for v in versions if v in self._out_of_class}
        return ModelDescription(self._model_name, versions, labels, out_of_class=ood)

    def _load_version(self, v: int, labels: tuple[str, ...] | None) -> tuple[str, ...]:
        """Load and warm up one version; its labels must match ``labels`` when given. Returns its labels."""
        tf = self._tf
        t0 = time.perf_counter()
        these = read_labels(self._model_dir / str(v))
        if labels is not None and these != labels:
            raise ValueError(f"version {v} has different labels from the served version; serve one at a time")
        defs = read_signature_defs(self._model_dir / str(v))
        ood = read_out_of_class(self._model_dir / str(v))  # ValueError: an unusable card fails the load
        loaded = tf.saved_model.load(str(self._model_dir / str(v)))
        sig = loaded.signatures[SIGNATURE_NAME]
        known = KNOWN_SCORE in sig.structured_outputs
        if known and ood is None:
            log.warning("version %d gives %r but its model card has no %r threshold: its predictions carry no "
                        "out-of-class decision", v, KNOWN_SCORE, MODEL_CARD_OOD)  # fmt: skip
        elif ood is not None and not known:
            log.warning("version %d's model card has an %r threshold but its signature gives no %r: its predictions "
                        "carry no out-of-class decision", v, MODEL_CARD_OOD, KNOWN_SCORE)  # fmt: skip
            ood = None
        self._signatures[v] = (loaded, self._probabilities(sig, known), known)
        self._signature_defs[v] = defs
        if ood is not None:
            self._out_of_class[v] = ood
        else:
            self._out_of_class.pop(v, None)
        decision = f"; known when {KNOWN_SCORE} >= {ood.threshold:g}" if ood is not None else ""
        log.info("loaded %s version %d (%d classes%s) in %.1fs", self._model_name, v, len(these), decision,
                 time.perf_counter() - t0)  # fmt: skip
        if self._warmup:
            self._warm(v)
        return these

    def predict_top_k(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> Awaitable[Answered]:
        """Not offered (``top_k_width`` is 0): the batcher never calls it."""
        raise BackendError("the embedded backend gives probabilities only")

    @property
    def signature_defs(self) -> Any:
        """Every SignatureDef of the version served by default (``service.protos.tfs.SignatureDefMap``), as TF Serving's
        GetModelMetadata gives it; None before the first version is loaded."""
        if self._description is None:
            return None
        return self._signature_defs.get(self._description.default_version)

    def _probabilities(self, sig: Any, known: bool = False) -> Any:
        """``sig`` as a function of the images giving its ``probabilities`` alone (with ``known``, and its
        ``KNOWN_SCORE``, as a pair): TensorFlow prunes the rest."""
        tf = self._tf

        @tf.function(input_signature=[sig.structured_input_signature[1][INPUT_KEY]])
        def probabilities(image: Any) -> Any:
            out = sig(**{INPUT_KEY: image})
            return (out[OUTPUT_KEY], out[KNOWN_SCORE]) if known else out[OUTPUT_KEY]

        return probabilities

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

    def _run(self, images: NDArray[np.uint8], version: int) -> NDArray[np.float32] | Answered:
        """Probabilities for a batch; with the version's ``KNOWN_SCORE`` as ``Answered`` when it gives one."""
        entry = self._signatures.get(version)
        if entry is None:
            served = self._description.versions if self._description is not None else ()
            raise NotFound(f"model {self._model_name!r} version {version} is no longer served (retired); versions: "
                           f"{', '.join(map(str, served))}")  # fmt: skip
        _, fn, known = entry
        out = fn(self._tf.constant(images))
        if not known:
            return np.asarray(out.numpy(), dtype=np.float32)
        probs, score = out
        return Answered(np.asarray(probs.numpy(), dtype=np.float32), version,
                        np.asarray(score.numpy(), dtype=np.float32).reshape(-1))  # fmt: skip

    def predict(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None, attempts: int | None = None
    ) -> asyncio.Future[NDArray[np.float32] | Answered]:
        """Submit one batch to the pool at once (not when a task gets round to it); await the result.

        ``deadline_s`` is not used: a TensorFlow run in progress cannot be interrupted, and the batcher has
        already dropped every expired call. ``attempts``: one, always (nothing here is retried)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, self._run, images, version)

    def watch_labels(self, labels: frozenset[str]) -> None:
        """Version labels are TF Serving's: a roll-out plan naming one here leaves that target unserved (its share
        goes to the default version); logged."""
        if labels:
            log.warning("version labels %s name nothing on the embedded backend: use version numbers",
                        ", ".join(sorted(labels)))  # fmt: skip

    async def close(self) -> None:
        """Stop watching, wait for running batches and drop the models."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await asyncio.to_thread(self._loader.shutdown, wait=True)  # joined off the event loop
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self._signatures.clear()
        self._signature_defs.clear()
        self._out_of_class.clear()


def read_signature_defs(version_dir: Path, tag: str = SERVE_TAG) -> Any:
    """The SignatureDefs of ``version_dir/saved_model.pb``'s meta graph tagged ``tag``, as a ``service.protos.tfs``
    ``SignatureDefMap``: what TF Serving's GetModelMetadata packs (get_model_metadata_impl.cc copies every entry of
    the bundle's ``meta_graph_def.signature_def``, ``__saved_model_init_op`` included).

    Parsed with TensorFlow's ``SavedModel`` message (``service.protos.tfs``'s pool has ``MetaGraphDef`` but not
    ``SavedModel``), then moved into the pool's classes as bytes: the two never meet as objects.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = version_dir / "saved_model.pb"
    saved = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    graphs = [g for g in saved.meta_graphs if tag in g.meta_info_def.tags]
    if not graphs:
        found = [list(g.meta_info_def.tags) for g in saved.meta_graphs]
        raise ValueError(f"{path} has no meta graph tagged {tag!r} (its tags: {found})")
    out = tfs.SignatureDefMap()
    for name, sig in graphs[0].signature_def.items():
        out.signature_def[name].ParseFromString(sig.SerializeToString())
    return out
