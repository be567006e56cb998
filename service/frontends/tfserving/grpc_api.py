"""TF Serving's own gRPC API on the gateway: ``PredictionService`` (Predict, GetModelMetadata) and
``ModelService`` (GetModelStatus), for the served model, with input ``image`` uint8 [n, 28, 28, 1].

A backend team that already calls TF Serving points its client at the gateway and changes nothing else; its
calls go through the same validation, batcher, backend and metrics as ``quickdraw.v1.Classifier``, and get
the outputs of the exported signature (``doodle.contract``: ``probabilities``, ``top_k_scores``,
``top_k_indices``, ``top_k_labels``, and ``known_score`` when the served model gives it (issue 18);
``output_filter`` selects among them). GetModelMetadata answers with the backend's own ``signature_defs`` (the
served SavedModel's SignatureDefs), not a description written here.

``known_score`` is offered when the default version's signature has it (or, for a backend without
``signature_defs``, when the default version makes an out-of-class decision). An answer from a version without
it (a call pinned to an older version, or answered by one during a roll-out) leaves it out when no
``output_filter`` was sent, and is INVALID_ARGUMENT ``output tensor alias not found in signature: known_score ...``
when one named it, as TF Serving answers for such a version.

A mistake gets TF Serving's status code and message, checked in TF Serving's order; the gateway adds the same
``google.rpc.BadRequest`` field violations as its native API (details TF Serving does not send). From the
sources of TF Serving 2.21 and TensorFlow 2.21:

Predict (``tensorflow_serving/servables/tensorflow/predict_impl.cc``, then ``predict_util.cc`` ``RunPredict``):

- no ``model_spec``: INVALID_ARGUMENT ``Missing ModelSpec`` (predict_impl.cc, ``TensorflowPredictor::Predict``);
- an unknown model or version: NOT_FOUND (``ServerCore::GetServableHandle``; see :meth:`_Surface.version`);
- an unknown ``signature_name``: FAILED_PRECONDITION ``Serving signature key "<name>" not found.``
  (predict_util.cc, ``RunPredict``);
- inputs other than the one ``image``: INVALID_ARGUMENT ``input size does not match signature: 2!=1 len({...})
  != len({image}). Sent extra: {...}. Missing but required: {...}.`` (predict_util.cc,
  ``VerifyRequestInputsSize``), or for one input of another name ``Signature input alias: image(feed name:
  <tensor>) not found in request and no default value provided. ...`` (``tensorflow/cc/saved_model/util.cc``,
  ``GetInputValues``);
- an input TensorFlow cannot parse (dtype DT_INVALID or not a dtype, ``tensor_content`` of the wrong size):
  INVALID_ARGUMENT ``tensor parsing error: image`` (util.cc ``GetInputValues``, ``Tensor::FromProto``);
- ``output_filter``, in its order: INVALID_ARGUMENT ``output tensor alias not found in signature: <alias>
  Outputs expected to be in the set {...}.`` and ``duplicate output tensor alias: <alias>`` (predict_util.cc,
  ``PreProcessPrediction``);
- an input of another dtype: INVALID_ARGUMENT ``Expects arg[0] to be uint8 but float is provided``
  (``tensorflow/core/framework/function.cc``, ``FunctionCallFrame::SetArgs``, which
  ``tensorflow/core/common_runtime/direct_session.cc`` calls on the feeds of ``Session::Run``).

Beyond TF Serving (its own messages, INVALID_ARGUMENT as TF Serving's runtime gives): a shape other than
[n, 28, 28, 1] (TF Serving fails inside the model, with a message that depends on it), a batch over
``max_drawings_per_request``, and ``int_val`` values outside 0..255 or of the wrong count (which TensorFlow
truncates or broadcasts); only ``serving_default`` runs (TF Serving would run another signature of the model).

GetModelMetadata (``tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc``), in this order:

- no ``model_spec``: INVALID_ARGUMENT ``Missing ModelSpec``;
- no ``metadata_field``: INVALID_ARGUMENT ``GetModelMetadataRequest must specify at least one metadata_field``;
- a field other than ``signature_def``: INVALID_ARGUMENT ``Metadata field <field> is not supported``;
- an unknown model or version: NOT_FOUND;
- the answer: ``model_spec`` with the name and version (no signature name), and ``metadata["signature_def"]``,
  a ``SignatureDefMap`` of every signature of the SavedModel, ``__saved_model_init_op`` included.

GetModelStatus (``tensorflow_serving/model_servers/get_model_status_impl.cc``): no ``model_spec`` is
INVALID_ARGUMENT ``Missing ModelSpec``.

The messages are ``service.protos.tfs``'s (the vendored TF Serving 2.21 protos in a private descriptor pool), and the
methods are registered by path with generic handlers: serving this API loads no TensorFlow.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from doodle.contract import (
    INPUT_DTYPE,
    INPUT_KEY,
    KNOWN_SCORE,
    OUTPUT_KEY,
    OUTPUTS,
    SIGNATURE_NAME,
    TOP_K,
    TOP_K_INDICES,
    TOP_K_SCORES,
)
from service.backends import Backend, TopK
from service.core.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from service.core.metrics import Metrics
from service.dataplane.pipeline import Call, Converted, DataPlane, DataPlaneSlot, Result
from service.frontends.grpc.calls import deadline, parse_message, unary
from service.preprocess import wire
from service.preprocess.validation import image_tensor
from service.protos import tfs
from service.protos.tensors import from_numpy

PREDICTION_SERVICE = tfs.PREDICTION_SERVICE
MODEL_SERVICE = tfs.MODEL_SERVICE
#: The one ``metadata_field`` TF Serving knows (``GetModelMetadataImpl::kSignatureDef``).
SIGNATURE_DEF = "signature_def"
#: The input's dtype as ``tensorflow.DataType``.
INPUT_DATA_TYPE: int = tfs.DataType.Value(f"DT_{INPUT_DTYPE.upper()}")
#: ``DataType`` values from here on are reference types (``DT_FLOAT_REF`` ...), which ``Tensor::FromProto`` refuses.
_REF_TYPES_FROM = 100


class FailedPrecondition(InvalidArgument):
    """A request TF Serving answers with FAILED_PRECONDITION (an unknown signature). It carries field violations
    as InvalidArgument does, so the answer has the same ``BadRequest`` details; the message is given."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def _keys(names: Any) -> str:
    """Names as TF Serving joins a ``std::set`` of map keys: sorted, comma-separated, no spaces."""
    return ",".join(sorted(names))


