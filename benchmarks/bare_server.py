"""A bare grpc.aio unary server, the floor for ``bench_cpu``: any unary call gets 100 bytes back.

One generic handler, no protobuf (requests and answers are raw bytes), no interceptors, nothing else: what
gRPC's asyncio server itself costs per call on this machine. Run as ``python benchmarks/bare_server.py PORT``;
it prints ``bare server on 127.0.0.1:PORT`` once it listens and serves until killed.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

ANSWER = b"\x01" * 100


async def _answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return ANSWER


class _AnyUnary(grpc.GenericRpcHandler):
    """Every method is a unary call answered with ``ANSWER``."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return _HANDLER


_HANDLER = grpc.unary_unary_rpc_method_handler(_answer, request_deserializer=None, response_serializer=None)


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` until cancelled."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_AnyUnary(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
