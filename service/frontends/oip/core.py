"""The served model under the Open Inference Protocol (KServe v2), shared by the gRPC and the HTTP side.

The model, as ModelMetadata describes it (``model_name`` the served model's, versions as decimal strings):

- inputs, exactly one of them per request (Triton's optional inputs), each with the batch first:
  ``image`` UINT8 [-1, 28, 28, 1] (bitmaps, as the model takes them, in ``raw_input_contents`` or typed
  ``uint_contents``); ``encoded_image`` BYTES [-1] (one PNG or JPEG file per element, decoded as
  ``quickdraw.v1`` decodes ``Drawing.image``); ``strokes`` BYTES [-1] (one ``quickdraw.v1.Strokes`` per element
  in the proto3 JSON mapping, ``{"strokes": [{"x": [...], "y": [...]}], "coordinates": "RAW"}``, rendered as
  ``Drawing.strokes`` is);
- outputs: ``probabilities`` FP32 [-1, C], and ``known_score`` FP32 [-1] when the model makes the out-of-class
  decision (issue 18). With no output named, all of them. Triton's classification extension: an output
  ``probabilities`` requested with the parameter ``classification`` = k is BYTES [-1, k], each element
  ``"score:index:label"``, best first (the score as C++'s ``std::to_string`` writes it, as Triton does).

Every call is one data-plane call (``service.dataplane.pipeline``): :meth:`Surface.convert` is this protocol's
converter (Triton's checks; encoded images and strokes validated as Classify validates them), and the pipeline
admits, decodes, renders, resolves the version, batches and runs it as it does for every door. ``model_version``
"" is the backend's choice (``ANY_VERSION`` when the gateway is versionless, as Classify), and the answer names the
version that answered.

Errors: the codes and messages Triton's core gives (``src/infer_request.cc``, ``src/model.cc``,
``src/model_repository_manager/``; Triton 2.x at ``73aad7c3``), with the gateway's ``BadRequest`` field
violations as details:

- unknown model: NOT_FOUND ``Request for unknown model: 'x' is not found``; unknown version: NOT_FOUND
  ``Request for unknown model: 'quickdraw' version 7 is not found``; a version that is no integer:
  INVALID_ARGUMENT (Triton's gRPC front end);
- an input name the model does not have: INVALID_ARGUMENT ``[request id: <id>] unexpected inference input 'x'
  for model 'quickdraw'``; none or more than one of the three: ``expected 1 inputs but got N inputs ...``;
- another datatype: INVALID_ARGUMENT ``[request id: <id>] inference input 'image' data-type is 'FP32', but model
  'quickdraw' expects 'UINT8'``;
- a batch over ``max_drawings_per_request``: INVALID_ARGUMENT ``[request id: <id>] inference request batch-size
  must be <= 256 for 'quickdraw'``;
- another shape: INVALID_ARGUMENT ``[request id: <id>] unexpected shape for input 'image' for model 'quickdraw'.
  Expected [-1,28,28,1], got [...]. ...``; data of another size: ``input byte size mismatch ...``;
- an image that does not decode, strokes that break a limit: INVALID_ARGUMENT with the gateway's own message;
- an unknown output: INVALID_ARGUMENT ``unexpected inference output 'x' for model 'quickdraw'``; one asked for
  twice: INVALID_ARGUMENT ``output 'x' already exists in request`` (so an answer holds each output once).

Triton's model configuration and statistics extensions (what perf_analyzer and Model Analyzer ask first):
:meth:`Surface.model_config` describes the model as a Triton ``ModelConfig`` (dims without the batch dimension,
``max_batch_size`` the gateway's ``max_drawings_per_request``, ``encoded_image`` and ``strokes`` optional, so
tools send ``image``), and :meth:`Surface.model_statistics` reports what this surface did, per version, from
every ModelInfer/ModelStreamInfer and HTTP infer call (:class:`Statistics`): ``inference_count`` drawings
answered, ``execution_count`` calls answered, success and fail counts with their total nanoseconds, and the
three phases of a successful call: ``compute_input`` (checks, decoding, rendering), ``compute_infer`` (the
gateway's batcher queue and the backend: not separable per call, so ``queue`` stays 0) and ``compute_output``.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
from google.protobuf import json_format
from numpy.typing import NDArray

from doodle import BITMAP_SIDE
from doodle.contract import KNOWN_SCORE, LABELS_PATH, OUTPUT_KEY
from quickdraw_client.v1 import classifier_pb2 as pb
from service.backends import ANY_VERSION, Answered, ModelDescription, TopK
from service.core.errors import FieldViolation, InvalidArgument, NotFound
from service.core.metrics import Metrics
from service.core.versions import parse_version
from service.dataplane.pipeline import Call, Converted, DataPlaneSlot
from service.frontends.oip.statistics import Statistics
from service.preprocess.validation import validate

#: The inputs: bitmaps as the model takes them, and this service's other forms.
IMAGE = "image"
ENCODED_IMAGE = "encoded_image"
STROKES = "strokes"
INPUTS: dict[str, tuple[str, list[int]]] = {
    IMAGE: ("UINT8", [-1, BITMAP_SIDE, BITMAP_SIDE, 1]),
    ENCODED_IMAGE: ("BYTES", [-1]),
    STROKES: ("BYTES", [-1]),
}
PROBABILITIES = OUTPUT_KEY
#: Triton's classification extension: the output parameter, and the extensions ServerMetadata lists.
CLASSIFICATION = "classification"
EXTENSIONS = ("classification", "binary_tensor_data")
PLATFORM = "tensorflow_savedmodel"
SERVER_NAME = "quickdraw"
#: Datatypes and their numpy types (the protocol's table), for the messages about what was sent.
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}  # fmt: skip


#: A strokes element's objects beyond one per stroke (the element itself), and numbers per point (x, y and t).
_STROKES_SLACK = 8
_NUMBERS_PER_POINT = 3

#: The protocol's datatypes as Triton's model configuration names them.
CONFIG_TYPES = {"UINT8": "TYPE_UINT8", "BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


def server_version() -> str:
    """This package's version (ServerMetadata's ``version``)."""
    try:
        return metadata.version("quickdraw-service")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass(slots=True)
class InputTensor:
    """One input as either side received it: raw little-endian bytes, or typed values (a list or array)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | memoryview | None = None
    values: Any = None  # uint contents (ints) or bytes contents (bytes)