def _dtype_string(dtype: int) -> str:
    """TensorFlow's ``DataTypeString``: ``DT_FLOAT`` is ``float``, ``DT_UINT8`` ``uint8``."""
    return tfs.DataType.Name(dtype).removeprefix("DT_").lower()


def _parses(dtype: int) -> bool:
    """Whether ``Tensor::FromProto`` takes a tensor of this dtype at all (not DT_INVALID, a reference type or a
    number that is no ``DataType``)."""
    return dtype != tfs.DT_INVALID and dtype < _REF_TYPES_FROM and dtype in tfs.DataType.values()


class _Surface(DataPlaneSlot):
    """Shared by both servicers: the gateway and its backend (once ready), metrics, and model_spec checks."""

    #: The backend the gateway runs, for what only it knows (its ``signature_defs``).
    backend: Any = None

    def __init__(self, metrics: Metrics, version_label: str | None = None) -> None:
        self.metrics = metrics
        self.version_label = version_label

    def attach(self, plane: DataPlane, backend: Backend | None = None) -> None:
        """Start serving through a ready data plane, whose backend is ``backend``."""
        self.backend = backend
        super().attach(plane)

    def signature_defs(self) -> Any:
        """The backend's ``signature_defs`` (a ``service.protos.tfs.SignatureDefMap``), or None when it has none."""
        return None if self.backend is None else self.backend.signature_defs

    def version(self, spec: Any) -> int:
        """The version a ``ModelSpec`` names (its number, or the default): what GetModelMetadata and GetModelStatus
        describe."""
        asked = self.asked_version(spec)
        return self.plane.resolve(asked if asked is not None else self.plane.model.default_version,
                                  self.unknown_version)  # fmt: skip

    def asked_version(self, spec: Any) -> int | None:
        """The version a ``ModelSpec`` asks for: its number, or None for the default, which the pipeline resolves
        (``ANY_VERSION`` when the backend picks versions itself: TF Serving's replicas each answer with their own
        default or label, and the answer names the version). The gateway's ``tfserving_version_label`` is the
        default; any other label is INVALID_ARGUMENT, another model NOT_FOUND, as TF Serving says them."""
        model = self.plane.model
        if spec.name != model.name:
            raise NotFound(f"Servable not found for request: model {spec.name!r} (this gateway serves {model.name!r})")
        if spec.WhichOneof("version_choice") == "version_label":
            if self.version_label is not None and spec.version_label == self.version_label:
                return None  # the version TF Serving's label points at (tfserving_version_label)
            known = f"the only label here is {self.version_label!r}" if self.version_label else "no labels here"
            raise InvalidArgument(
                [FieldViolation("model_spec.version_label",
                                f"unknown version label {spec.version_label!r} ({known}); ask for a version number "
                                f"({', '.join(map(str, model.versions))}) or none for the default")]
            )  # fmt: skip
        return spec.version.value if spec.HasField("version") else None

    def unknown_version(self, v: int) -> NotFound:
        """The NOT_FOUND for a version that is not served, in TF Serving's words."""
        model = self.plane.model
        return NotFound(f"Servable not found for request: Specific({model.name}, {v}); versions: "
                        f"{', '.join(map(str, model.versions))}")  # fmt: skip


