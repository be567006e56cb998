"""The Open Inference Protocol (KServe v2) without generated code: messages from a private descriptor pool.

``oip.binpb`` is a ``FileDescriptorSet`` compiled by ``make protos`` from the proto vendored under
``protos/third_party/kserve/`` (the protocol's ``open_inference_grpc.proto``, package ``inference``, plus Triton's
``ModelStreamInfer``, ``ModelConfig`` and ``ModelStatistics``: ``triton_extensions.proto``). It is added to a
private ``DescriptorPool``: ``tritonclient`` and the ``kserve`` SDK
register the same ``inference.*`` names in protobuf's default pool, from files of other names, and a second
registration there would clash (and tests run a client and the gateway in one process). The classes here are
not the clients' classes: pass bytes between the two.

The gateway's side of the protocol is ``service.frontends.oip.core`` (shared by gRPC and HTTP),
``service.frontends.oip.grpc_api``
(``inference.GRPCInferenceService``) and ``service.frontends.oip.http_api`` (``/v2/...``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import message_factory
from google.protobuf.message import Message

from service.protos.tfs import load_pool

#: The compiled descriptor set, beside this module (``make protos`` writes it).
DESCRIPTOR_SET = "oip.binpb"


#: The private pool: the protocol's messages as the gateway knows them.
POOL = load_pool(__name__, DESCRIPTOR_SET)


def message_class(full_name: str) -> type[Message]:
    """The message class for a full name in the private pool (KeyError when the set does not define it)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


SERVICE = "inference.GRPCInferenceService"

# Typed as Any: the classes are made at run time.
ServerLiveRequest: Any = message_class("inference.ServerLiveRequest")
ServerLiveResponse: Any = message_class("inference.ServerLiveResponse")
ServerReadyRequest: Any = message_class("inference.ServerReadyRequest")
ServerReadyResponse: Any = message_class("inference.ServerReadyResponse")
ModelReadyRequest: Any = message_class("inference.ModelReadyRequest")
ModelReadyResponse: Any = message_class("inference.ModelReadyResponse")
ServerMetadataRequest: Any = message_class("inference.ServerMetadataRequest")
ServerMetadataResponse: Any = message_class("inference.ServerMetadataResponse")
ModelMetadataRequest: Any = message_class("inference.ModelMetadataRequest")
ModelMetadataResponse: Any = message_class("inference.ModelMetadataResponse")
ModelInferRequest: Any = message_class("inference.ModelInferRequest")
ModelInferResponse: Any = message_class("inference.ModelInferResponse")
ModelStreamInferResponse: Any = message_class("inference.ModelStreamInferResponse")
InferParameter: Any = message_class("inference.InferParameter")
ModelConfigRequest: Any = message_class("inference.ModelConfigRequest")
ModelConfigResponse: Any = message_class("inference.ModelConfigResponse")
ModelStatisticsRequest: Any = message_class("inference.ModelStatisticsRequest")
ModelStatisticsResponse: Any = message_class("inference.ModelStatisticsResponse")

#: Every method of the service as the vendored proto declares it: (name, request class, response class, streaming).
METHODS: tuple[tuple[str, Any, Any, bool], ...] = tuple(
    (m.name, message_class(m.input_type.full_name), message_class(m.output_type.full_name), m.client_streaming)
    for m in POOL.FindServiceByName(SERVICE).methods
)


def path(method: str) -> str:
    """The gRPC path of a method the vendored proto declares (KeyError when it does not)."""
    return f"/{SERVICE}/{POOL.FindServiceByName(SERVICE).methods_by_name[method].name}"


class GRPCInferenceServiceStub:
    """A client of ``inference.GRPCInferenceService`` on a ``grpc.Channel`` or ``grpc.aio.Channel`` (as generated)."""

    def __init__(self, channel: Any) -> None:
        for name, request, response, streaming in METHODS:
            make = channel.stream_stream if streaming else channel.unary_unary
            setattr(self, name, make(path(name), request_serializer=request.SerializeToString,
                                     response_deserializer=response.FromString))  # fmt: skip
