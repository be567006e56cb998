"""The TF Serving backend: batches go to ``tensorflow.serving.PredictionService/Predict`` over gRPC.

- Readiness follows ``ModelService/GetModelStatus``: start() waits until TF Serving reports a version
  AVAILABLE, and a poller keeps the set of AVAILABLE versions current afterwards (``on_change``), so the
  gateway follows versions as TF Serving loads and unloads them, and reports NOT_SERVING while none is.
  A NOT_FOUND from Predict (a version just unloaded) makes it look again at once. With
  ``tfserving_version_label``, calls that name no version go to the version that label points at (asked of
  GetModelMetadata at start and at every poll), so promoting a canary in TF Serving's config moves them.
- The signature is checked through ``GetModelMetadata``; labels come from the labels asset
  (``--labels-file`` or ``<model-dir>/<version>/assets/labels.txt``), and their count must match the
  signature's output width.
- A batch whose callers want only their best few classes asks for the signature's ``top_k_scores`` and
  ``top_k_indices`` alone (``output_filter``; ``predict_top_k``, when the signature has them): TF Serving sends
  40 bytes a drawing instead of every probability, and nobody ranks them again.
- Each batch's deadline is the latest remaining deadline among its callers, less a small margin for the
  network hops (``tfserving_deadline_margin_ms``), capped by ``backend_timeout_ms``: TF Serving never works
  for a caller that has gone.
- Only UNAVAILABLE is retried, boundedly and with backoff, by gRPC's own retry policy (service config); the
  channel reconnects with a short capped backoff, so a restarted TF Serving is found again within a second.
- Keepalive pings find dead peers; message sizes are capped both ways.
- The status poller is supervised: if it dies, ``on_failure`` is told (the gateway then reports NOT_SERVING and
  refuses calls). A batch whose callers have all gone is cancelled by the batcher, which cancels its RPC.
- ``dns:///name:port`` targets resolve every address of a headless Kubernetes Service, and ``round_robin``
  spreads calls over them per request, not per connection.
- The channel is TLS, or mTLS with a client certificate, when the ``tfserving_tls*`` settings ask for it
  (``service.security.tfserving_channel``).
- The messages are ``service.tfs``'s (vendored TF Serving 2.21 protos in a private descriptor pool) and the
  stubs call methods by path: this backend loads no TensorFlow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from service import tfs
from service.backends import ModelDescription, TopK, find_versions, read_labels
from service.errors import BackendError, DeadlineExceeded, NotFound, ServiceError, Unavailable
from service.security import tfserving_channel
from service.settings import Settings
from service.tensors import TensorDecodeError, from_numpy, to_numpy

log = logging.getLogger(__name__)

INPUT_KEY = "image"
OUTPUT_KEY = "probabilities"
TOP_K_SCORES, TOP_K_INDICES = "top_k_scores", "top_k_indices"
AVAILABLE = tfs.AVAILABLE


def channel_options(settings: Settings) -> list[tuple[str, object]]:
    """Channel arguments: round_robin, UNAVAILABLE-only bounded retries, keepalive, sizes, reconnect backoff."""
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": tfs.PREDICTION_SERVICE}, {"service": tfs.MODEL_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": settings.tfserving_max_attempts,
                    "initialBackoff": f"{settings.tfserving_initial_backoff_ms / 1000:.3f}s",
                    "maxBackoff": f"{settings.tfserving_max_backoff_ms / 1000:.3f}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }  # fmt: skip
    reconnect_ms = int(settings.tfserving_reconnect_backoff_ms)
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1 if settings.tfserving_max_attempts > 1 else 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.tfserving_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, reconnect_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_ms),
    ]


def _mapped(exc: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """A TF Serving failure as the error our caller gets."""
    code, detail = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"TF Serving is unavailable ({what}): {detail}; retry with backoff")
    if code == grpc.StatusCode.CANCELLED:  # not by us (our callers' cancellations never get here): it went away
        return Unavailable(f"TF Serving cancelled the call, shutting down or restarting ({what}); retry with backoff")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for TF Serving ({what})")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"TF Serving does not serve it ({what}): {detail}")
    return BackendError(f"TF Serving failed ({what}): {code.name}: {detail}")


class TFServingBackend:
    """Runs batches on TF Serving; see the module docstring."""

    name = "tfserving"

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._s = settings
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._predict: tfs.PredictionServiceStub | None = None
        self._models: tfs.ModelServiceStub | None = None
        self._poller: asyncio.Task[None] | None = None
        self._description: ModelDescription | None = None
        #: Width of the signature's top_k_* outputs (0 without them): what ``predict_top_k`` gives.
        self.top_k_width = 0
        self._refresh = asyncio.Event()
        #: Called with the new description when the AVAILABLE versions change, None when none is left.
        self.on_change: Callable[[ModelDescription | None], None] | None = None
        #: Called with what died and why when the status poller dies.
        self.on_failure: Callable[[str, BaseException | None], None] | None = None

    # --- start -------------------------------------------------------------------------------------------------
    async def start(self) -> ModelDescription:
        """Wait for an AVAILABLE version, check the signature, read the labels, start following versions."""
        s = self._s
        self._channel = tfserving_channel(s, channel_options(s))  # TLS/mTLS when the settings ask for it
        self._predict = tfs.PredictionServiceStub(self._channel)
        self._models = tfs.ModelServiceStub(self._channel)
        versions = await self._wait_available()
        classes = await self._check_signature()
        default = await self._labelled_version(versions)
        labels = self._labels(default or versions[-1])
        if classes is not None and classes != len(labels):
            raise ValueError(
                f"TF Serving's {s.model_name!r} outputs {classes} classes but the labels name {len(labels)}"
            )
        self._description = ModelDescription(s.model_name, versions, labels, default)
        self._poller = asyncio.get_running_loop().create_task(self._follow(), name="tfserving-status")
        self._poller.add_done_callback(self._poller_done)
        log.info("TF Serving at %s serves %s versions %s", s.tfserving_target, s.model_name, list(versions))
        return self._description

    def _poller_done(self, task: asyncio.Task[None]) -> None:
        """The poller ended: expected when cancelled by close(); anything else is a death, reported."""
        if task.cancelled():
            return
        exc = task.exception()
        if self.on_failure is not None:
            self.on_failure("the TF Serving status poller", exc)
        else:
            log.error("the TF Serving status poller died; versions are no longer followed", exc_info=exc)

    async def available_versions(self, timeout_s: float = 5.0) -> tuple[int, ...]:
        """The versions TF Serving reports AVAILABLE now (raises AioRpcError when it cannot be asked)."""
        assert self._models is not None
        req = tfs.GetModelStatusRequest()
        req.model_spec.name = self._s.model_name
        resp = await self._models.GetModelStatus(req, timeout=timeout_s)
        return tuple(sorted(v.version for v in resp.model_version_status if v.state == AVAILABLE))

    async def _wait_available(self) -> tuple[int, ...]:
        s = self._s
        give_up = self._clock() + s.tfserving_startup_timeout_s
        pause, said = 0.1, ""
        while True:
            try:
                versions = await self.available_versions()
                if versions:
                    return versions
                why = f"model {s.model_name!r} has no AVAILABLE version yet"
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
            if why != said:
                log.info("waiting for TF Serving at %s: %s", s.tfserving_target, why)
                said = why
            if self._clock() + pause > give_up:
                raise RuntimeError(
                    f"TF Serving at {s.tfserving_target} did not report {s.model_name!r} AVAILABLE within "
                    f"tfserving_startup_timeout_s={s.tfserving_startup_timeout_s}: {why}"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _labelled_version(self, versions: tuple[int, ...], timeout_s: float = 5.0) -> int | None:
        """The version ``tfserving_version_label`` points at (None without a label); it must be AVAILABLE.

        TF Serving has no call that lists labels; GetModelMetadata for a label answers with the version."""
        label = self._s.tfserving_version_label
        if label is None:
            return None
        assert self._predict is not None
        req = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = self._s.model_name
        req.model_spec.version_label = label
        resp = await self._predict.GetModelMetadata(req, timeout=timeout_s)
        version = resp.model_spec.version.value
        if version not in versions:
            raise ValueError(f"TF Serving's label {label!r} points at version {version}, which is not AVAILABLE")
        return version

    async def _check_signature(self) -> int | None:
        """The signature must take uint8 ``image`` and give ``probabilities``; returns its width if known."""
        assert self._predict is not None
        s = self._s
        req = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = s.model_name
        resp = await self._predict.GetModelMetadata(req, timeout=10)
        sigs = tfs.SignatureDefMap()
        if not resp.metadata["signature_def"].Unpack(sigs):
            raise ValueError(
                f"TF Serving's signature_def metadata is a {resp.metadata['signature_def'].type_url!r}, "
                f"not a {tfs.SIGNATURE_DEF_MAP_URL!r}"
            )
        if s.tfserving_signature not in sigs.signature_def:
            raise ValueError(
                f"TF Serving's {s.model_name!r} has no signature {s.tfserving_signature!r}; it has "
                f"{sorted(sigs.signature_def)}"
            )
        sig = sigs.signature_def[s.tfserving_signature]
        if INPUT_KEY not in sig.inputs or OUTPUT_KEY not in sig.outputs:
            raise ValueError(
                f"signature {s.tfserving_signature!r} must take {INPUT_KEY!r} and give {OUTPUT_KEY!r}; it takes "
                f"{sorted(sig.inputs)} and gives {sorted(sig.outputs)}"
            )
        if TOP_K_SCORES in sig.outputs and TOP_K_INDICES in sig.outputs:
            top = [d.size for d in sig.outputs[TOP_K_SCORES].tensor_shape.dim]
            self.top_k_width = top[1] if len(top) == 2 and top[1] > 0 else 0
        dims = [d.size for d in sig.outputs[OUTPUT_KEY].tensor_shape.dim]
        return dims[1] if len(dims) == 2 and dims[1] > 0 else None

    def _labels(self, version: int) -> tuple[str, ...]:
        s = self._s
        if s.labels_file is not None:
            return tuple(line.strip() for line in Path(s.labels_file).read_text().splitlines() if line.strip())
        local = find_versions(s.model_dir)
        pick = version if version in local else (local[-1] if local else None)
        if pick is None:
            raise ValueError(
                f"the tfserving backend needs the class names: give --labels-file, or a --model-dir "
                f"({s.model_dir}) holding <version>/assets/labels.txt"
            )
        return read_labels(s.model_dir / str(pick))

    async def _follow(self) -> None:
        """Poll GetModelStatus and report changes in the AVAILABLE versions."""
        d = self._description
        last: tuple[tuple[int, ...], int | None] | None = (d.versions, d.default) if d else None
        while True:
            with contextlib.suppress(TimeoutError):  # a NOT_FOUND from Predict asks for an early look
                await asyncio.wait_for(self._refresh.wait(), self._s.tfserving_status_poll_s)
            self._refresh.clear()
            default: int | None = None
            try:
                versions: tuple[int, ...] = await self.available_versions()
                if versions:
                    default = await self._labelled_version(versions)
            except (grpc.aio.AioRpcError, ValueError) as exc:
                versions = ()
                if last and last[0]:
                    log.warning("TF Serving status unknown: %s", exc.details() if isinstance(exc, grpc.aio.AioRpcError)
                                else exc)  # fmt: skip
            if (versions, default) == last:
                continue
            last = (versions, default)
            if versions and self._description is not None:
                self._description = ModelDescription(self._s.model_name, versions, self._description.labels, default)
                log.info("TF Serving now serves %s versions %s (default %d)", self._s.model_name, list(versions),
                         self._description.default_version)  # fmt: skip
                if self.on_change is not None:
                    self.on_change(self._description)
            else:
                log.warning("TF Serving has no AVAILABLE version of %s", self._s.model_name)
                if self.on_change is not None:
                    self.on_change(None)

    # --- batches -----------------------------------------------------------------------------------------------
    def predict(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> Awaitable[NDArray[np.float32]]:
        """Send one batch now; the awaitable gives its probabilities or raises a ServiceError."""
        return self._answer(self._call(images, version, deadline_s, [OUTPUT_KEY]), len(images), version)

    def predict_top_k(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> Awaitable[TopK]:
        """Send one batch now for its ``top_k_*`` outputs alone (``top_k_width`` classes a drawing, best first)."""
        return self._answer_top_k(self._call(images, version, deadline_s, [TOP_K_SCORES, TOP_K_INDICES]),
                                  len(images), version)  # fmt: skip

    def _call(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None, outputs: list[str]
    ) -> Awaitable[Any]:
        """Start the Predict call of one batch for ``outputs``."""
        assert self._predict is not None
        timeout = self._s.backend_timeout_ms / 1000.0
        if deadline_s is not None:
            timeout = min(timeout, deadline_s - self._clock() - self._s.tfserving_deadline_margin_ms / 1000.0)
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the batch reached TF Serving")
        req = tfs.PredictRequest(output_filter=outputs)
        req.model_spec.name = self._s.model_name
        req.model_spec.version.value = version
        req.model_spec.signature_name = self._s.tfserving_signature
        req.inputs[INPUT_KEY].CopyFrom(from_numpy(images))
        return self._predict.Predict(req, timeout=timeout)  # starts now

    async def _response(self, call: Awaitable[Any], n: int, version: int) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self._refresh.set()  # TF Serving unloaded it: learn the new versions now, not at the next poll
            raise _mapped(exc, f"Predict of {n} drawings on version {version}") from None

    async def _answer_top_k(self, call: Awaitable[Any], n: int, version: int) -> TopK:
        resp = await self._response(call, n, version)
        got = []
        for key in (TOP_K_SCORES, TOP_K_INDICES):
            if key not in resp.outputs:
                raise BackendError(f"TF Serving's answer has no {key!r} output: {sorted(resp.outputs)}")
            try:
                got.append(to_numpy(resp.outputs[key]))
            except TensorDecodeError as exc:
                raise BackendError(f"TF Serving's {key!r} could not be decoded: {exc}") from None
        scores, indices = got
        classes = len(self._description.labels) if self._description is not None else 0
        if scores.shape != (n, self.top_k_width) or indices.shape != scores.shape or indices.dtype.kind not in "iu":
            raise BackendError(f"TF Serving returned top-k outputs of shapes {list(scores.shape)} and "
                               f"{list(indices.shape)} for {n} drawings of {self.top_k_width}")  # fmt: skip
        if indices.size and (indices.min() < 0 or indices.max() >= classes):
            raise BackendError(f"TF Serving returned class indices outside 0..{classes - 1}")
        return TopK(scores.astype(np.float32, copy=False), indices)

    async def _answer(self, call: Awaitable[Any], n: int, version: int) -> NDArray[np.float32]:
        resp = await self._response(call, n, version)
        if OUTPUT_KEY not in resp.outputs:
            raise BackendError(f"TF Serving's answer has no {OUTPUT_KEY!r} output: {sorted(resp.outputs)}")
        try:
            probs = to_numpy(resp.outputs[OUTPUT_KEY]).astype(np.float32, copy=False)
        except TensorDecodeError as exc:
            raise BackendError(f"TF Serving's {OUTPUT_KEY!r} could not be decoded: {exc}") from None
        if probs.ndim != 2 or len(probs) != n:
            raise BackendError(f"TF Serving returned {OUTPUT_KEY!r} of shape {list(probs.shape)} for {n} drawings")
        return probs

    async def close(self) -> None:
        """Stop following versions and close the channel."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._channel is not None:
            await self._channel.close()