def count_parsed(request: Any) -> None:
    """``wire.check_predict``'s counts, with its errors, on a PredictRequest parsed before it was counted (at most
    ``wire.PARSE_FIRST_BYTES``: its parse was bounded by its size)."""
    if len(request.inputs) > wire.MAX_PREDICT_INPUTS:
        raise wire.too_many("inputs", "entries", wire.MAX_PREDICT_INPUTS)
    if len(request.output_filter) > wire.MAX_OUTPUT_FILTER:
        raise wire.too_many("output_filter", "names", wire.MAX_OUTPUT_FILTER)
    for tensor in request.inputs.values():
        if len(tensor.tensor_shape.dim) > wire.MAX_TENSOR_DIMS:
            raise wire.too_many("inputs.tensor_shape.dim", "dimensions", wire.MAX_TENSOR_DIMS)


def _require_model_spec(request: Any) -> None:
    """TF Serving's first check of Predict, GetModelMetadata and GetModelStatus."""
    if not request.HasField("model_spec"):
        raise InvalidArgument([FieldViolation("model_spec", "required")], "Missing ModelSpec")


class PredictionService:
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata."""

    def __init__(self, surface: _Surface) -> None:
        self._surface = surface
        self.metrics = surface.metrics

    @unary("Predict")
    async def Predict(self, request: bytes, context: grpc.aio.ServicerContext) -> Any:
        """Run ``serving_default`` on the images: one pipeline call (``request`` as bytes: counted on the wire
        first when over ``wire.PARSE_FIRST_BYTES``, after parsing otherwise)."""
        result = await self._surface.plane.infer(Call(request, self._convert, 1, len(request), deadline(context),
                                                      transport_deadline=True,  # gRPC cancels it at its deadline
                                                      metadata=context.invocation_metadata))  # fmt: skip
        return self._response(result)

    def _convert(self, raw: bytes) -> Converted:
        """A PredictRequest checked as TF Serving checks it, in the pipeline's terms."""
        small = len(raw) <= wire.PARSE_FIRST_BYTES  # parsed first (its parse bounded by its size), then counted
        if not small:
            wire.check_predict(raw)
        request = parse_message(tfs.PredictRequest, raw)
        if small:
            count_parsed(request)
        _require_model_spec(request)
        surface = self._surface
        plane = surface.plane
        asked = surface.asked_version(request.model_spec)
        signature = self._signature(request.model_spec.signature_name)
        outputs = [o for o in OUTPUTS if signature is None or o in signature.outputs]
        has_known = KNOWN_SCORE in signature.outputs if signature is not None else plane.model.ood is not None
        if has_known:
            outputs.append(KNOWN_SCORE)
        self._check_inputs(request, signature)
        filtered = self._output_filter(request, outputs)
        wanted = filtered or outputs
        self._check_dtype(request)
        tensor = request.inputs[INPUT_KEY]
        try:
            images = image_tensor(tensor, INPUT_KEY, plane.limits)
        except InvalidArgument as exc:
            if any(v.field.startswith(f"inputs[{INPUT_KEY}].tensor_content") for v in exc.violations):
                raise InvalidArgument(exc.violations, f"tensor parsing error: {INPUT_KEY}") from None
            raise
        needs_probs = OUTPUT_KEY in wanted  # else the backend may give its top-k outputs alone
        labels = plane.model.labels
        per_drawing = len(labels) * 4 + TOP_K * (8 + plane.model.label_chars + 4) + 4
        return Converted(images, asked, None if needs_probs else TOP_K, len(images) * per_drawing,
                         surface.unknown_version, (filtered, outputs, wanted))  # fmt: skip

    def _response(self, result: Result) -> Any:
        """The pipeline's result as TF Serving's PredictResponse."""
        plane = self._surface.plane
        filtered, outputs, wanted = result.converted.extra
        answered = result.answered
        scores = answered.scores
        if KNOWN_SCORE in wanted and answered.known is None:
            if filtered:  # the version that answered has no such output: TF Serving's answer for it
                raise InvalidArgument(
                    [FieldViolation("output_filter", f"version {answered.version} gives no {KNOWN_SCORE!r}")],
                    f"output tensor alias not found in signature: {KNOWN_SCORE} Outputs expected to be in the set "
                    f"{{{_keys(o for o in outputs if o != KNOWN_SCORE)}}}.",
                )
            wanted = [o for o in wanted if o != KNOWN_SCORE]
        resp = tfs.PredictResponse()
        resp.model_spec.name = plane.model.name
        resp.model_spec.version.value = answered.version
        resp.model_spec.signature_name = SIGNATURE_NAME
        # rank only when a top_k output is wanted (TF Serving clients usually filter to probabilities)
        top: TopK | None = None
        if isinstance(scores, TopK):
            top = scores
        elif any(name not in (OUTPUT_KEY, KNOWN_SCORE) for name in wanted):
            top = TopK.of(scores, TOP_K)
        for name in wanted:
            if name == OUTPUT_KEY:
                value: np.ndarray = scores  # type: ignore[assignment]  # asked for: never a TopK
            elif name == KNOWN_SCORE:
                assert answered.known is not None
                value = answered.known
            else:
                assert top is not None
                if name == TOP_K_SCORES:
                    value = top.scores[:, :TOP_K]
                elif name == TOP_K_INDICES:
                    value = top.indices[:, :TOP_K].astype(np.int32, copy=False)
                else:
                    value = np.asarray(plane.model.labels, dtype=object)[top.indices[:, :TOP_K]]
            resp.outputs[name].CopyFrom(from_numpy(value))
        return resp

    def _signature(self, name: str) -> Any:
        """The served signature's ``SignatureDef`` (None if the backend has no signature_defs); FAILED_PRECONDITION
        for any other signature name, as predict_util.cc's ``RunPredict``."""
        if name not in ("", SIGNATURE_NAME):
            raise FailedPrecondition(
                [FieldViolation("model_spec.signature_name", f"this gateway serves the signature {SIGNATURE_NAME!r}")],
                f'Serving signature key "{name}" not found.',
            )
        defs = self._surface.signature_defs()
        if defs is None or SIGNATURE_NAME not in defs.signature_def:
            return None
        return defs.signature_def[SIGNATURE_NAME]

    @staticmethod
    def _check_inputs(request: Any, signature: Any) -> None:
        """Exactly the one input, of a dtype TensorFlow can parse: TF Serving's checks and messages, in its order
        (predict_util.cc ``VerifyRequestInputsSize``, then util.cc ``GetInputValues``)."""
        sent = set(request.inputs)
        if sent != {INPUT_KEY}:
            if len(sent) != 1:
                message = (
                    f"input size does not match signature: {len(sent)}!=1 len({{{_keys(sent)}}}) != "
                    f"len({{{INPUT_KEY}}}). Sent extra: {{{_keys(sent - {INPUT_KEY})}}}. "
                    f"Missing but required: {{{_keys({INPUT_KEY} - sent)}}}."
                )
            else:
                if signature is not None and INPUT_KEY in signature.inputs:
                    feed = signature.inputs[INPUT_KEY].name
                else:  # how TensorFlow names a SavedModel signature's input tensor
                    feed = f"{SIGNATURE_NAME}_{INPUT_KEY}:0"
                message = (
                    f"Signature input alias: {INPUT_KEY}(feed name: {feed}) not found in request and no default "
                    f"value provided. Inputs expected to be in the request {{{_keys(sent)}}}, or default input "
                    "alias set: "
                )
            raise InvalidArgument(
                [FieldViolation("inputs", f"expected exactly one input {INPUT_KEY!r}, got {sorted(sent)}")], message
            )
        dtype = request.inputs[INPUT_KEY].dtype
        if not _parses(dtype):
            name = tfs.DataType.Name(dtype) if dtype in tfs.DataType.values() else str(dtype)
            want = tfs.DataType.Name(INPUT_DATA_TYPE)
            raise InvalidArgument(
                [FieldViolation(f"inputs[{INPUT_KEY}].dtype", f"expected {want}, got {name}")],
                f"tensor parsing error: {INPUT_KEY}",
            )

    @staticmethod
    def _output_filter(request: Any, outputs: list[str]) -> list[str]:
        """``output_filter`` checked as predict_util.cc's ``PreProcessPrediction`` does, name by name in order."""
        seen: list[str] = []
        for alias in request.output_filter:
            if alias not in outputs:
                raise InvalidArgument(
                    [FieldViolation("output_filter", f"unknown output {alias!r}; this signature has {outputs}")],
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                    f"{{{_keys(outputs)}}}.",
                )
            if alias in seen:
                raise InvalidArgument(
                    [FieldViolation("output_filter", f"{alias!r} is asked for twice")],
                    f"duplicate output tensor alias: {alias}",
                )
            seen.append(alias)
        return seen

    @staticmethod
    def _check_dtype(request: Any) -> None:
        """The input's dtype, as ``Session::Run`` checks its feeds (TF Serving finds it after the outputs)."""
        dtype = request.inputs[INPUT_KEY].dtype
        if dtype != INPUT_DATA_TYPE:
            raise InvalidArgument(
                [FieldViolation(f"inputs[{INPUT_KEY}].dtype",
                                f"expected {tfs.DataType.Name(INPUT_DATA_TYPE)}, got {tfs.DataType.Name(dtype)}")],
                f"Expects arg[0] to be {_dtype_string(INPUT_DATA_TYPE)} but {_dtype_string(dtype)} is provided",
            )  # fmt: skip

    @unary("GetModelMetadata")
    async def GetModelMetadata(self, request: bytes, context: grpc.aio.ServicerContext) -> Any:
        """The ``signature_def`` metadata, as TF Serving gives it: the backend's own SignatureDefs (``request`` as
        bytes: its names counted on the wire before parsing)."""
        wire.check_metadata_request(request)
        request = parse_message(tfs.GetModelMetadataRequest, request)
        _require_model_spec(request)
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument(
                [FieldViolation("metadata_field", f"required; the one field available is {SIGNATURE_DEF!r}")],
                "GetModelMetadataRequest must specify at least one metadata_field",
            )
        for field in fields:
            if field != SIGNATURE_DEF:
                raise InvalidArgument(
                    [FieldViolation("metadata_field", f"only {SIGNATURE_DEF!r} is available, got {fields}")],
                    f"Metadata field {field} is not supported",
                )
        surface = self._surface
        version = surface.version(request.model_spec)
        defs = surface.signature_defs()
        if defs is None:
            raise Unavailable("the model's SignatureDefs are not known yet; retry shortly")
        resp = tfs.GetModelMetadataResponse()
        resp.model_spec.name = surface.plane.model.name
        resp.model_spec.version.value = version
        resp.metadata[SIGNATURE_DEF].Pack(defs)  # type_url tfs.SIGNATURE_DEF_MAP_URL
        return resp


