"""A bare grpc.aio unary server, the floor for ``bench_cpu``: any unary call gets 100 bytes back.

One generic handler, no protobuf (requests and answers are raw bytes), no interceptors, nothing else: what
gRPC's asyncio server itself costs per call on this machine. Run as ``python benchmarks/bare_server.py PORT``;
it prints ``bare server on 127.0.0.1:PORT`` once it listens and serves until killed.

With ``--forward TARGET`` it is a bare proxy instead: each call's 784 bytes go to TF Serving at ``TARGET`` as one
``Predict`` (a uint8 [1, 28, 28, 1] ``image``, ``top_k_*`` outputs) on one grpc.aio channel before it answers:
the floor for any gateway that makes one backend call per call with grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

ANSWER = b"\x01" * 100


async def _answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return ANSWER


class _AnyUnary(grpc.GenericRpcHandler):
    """Every method is a unary call answered by ``handler``."""

    def __init__(self, handler: Any) -> None:
        self._handler = grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None,
                                                            response_serializer=None)  # fmt: skip

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler


def _forwarder(target: str) -> Any:
    """A handler that sends each request to TF Serving's Predict at ``target`` first."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    channel = grpc.aio.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = predict_pb2.PredictRequest(output_filter=["top_k_scores", "top_k_indices"])
        req.model_spec.name = "quickdraw"
        tensor = req.inputs["image"]
        tensor.dtype = 4  # DT_UINT8
        for d in (1, 28, 28, 1):
            tensor.tensor_shape.dim.add(size=d)
        tensor.tensor_content = request
        await stub.Predict(req, timeout=10)
        return ANSWER

    return forward


async def serve(port: int, forward: str | None) -> None:
    """Listen on 127.0.0.1:``port`` until cancelled."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_AnyUnary(_forwarder(forward) if forward else _answer),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("port", type=int)
    p.add_argument("--forward", metavar="TARGET", help="TF Serving to send each call to first (a bare proxy)")
    args = p.parse_args()
    asyncio.run(serve(args.port, args.forward))