@dataclass(slots=True)
class OutputRequest:
    """One requested output: its name and, for the classification extension, how many classes (0: the tensor)."""

    name: str
    classification: int = 0
    binary: bool | None = None  # HTTP only: the output's ``binary_data`` parameter


@dataclass(slots=True)
class InferCall:
    """A ModelInfer request, whichever side received it."""

    model_name: str
    model_version: str
    id: str
    inputs: list[InputTensor]
    outputs: list[OutputRequest] | None  # None: every output
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class OutputTensor:
    """One output of the answer: FP32 values, or BYTES elements."""

    name: str
    datatype: str
    array: NDArray[Any]

    @property
    def shape(self) -> list[int]:
        """The tensor's shape."""
        return list(self.array.shape)

    def raw(self) -> bytes:
        """The tensor's bytes as the protocol lays them out (BYTES: each element after its 4-byte length)."""
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(b)) + b for b in self.array.reshape(-1).tolist())
        return np.ascontiguousarray(self.array, dtype="<f4").tobytes()


@dataclass(slots=True)
class InferAnswer:
    """A ModelInfer answer."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


def split_bytes(raw: bytes | memoryview, field_name: str) -> list[bytes]:
    """BYTES raw data (each element a 4-byte little-endian length, then its bytes) as a list of elements."""
    out: list[bytes] = []
    view = memoryview(raw)
    i = 0
    while i < len(view):
        if i + 4 > len(view):
            raise InvalidArgument([FieldViolation(field_name, f"BYTES data ends inside an element's length at {i}")])
        (n,) = struct.unpack_from("<I", view, i)
        i += 4
        if i + n > len(view):
            raise InvalidArgument([FieldViolation(field_name, f"BYTES element {len(out)} of {n} bytes runs past "
                                                              f"the end of the data ({len(view)} bytes)")])  # fmt: skip
        out.append(bytes(view[i : i + n]))
        i += n
    return out


def _dims(shape: Sequence[int]) -> str:
    """A shape as Triton writes it: ``[-1,28,28,1]``."""
    return "[" + ",".join(str(d) for d in shape) + "]"


class Surface(DataPlaneSlot):
    """What the gRPC and HTTP sides share: the gateway once ready, metrics, readiness, and the protocol's logic."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        #: What the inference calls through this surface did, per version (ModelStatistics).
        self.statistics = Statistics()
        #: Whether the gateway serves now (set by the composition root: the model's versions and the backend).
        self.is_ready: Callable[[], bool] = lambda: self._plane is not None
        #: :meth:`convert_image`'s outputs and answer bytes per drawing, by the names asked for (only names among
        #: those offered: a handful of entries), for the model in ``_plain_for``.
        self._plain: dict[tuple[str, ...], tuple[list[OutputRequest], int]] = {}
        self._plain_for: object = None
        self._unknown: tuple[str, Callable[[int], NotFound]] | None = None

    # --- health and metadata -----------------------------------------------------------------------------------

    def ready(self) -> bool:
        """ServerReady: the model is loaded and the backend serves."""
        return self._plane is not None and self.is_ready()

    def model_ready(self, name: str, version: str) -> bool:
        """ModelReady: ready, and the model (and version, if any) is served; an unknown one is not ready."""
        if not self.ready():
            return False
        try:
            self.version(name, version)
        except (NotFound, InvalidArgument):
            return False
        return True

    def server_metadata(self) -> dict[str, Any]:
        """ServerMetadata: name, version, extensions."""
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        """ModelMetadata: the inputs and outputs above, and what they mean in ``properties``."""
        self.version(name, version)
        plane = self.plane
        model = plane.model
        outputs = [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(model.labels)]}]
        if model.ood is not None:
            outputs.append({"name": KNOWN_SCORE, "datatype": "FP32", "shape": [-1]})
        lim = plane.limits
        return {
            "name": model.name,
            "versions": [str(v) for v in model.versions],
            "platform": PLATFORM,
            "inputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in INPUTS.items()],
            "outputs": outputs,
            "properties": {
                "inputs": f"exactly one of {', '.join(INPUTS)} per request, the batch first",
                IMAGE: "28x28 grayscale bitmaps as the model takes them (Quick, Draw! numpy_bitmap), row-major",
                ENCODED_IMAGE: "one PNG or JPEG file per element (any size; decoded and reduced to 28x28)",
                STROKES: 'one quickdraw.v1.Strokes per element in the proto3 JSON mapping: {"strokes": [{"x": [..], '
                         '"y": [..]}], "coordinates": "RAW" or "SIMPLIFIED"}',
                CLASSIFICATION: "Triton's classification extension: request output 'probabilities' with the "
                                "parameter classification=k for BYTES 'score:index:label', best first",
                "max_batch_size": str(lim.max_drawings_per_request),
                "default_version": str(model.default_version),
            },
        }  # fmt: skip

    # --- Triton's model configuration and statistics extensions -------------------------------------------------

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        """ModelConfig: the model as Triton's model configuration (JSON; the gRPC side parses it into its message).
        Dims leave out the batch dimension, as with ``max_batch_size`` > 0 in Triton."""
        self.version(name, version)
        plane = self.plane
        model = plane.model
        inputs = [{"name": n, "data_type": CONFIG_TYPES[d], "format": "FORMAT_NONE", "dims": dims[1:] or [1],
                   "optional": n != IMAGE} for n, (d, dims) in INPUTS.items()]  # fmt: skip
        outputs = [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [len(model.labels)],
                    "label_filename": LABELS_PATH.name}]  # fmt: skip
        if model.ood is not None:
            outputs.append({"name": KNOWN_SCORE, "data_type": "TYPE_FP32", "dims": [1]})
        return {
            "name": model.name,
            "platform": PLATFORM,
            "backend": "tensorflow",
            "version_policy": {"specific": {"versions": list(model.versions)}},
            "max_batch_size": plane.limits.max_drawings_per_request,
            "input": inputs,
            "output": outputs,
            "dynamic_batching": {},  # the gateway's batcher merges calls into backend batches
            "parameters": {"default_version": {"string_value": str(model.default_version)},
                           "inputs": {"string_value": f"exactly one of {', '.join(INPUTS)} per request"}},
        }  # fmt: skip

    def model_statistics(self, name: str, version: str) -> list[dict[str, Any]]:
        """ModelStatistics: every served version's (or the one named), of this model (or, with no name, of every
        model: this one)."""
        model = self.plane.model
        if name == "" and version == "":
            versions = list(model.versions)
        else:
            v = self.version(name, version)
            versions = list(model.versions) if version == "" or v == ANY_VERSION else [v]
        return [self.statistics.of(v).as_dict(model.name, str(v)) for v in versions]

    # --- versions ----------------------------------------------------------------------------------------------

    def version(self, name: str, version: str) -> int:
        """The version a call names: its number, or "" for the backend's choice; NOT_FOUND as Triton says it."""
        return self.plane.resolve(self.asked_version(name, version), self.unknown_version(name))

    def asked_version(self, name: str, version: str) -> int | None:
        """The version a call names (None: "", the default), parsed by the one version parser; NOT_FOUND for
        another model and INVALID_ARGUMENT for a version that is no number, as Triton says them."""
        model = self.plane.model
        if name != model.name:
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        if version == "":
            return None
        v = parse_version(version)
        if v is None:
            raise InvalidArgument(
                [FieldViolation("model_version", f"is {version!r}; expected a version number "
                                                 f"({', '.join(map(str, model.versions))}) or none")],
                f"failed to get model version from specified version string '{version}', version should be an "
                "integral value > 0",
            )  # fmt: skip
        return v

    @staticmethod
    def unknown_version(name: str) -> Callable[[int], NotFound]:
        """The NOT_FOUND for a version of ``name`` that is not served, in Triton's words."""
        return lambda v: NotFound(f"Request for unknown model: '{name}' version {v} is not found")

    # --- inference ---------------------------------------------------------------------------------------------

    def call(self, request: Any, convert: Callable[[Any], InferCall], size_bytes: int, deadline_s: float | None,
             **kw: Any) -> Call[Any]:  # fmt: skip
        """A door's request as one pipeline call: ``convert`` turns it into an ``InferCall`` (each side parses its
        own form), then :meth:`convert` checks it as Triton does."""
        return Call(request, lambda r: self.convert(convert(r)), 1, size_bytes, deadline_s, **kw)

    async def infer(self, call: Call[Any]) -> InferAnswer:
        """Run a call through the data plane and build its outputs; counted in the statistics per version (an
        unknown model or version counts nowhere)."""
        started = time.perf_counter_ns()
        plane = self.plane
        try:
            result = await plane.infer(call)
        except NotFound:
            raise
        except InvalidArgument as exc:
            self.statistics.failed(plane.model.default_version, time.perf_counter_ns() - started)
            raise _renamed(exc) from None
        except BaseException:
            self.statistics.failed(plane.model.default_version, time.perf_counter_ns() - started)
            raise
        request_id, outputs, n = result.converted.extra
        answered = result.answered
        answer = InferAnswer(plane.model.name, str(answered.version), request_id,
                             self._build(outputs, answered, request_id, plane.model.name))  # fmt: skip
        done = time.perf_counter_ns()
        self.statistics.succeeded(answered.version, n, done - started, result.infer_started_ns - started,
                                  result.infer_done_ns - result.infer_started_ns, done - result.infer_done_ns)
        return answer

    def convert(self, call: InferCall) -> Converted:
        """An ``InferCall`` checked as Triton checks it, in the pipeline's terms (pure: runs on a thread for a
        large request)."""
        plane = self.plane
        asked = self.asked_version(call.model_name, call.model_version)
        prefix = _prefix(call.id)
        name = plane.model.name
        outputs = self._outputs(call, prefix, name)
        tensor = self._input(call, prefix, name)
        datatype, dims = INPUTS[tensor.name]
        if tensor.datatype != datatype:
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].datatype", f"expected {datatype}, got {tensor.datatype!r}")],
                f"{prefix}inference input '{tensor.name}' data-type is '{tensor.datatype}', but model '{name}' "
                f"expects '{datatype}'",
            )
        shape = list(tensor.shape)
        limit = plane.limits.max_drawings_per_request
        if not shape:
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].shape", "is empty; the batch comes first")],
                f"{prefix}input '{tensor.name}' has no shape but model requires batch dimension for '{name}'",
            )
        if shape[0] > limit:
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].shape[0]",
                                f"batch of {shape[0]}; must be 1..{limit} (max_drawings_per_request)")],
                f"{prefix}inference request batch-size must be <= {limit} for '{name}'",
            )  # fmt: skip
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape, strict=True)):
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].shape", f"expected {_dims(dims)}, got {_dims(shape)}")],
                f"{prefix}unexpected shape for input '{tensor.name}' for model '{name}'. Expected {_dims(dims)}, "
                f"got {_dims(shape)}. ",
            )
        if shape[0] < 1:
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].shape[0]", f"batch of {shape[0]}; must be 1..{limit}")],
                f"{prefix}inference request batch-size must be >= 1 for '{name}'",
            )
        n = shape[0]
        top_k = 0  # the widest classification asked for, and whether the probabilities tensor is asked for too
        wants_tensor = False
        for o in outputs:
            top_k = max(top_k, o.classification)
            wants_tensor = wants_tensor or (o.name == PROBABILITIES and not o.classification)
        backend_k = None if wants_tensor or not top_k else top_k
        drawings: Any
        if tensor.name == IMAGE:
            drawings = self._bitmaps(tensor, n, prefix, name)
        else:
            drawings = validate(self._drawings(tensor, n), plane.limits)
        return Converted(drawings, asked, backend_k, self._answer_bytes(outputs, n), self._unknown_version(name),
                         (call.id, outputs, n))  # fmt: skip

    def convert_image(self, model_name: str, model_version: str, request_id: str, pixels: bytes,
                      shape: Sequence[int], output_names: Sequence[str]) -> Converted | None:  # fmt: skip
        """:meth:`convert` for the commonest call without building an ``InferCall`` first (as
        ``validation.bitmaps_only`` is for Classify): ``image`` UINT8 [n, 28, 28, 1] as ``pixels``, n within the
        limit and ``pixels`` of its size, and the outputs (none: all) named once each among those offered, the
        door having seen that nothing else is set (no parameters, no typed contents). None for any other call,
        which :meth:`convert` then checks and words the errors of; what this accepts, convert accepts the same,
        and converts the same."""
        plane = self.plane
        if (len(shape) != 4 or shape[1] != BITMAP_SIDE or shape[2] != BITMAP_SIDE or shape[3] != 1
                or not 0 < shape[0] <= plane.limits.max_drawings_per_request
                or len(pixels) != shape[0] * BITMAP_SIDE * BITMAP_SIDE):  # fmt: skip
            return None
        model = plane.model
        if model is not self._plain_for:
            self._plain, self._plain_for = {}, model
        names = tuple(output_names)
        plain = self._plain.get(names)
        if plain is None:
            offered = _offered(model)
            if not names:
                names = offered
            elif len(names) > len(offered) or len(set(names)) != len(names) or any(o not in offered for o in names):
                return None  # convert words the error
            outputs = [OutputRequest(o) for o in names]
            plain = self._plain[tuple(output_names)] = (outputs, self._answer_bytes(outputs, 1))
        outputs, per_drawing = plain  # shared by calls: read, never changed
        n = shape[0]
        images = np.frombuffer(pixels, np.uint8).reshape(n, BITMAP_SIDE, BITMAP_SIDE, 1)
        return Converted(images, self.asked_version(model_name, model_version), None, per_drawing * n,
                         self._unknown_version(model.name), (request_id, outputs, n))  # fmt: skip

    def _unknown_version(self, name: str) -> Callable[[int], NotFound]:
        """:meth:`unknown_version` for ``name``, kept for the next call."""
        kept = self._unknown
        if kept is None or kept[0] != name:
            kept = self._unknown = (name, self.unknown_version(name))
        return kept[1]

    def _answer_bytes(self, outputs: list[OutputRequest], n: int) -> int:
        """A bound on the answer's size: each output's tensor, before any of it is built."""
        labels = self.plane.model.labels
        classes = len(labels)
        label = self.plane.model.label_chars
        total = 0
        for o in outputs:
            if o.classification:  # "score:index:label", 4 bytes of length each
                total += n * o.classification * (4 + 12 + len(str(classes)) + 1 + label)
            elif o.name == PROBABILITIES:
                total += n * classes * 4
            else:
                total += n * 4
        return total

    def _outputs(self, call: InferCall, prefix: str, name: str) -> list[OutputRequest]:
        """The outputs asked for (all when none): known names, and a classification count in range."""
        plane = self.plane
        offered = _offered(plane.model)
        if call.outputs is None or not call.outputs:
            return [OutputRequest(o) for o in offered]
        classes = len(plane.model.labels)
        seen: set[str] = set()
        for i, o in enumerate(call.outputs):
            if o.name in seen:  # as Triton: an output is asked for once (1,000 copies once built a 156 MB answer)
                raise InvalidArgument(
                    [FieldViolation(f"outputs[{i}].name", f"{o.name!r} is asked for more than once")],
                    f"{prefix}output '{o.name}' already exists in request",
                )
            seen.add(o.name)
            if o.name not in offered and o.name != KNOWN_SCORE:
                raise InvalidArgument(
                    [FieldViolation("outputs", f"unknown output {o.name!r}; this model has {list(offered)}")],
                    f"{prefix}unexpected inference output '{o.name}' for model '{name}'",
                )
            if o.classification and (o.name != PROBABILITIES or not 1 <= o.classification <= classes):
                raise InvalidArgument(
                    [FieldViolation(f"outputs[{o.name}].parameters[{CLASSIFICATION}]",
                                    f"is {o.classification}; {PROBABILITIES!r} takes 1..{classes}")],
                    f"{prefix}classification of output '{o.name}' for model '{name}' must be 1..{classes}",
                )  # fmt: skip
        return list(call.outputs)

    @staticmethod
    def _input(call: InferCall, prefix: str, name: str) -> InputTensor:
        """The one input: a known name, exactly one of them."""
        for t in call.inputs:
            if t.name not in INPUTS:
                raise InvalidArgument(
                    [FieldViolation("inputs", f"unknown input {t.name!r}; this model takes one of {list(INPUTS)}")],
                    f"{prefix}unexpected inference input '{t.name}' for model '{name}'",
                )
        if len(call.inputs) != 1:
            got = "[" + ",".join(f"'{t.name}'" for t in call.inputs) + "]"
            raise InvalidArgument(
                [FieldViolation("inputs", f"send exactly one of {list(INPUTS)}, got {len(call.inputs)} inputs")],
                f"{prefix}expected 1 inputs but got {len(call.inputs)} inputs for model '{name}'. Got input(s) "
                f"{got}, but expected exactly one of {', '.join(INPUTS)}.",
            )
        return call.inputs[0]

    @staticmethod
    def _bitmaps(tensor: InputTensor, n: int, prefix: str, name: str) -> NDArray[np.uint8]:
        """UINT8 [n, 28, 28, 1] from raw bytes or ``uint_contents``."""
        want = n * BITMAP_SIDE * BITMAP_SIDE
        if tensor.raw is not None:
            got = len(tensor.raw)
            if got != want:
                raise InvalidArgument(
                    [FieldViolation(f"inputs[{tensor.name}]", f"{got} bytes for shape {_dims(tensor.shape)}; "
                                                              f"expected {want}")],
                    f"{prefix}input byte size mismatch for input '{tensor.name}' for model '{name}'. Expected "
                    f"{want}, got {got}",
                )  # fmt: skip
            return np.frombuffer(tensor.raw, np.uint8).reshape(n, BITMAP_SIDE, BITMAP_SIDE, 1)
        values = np.asarray(tensor.values if tensor.values is not None else [], dtype=np.int64).reshape(-1)
        if values.size != want:
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].contents", f"{values.size} values for shape "
                                                                   f"{_dims(tensor.shape)}; expected {want}")],
                f"{prefix}unexpected number of elements for input '{tensor.name}' for model '{name}'. Expected "
                f"{want}, got {values.size}",
            )  # fmt: skip
        if values.size and (values.min() < 0 or values.max() > 255):
            j = int(np.flatnonzero((values < 0) | (values > 255))[0])
            raise InvalidArgument(
                [FieldViolation(f"inputs[{tensor.name}].contents[{j}]", f"is {values[j]}, outside 0..255 for UINT8")]
            )
        return values.astype(np.uint8).reshape(n, BITMAP_SIDE, BITMAP_SIDE, 1)

    def _drawings(self, tensor: InputTensor, n: int) -> pb.ClassifyRequest:
        """BYTES elements as the drawings of a ClassifyRequest (images, or strokes from their JSON, each element's
        objects and numbers counted before ``json.loads`` builds anything, as /v1 counts its body's)."""
        lim = self.plane.limits
        if tensor.raw is not None:
            elements = split_bytes(tensor.raw, f"inputs[{tensor.name}]")
        else:
            elements = [bytes(v) for v in (tensor.values or [])]
        if len(elements) != n:
            raise InvalidArgument([FieldViolation(f"inputs[{tensor.name}]",
                                                  f"{len(elements)} elements for shape [{n}]")])  # fmt: skip
        request = pb.ClassifyRequest()
        problems: list[FieldViolation] = []
        for i, element in enumerate(elements):
            drawing = request.drawings.add()
            if tensor.name == ENCODED_IMAGE:
                drawing.image.data = element
                continue
            where = f"inputs[{tensor.name}][{i}]"
            if element.count(b"{") > lim.max_strokes + _STROKES_SLACK:
                problems.append(FieldViolation(f"{where}.strokes", f"has more than {lim.max_strokes} strokes, over "
                                                                   f"the limit of max_strokes={lim.max_strokes}"))
                continue
            if element.count(b",") > _NUMBERS_PER_POINT * lim.max_points + 4 * lim.max_strokes + _STROKES_SLACK:
                problems.append(FieldViolation(f"{where}.strokes", f"has more than {lim.max_points} points, over "
                                                                   f"the limit of max_points={lim.max_points}"))
                continue
            try:
                document = json.loads(element)
                if not isinstance(document, dict):
                    raise ValueError("expected a JSON object")
                json_format.ParseDict(document, drawing.strokes)
            except (ValueError, RecursionError, json_format.ParseError) as exc:
                problems.append(FieldViolation(f"inputs[{tensor.name}][{i}]",
                                               f"is not a quickdraw.v1.Strokes in JSON: {str(exc)[:200]}"))  # fmt: skip
        if problems:
            raise InvalidArgument(problems)
        return request

    def _build(self, outputs: list[OutputRequest], answered: Answered, request_id: str, name: str
               ) -> list[OutputTensor]:  # fmt: skip
        """The outputs asked for, from the backend's answer."""
        labels = self.plane.model.labels
        scores = answered.scores
        built: list[OutputTensor] = []
        for o in outputs:
            if o.name == KNOWN_SCORE:
                if answered.known is None:
                    raise InvalidArgument(
                        [FieldViolation("outputs", f"version {answered.version} gives no {KNOWN_SCORE!r}")],
                        f"{_prefix(request_id)}unexpected inference output '{KNOWN_SCORE}' for model '{name}' version "
                        f"{answered.version}",
                    )
                built.append(OutputTensor(o.name, "FP32", np.asarray(answered.known, np.float32)))
            elif o.classification:
                top = scores if isinstance(scores, TopK) else TopK.of(scores, o.classification)
                k = o.classification
                best = zip(top.scores[:, :k].tolist(), top.indices[:, :k].tolist(), strict=True)
                rows = [[f"{s:f}:{j}:{labels[j]}".encode() for s, j in zip(srow, jrow, strict=True)]
                        for srow, jrow in best]  # fmt: skip
                array = np.empty((len(rows), k), dtype=object)
                array[:] = rows
                built.append(OutputTensor(o.name, "BYTES", array))
            else:
                assert not isinstance(scores, TopK)  # asked for: the backend gave every class
                built.append(OutputTensor(o.name, "FP32", np.asarray(scores, np.float32)))
        return built


def _offered(model: ModelDescription) -> tuple[str, ...]:
    """The outputs ``model`` gives (all of them when a call names none)."""
    return (PROBABILITIES, KNOWN_SCORE) if model.ood is not None else (PROBABILITIES,)


def _prefix(request_id: str) -> str:
    """What Triton's messages about a request start with."""
    return f"[request id: {request_id or '<id_unknown>'}] "


def _renamed(error: InvalidArgument) -> InvalidArgument:
    """Validation's and rendering's field names (``drawings[i].strokes...``) in this protocol's terms."""
    if not any(v.field.startswith("drawings[") for v in error.violations):
        return error
    renamed = []
    for v in error.violations:
        name = ENCODED_IMAGE if ".image" in v.field else STROKES  # the one input that gives drawings
        field = v.field.replace("drawings[", f"inputs[{name}][", 1).replace("].image.data", "]")
        field = field.replace("].strokes", "]", 1)
        renamed.append(FieldViolation(field, v.description))
    return InvalidArgument(renamed)
