"""TF Serving's own gRPC API on the gateway: ``PredictionService`` (Predict, GetModelMetadata) and
``ModelService`` (GetModelStatus), for the served model, with input ``image`` uint8 [n, 28, 28, 1].

A backend team that already calls TF Serving points its client at the gateway and changes nothing else; its
calls go through the same validation, batcher, backend and metrics as ``quickdraw.v1.Classifier``, and get
the outputs of the exported signature (``probabilities``, ``top_k_scores``, ``top_k_indices``,
``top_k_labels``; ``output_filter`` selects among them). Errors use TF Serving's codes: NOT_FOUND for an
unknown model or version, INVALID_ARGUMENT for a wrong dtype, shape, signature or input name, with the same
``google.rpc.BadRequest`` details as the native API.

The messages are ``service.tfs``'s (the vendored TF Serving 2.21 protos in a private descriptor pool), and the
methods are registered by path with generic handlers: serving this API loads no TensorFlow.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from service import tfs, wire
from service.api import GatewaySlot, _deadline, _unary, parse_message
from service.backends import TopK
from service.errors import FieldViolation, InvalidArgument, NotFound
from service.metrics import Metrics
from service.tensors import from_numpy
from service.validation import image_tensor

SIGNATURE = "serving_default"
INPUT_KEY = "image"
#: Width of the top_k_* outputs, as in the exported signature (trainer.export.TOP_K).
TOP_K = 5
OUTPUTS = ("probabilities", "top_k_scores", "top_k_indices", "top_k_labels")
PREDICTION_SERVICE = tfs.PREDICTION_SERVICE
MODEL_SERVICE = tfs.MODEL_SERVICE


class _Surface(GatewaySlot):
    """Shared by both servicers: the gateway (once ready), metrics, and model_spec checks."""

    def __init__(self, metrics: Metrics, version_label: str | None = None) -> None:
        self.metrics = metrics
        self.version_label = version_label

    def version(self, spec: Any) -> int:
        """The version a ``ModelSpec`` asks for: its number, or the default; NOT_FOUND as TF Serving says it."""
        model = self.gateway.model
        if spec.name != model.name:
            raise NotFound(f"Servable not found for request: model {spec.name!r} (this gateway serves {model.name!r})")
        if spec.WhichOneof("version_choice") == "version_label":
            if self.version_label is not None and spec.version_label == self.version_label:
                return model.default_version  # the version TF Serving's label points at (tfserving_version_label)
            known = f"the only label here is {self.version_label!r}" if self.version_label else "no labels here"
            raise InvalidArgument(
                [FieldViolation("model_spec.version_label",
                                f"unknown version label {spec.version_label!r} ({known}); ask for a version number "
                                f"({', '.join(map(str, model.versions))}) or none for the default")]
            )  # fmt: skip
        if not spec.HasField("version"):
            return model.default_version
        v = spec.version.value
        if v not in model.versions:
            raise NotFound(
                f"Servable not found for request: Specific({model.name}, {v}); versions: "
                f"{', '.join(map(str, model.versions))}"
            )
        return v


class PredictionService:
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata."""

    def __init__(self, surface: _Surface) -> None:
        self._surface = surface
        self.metrics = surface.metrics

    @_unary("Predict")
    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Run ``serving_default`` on the images through the batcher (``request`` as bytes: counted first)."""
        if isinstance(request, bytes):
            wire.check_predict(request)
            request = parse_message(tfs.PredictRequest, request)
        surface = self._surface
        version = surface.version(request.model_spec)
        gateway = surface.gateway
        if request.model_spec.signature_name not in ("", SIGNATURE):
            raise InvalidArgument(
                [FieldViolation("model_spec.signature_name",
                                f"no signature {request.model_spec.signature_name!r}; this model has {SIGNATURE!r}")]
            )  # fmt: skip
        extra = sorted(set(request.inputs) - {INPUT_KEY})
        if extra or INPUT_KEY not in request.inputs:
            raise InvalidArgument(
                [FieldViolation("inputs", f"expected exactly one input {INPUT_KEY!r}, got {sorted(request.inputs)}")]
            )
        unknown = [o for o in request.output_filter if o not in OUTPUTS]
        if unknown:
            raise InvalidArgument(
                [FieldViolation("output_filter", f"unknown outputs {unknown}; this signature has {list(OUTPUTS)}")]
            )
        images = image_tensor(request.inputs[INPUT_KEY], INPUT_KEY, gateway.limits)
        wanted = list(request.output_filter) or list(OUTPUTS)
        needs_probs = "probabilities" in wanted  # else the backend may give its top-k outputs alone
        scores = await gateway.predict_bitmaps(images, version, _deadline(context), None if needs_probs else TOP_K)
        resp = tfs.PredictResponse()
        resp.model_spec.name = gateway.model.name
        resp.model_spec.version.value = version
        resp.model_spec.signature_name = SIGNATURE
        # rank only when a top_k output is wanted (TF Serving clients usually filter to probabilities)
        top: TopK | None = None
        if isinstance(scores, TopK):
            top = scores
        elif any(name != "probabilities" for name in wanted):
            top = TopK.of(scores, TOP_K)
        for name in wanted:
            if name == "probabilities":
                value: np.ndarray = scores  # type: ignore[assignment]  # asked for: never a TopK
            else:
                assert top is not None
                if name == "top_k_scores":
                    value = top.scores[:, :TOP_K]
                elif name == "top_k_indices":
                    value = top.indices[:, :TOP_K].astype(np.int32, copy=False)
                else:
                    value = np.asarray(gateway.model.labels, dtype=object)[top.indices[:, :TOP_K]]
            resp.outputs[name].CopyFrom(from_numpy(value))
        return resp

    @_unary("GetModelMetadata")
    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The ``signature_def`` metadata, as TF Serving gives it."""
        surface = self._surface
        version = surface.version(request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            raise InvalidArgument(
                [FieldViolation("metadata_field",
                                f"only 'signature_def' is available, got {list(request.metadata_field)}")]
            )
        classes = len(surface.gateway.model.labels)
        resp = tfs.GetModelMetadataResponse()
        resp.model_spec.name = surface.gateway.model.name
        resp.model_spec.version.value = version
        resp.model_spec.signature_name = SIGNATURE
        resp.metadata["signature_def"].Pack(signature_def_map(classes))  # type_url tfs.SIGNATURE_DEF_MAP_URL
        return resp


class ModelService:
    """``tensorflow.serving.ModelService``: GetModelStatus (HandleReloadConfigRequest is not offered)."""

    def __init__(self, surface: _Surface) -> None:
        self._surface = surface
        self.metrics = surface.metrics

    @_unary("GetModelStatus")
    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every served version (or the one asked for) as AVAILABLE."""
        surface = self._surface
        model = surface.gateway.model
        asked = surface.version(request.model_spec)
        versions = [asked] if request.model_spec.HasField("version") else list(model.versions)
        resp = tfs.GetModelStatusResponse()
        for v in versions:
            s = resp.model_version_status.add(version=v, state=tfs.AVAILABLE)
            s.status.error_message = ""
        return resp


def _info(name: str, dtype: int, dims: list[int]) -> Any:
    """A ``TensorInfo`` for the signature: tensor name, dtype and shape (-1 for any size)."""
    shape = tfs.TensorShapeProto(dim=[tfs.TensorShapeProto.Dim(size=d) for d in dims])
    return tfs.TensorInfo(name=name, dtype=dtype, tensor_shape=shape)


def signature_def_map(classes: int) -> Any:
    """The exported model's ``serving_default`` signature (see trainer.export), as metadata."""
    k = min(TOP_K, classes)
    sig = tfs.SignatureDef(method_name="tensorflow/serving/predict")
    sig.inputs[INPUT_KEY].CopyFrom(_info("serving_default_image:0", tfs.DT_UINT8, [-1, 28, 28, 1]))
    for i, (name, dtype, width) in enumerate(
        [("probabilities", tfs.DT_FLOAT, classes), ("top_k_indices", tfs.DT_INT32, k),
         ("top_k_labels", tfs.DT_STRING, k), ("top_k_scores", tfs.DT_FLOAT, k)]
    ):  # fmt: skip
        sig.outputs[name].CopyFrom(_info(f"StatefulPartitionedCall:{i}", dtype, [-1, width]))
    out = tfs.SignatureDefMap()
    out.signature_def[SIGNATURE].CopyFrom(sig)
    return out


def add_to_server(server: grpc.aio.Server, metrics: Metrics, version_label: str | None = None) -> _Surface:
    """Register both services by method path; returns the surface to ``attach`` the gateway to once it is ready."""
    surface = _Surface(metrics, version_label)
    prediction = PredictionService(surface)
    handlers = {  # Predict takes bytes, so its inputs are counted on the wire before parsing (service.wire)
        "Predict": grpc.unary_unary_rpc_method_handler(
            prediction.Predict, request_deserializer=None,
            response_serializer=tfs.PredictResponse.SerializeToString,
        ),
        "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
            prediction.GetModelMetadata,
            request_deserializer=tfs.GetModelMetadataRequest.FromString,
            response_serializer=tfs.GetModelMetadataResponse.SerializeToString,
        ),
    }  # fmt: skip
    model = {  # HandleReloadConfigRequest is not offered: gRPC answers UNIMPLEMENTED
        "GetModelStatus": grpc.unary_unary_rpc_method_handler(
            ModelService(surface).GetModelStatus,
            request_deserializer=tfs.GetModelStatusRequest.FromString,
            response_serializer=tfs.GetModelStatusResponse.SerializeToString,
        ),
    }  # fmt: skip
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(PREDICTION_SERVICE, handlers),
         grpc.method_handlers_generic_handler(MODEL_SERVICE, model))
    )  # fmt: skip
    return surface