class ModelService:
    """``tensorflow.serving.ModelService``: GetModelStatus (HandleReloadConfigRequest is not offered)."""

    def __init__(self, surface: _Surface) -> None:
        self._surface = surface
        self.metrics = surface.metrics

    @unary("GetModelStatus")
    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every served version (or the one asked for) as AVAILABLE."""
        _require_model_spec(request)
        surface = self._surface
        model = surface.plane.model
        asked = surface.version(request.model_spec)
        versions = [asked] if request.model_spec.HasField("version") else list(model.versions)
        resp = tfs.GetModelStatusResponse()
        for v in versions:
            s = resp.model_version_status.add(version=v, state=tfs.AVAILABLE)
            s.status.error_message = ""
        return resp


def add_to_server(server: grpc.aio.Server, metrics: Metrics, version_label: str | None = None) -> _Surface:
    """Register both services by method path; returns the surface to ``attach`` the gateway to once it is ready."""
    surface = _Surface(metrics, version_label)
    prediction = PredictionService(surface)
    handlers = {  # Predict takes bytes, so its inputs are counted on the wire before parsing (service.preprocess.wire)
        "Predict": grpc.unary_unary_rpc_method_handler(
            prediction.Predict, request_deserializer=None,
            response_serializer=tfs.PredictResponse.SerializeToString,
        ),
        "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
            prediction.GetModelMetadata, request_deserializer=None,
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
