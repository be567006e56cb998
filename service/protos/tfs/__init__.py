"""TF Serving's gRPC API without TensorFlow: its messages from a private descriptor pool, and its method paths.

``tensorflow-serving-api``'s modules import TensorFlow's (600 MiB, seconds to load). This package loads
``tfserving.binpb`` instead: a ``FileDescriptorSet`` compiled by ``make protos`` from the TF Serving 2.21.0 protos
vendored under ``protos/third_party/tfserving/``, added to a private ``DescriptorPool``. TensorFlow's own
modules register the same full names in protobuf's default pool; a private pool cannot clash with them, so
the embedded backend, the trainer and the tests can import both. The classes here are not TensorFlow's:
never mix the two in one message (``CopyFrom`` across them raises TypeError); the bytes are the same, so pass
``SerializeToString()`` / ``FromString()`` between them.

The services are reached by method path (``PREDICT`` ...), with the stubs below or a generic handler. The
vendored ``prediction_service.proto`` and ``model_service.proto`` are trimmed to the methods the gateway uses
(Predict, GetModelMetadata; GetModelStatus): the others import much more. :func:`reflection_pool` lets gRPC
reflection describe these services beside the ones in the default pool.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper
from google.protobuf.message import Message

#: The compiled descriptor set, beside this module (``make protos`` writes it).
DESCRIPTOR_SET = "tfserving.binpb"


def load_pool(package: str, descriptor_set: str) -> descriptor_pool.DescriptorPool:
    """A new private pool holding every file of ``package``'s descriptor set (which lists imports before their
    importers); also what service.protos.oip loads the Open Inference Protocol with."""
    data = resources.files(package).joinpath(descriptor_set).read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    return pool


#: The private pool: TF Serving's and TensorFlow's messages as the gateway knows them.
POOL = load_pool(__name__, DESCRIPTOR_SET)


def message_class(full_name: str) -> type[Message]:
    """The message class for a full name in the private pool (KeyError when the set does not define it)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


# --- messages --------------------------------------------------------------------------------------------------
# Typed as Any: the classes are made at run time, so a type checker cannot see their fields.
PredictRequest: Any = message_class("tensorflow.serving.PredictRequest")
PredictResponse: Any = message_class("tensorflow.serving.PredictResponse")
GetModelMetadataRequest: Any = message_class("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse: Any = message_class("tensorflow.serving.GetModelMetadataResponse")
SignatureDefMap: Any = message_class("tensorflow.serving.SignatureDefMap")
GetModelStatusRequest: Any = message_class("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse: Any = message_class("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus: Any = message_class("tensorflow.serving.ModelVersionStatus")
ModelSpec: Any = message_class("tensorflow.serving.ModelSpec")
TensorProto: Any = message_class("tensorflow.TensorProto")
TensorShapeProto: Any = message_class("tensorflow.TensorShapeProto")
SignatureDef: Any = message_class("tensorflow.SignatureDef")
TensorInfo: Any = message_class("tensorflow.TensorInfo")

#: ``type_url`` of the ``signature_def`` metadata that GetModelMetadata packs in a ``google.protobuf.Any``.
SIGNATURE_DEF_MAP_URL = f"type.googleapis.com/{SignatureDefMap.DESCRIPTOR.full_name}"

# --- enums -----------------------------------------------------------------------------------------------------
#: ``tensorflow.DataType``: ``DataType.Name(4) == "DT_UINT8"``, ``DataType.Value("DT_UINT8") == 4``.
DataType = enum_type_wrapper.EnumTypeWrapper(POOL.FindEnumTypeByName("tensorflow.DataType"))
DT_INVALID: int = DataType.Value("DT_INVALID")
DT_FLOAT: int = DataType.Value("DT_FLOAT")
DT_DOUBLE: int = DataType.Value("DT_DOUBLE")
DT_INT32: int = DataType.Value("DT_INT32")
DT_UINT8: int = DataType.Value("DT_UINT8")
DT_INT16: int = DataType.Value("DT_INT16")
DT_INT8: int = DataType.Value("DT_INT8")
DT_STRING: int = DataType.Value("DT_STRING")
DT_INT64: int = DataType.Value("DT_INT64")
DT_BOOL: int = DataType.Value("DT_BOOL")
DT_HALF: int = DataType.Value("DT_HALF")
DT_UINT32: int = DataType.Value("DT_UINT32")
DT_UINT64: int = DataType.Value("DT_UINT64")
#: ``ModelVersionStatus.State``: a version TF Serving can serve.
AVAILABLE: int = ModelVersionStatus.State.Value("AVAILABLE")

# --- services --------------------------------------------------------------------------------------------------
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"


def _path(service: str, method: str) -> str:
    """The gRPC path of a method the vendored service protos define (KeyError when they do not)."""
    return f"/{service}/{POOL.FindServiceByName(service).methods_by_name[method].name}"


#: gRPC method paths, as ``prediction_service.proto`` and ``model_service.proto`` name them.
PREDICT = _path(PREDICTION_SERVICE, "Predict")
GET_MODEL_METADATA = _path(PREDICTION_SERVICE, "GetModelMetadata")
GET_MODEL_STATUS = _path(MODEL_SERVICE, "GetModelStatus")


def _method(channel: Any, path: str, request: Any, response: Any) -> Callable[..., Any]:
    """A unary-unary callable on ``channel`` (``grpc.Channel`` or ``grpc.aio.Channel``) for ``path``."""
    return channel.unary_unary(
        path, request_serializer=request.SerializeToString, response_deserializer=response.FromString
    )


class PredictionServiceStub:
    """Client of ``tensorflow.serving.PredictionService``: ``Predict`` and ``GetModelMetadata`` (as TF's stub)."""

    def __init__(self, channel: Any) -> None:
        self.Predict = _method(channel, PREDICT, PredictRequest, PredictResponse)
        self.GetModelMetadata = _method(channel, GET_MODEL_METADATA, GetModelMetadataRequest, GetModelMetadataResponse)


class ModelServiceStub:
    """Client of ``tensorflow.serving.ModelService``: ``GetModelStatus`` (as TF's stub)."""

    def __init__(self, channel: Any) -> None:
        self.GetModelStatus = _method(channel, GET_MODEL_STATUS, GetModelStatusRequest, GetModelStatusResponse)


class _ReflectionPool:
    """What gRPC reflection asks of a pool, answered from the default pool first, then from :data:`POOL`.

    The gateway's own services live in the default pool, TF Serving's in the private one; reflection takes one.
    """

    def __init__(self, *pools: descriptor_pool.DescriptorPool) -> None:
        self._pools = pools

    def _first(self, find: str, *args: Any) -> Any:
        """The first pool's answer to ``find(*args)``; the last pool's KeyError when none has it."""
        for pool in self._pools[:-1]:
            try:
                return getattr(pool, find)(*args)
            except KeyError:
                continue
        return getattr(self._pools[-1], find)(*args)

    def FindFileByName(self, name: str) -> Any:  # DescriptorPool's method names
        """The file descriptor by file name."""
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        """The file descriptor defining a full name."""
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str) -> Any:
        """The message descriptor by full name."""
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        """An extension of ``message`` (from the pool that defines it)."""
        return message.file.pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        """Every extension of ``message`` (from the pool that defines it)."""
        return message.file.pool.FindAllExtensions(message)


def reflection_pool() -> Any:
    """A pool for ``grpc_reflection``'s ``enable_server_reflection(..., pool=...)``: the default pool, then ours."""
    return _ReflectionPool(descriptor_pool.Default(), POOL)
