"""The asyncio client: the same calls as :class:`quickdraw_client.QuickDrawClient`, awaitable.

    import asyncio
    from quickdraw_client import AsyncQuickDrawClient

    async def main() -> None:
        async with AsyncQuickDrawClient("localhost:50051") as client:
            [result] = await client.classify([png_bytes])
            async for item in client.classify_stream(drawings):   # a list, a generator or an async generator
                print(item.result or item.error)

    asyncio.run(main())

Retries, deadlines, TLS and the token work as in the blocking client (the retry policy is gRPC's own, in the
channel). Create the client inside the event loop that uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType

import grpc.aio

from quickdraw_client.client import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    build_request,
    channel_options,
    results_of,
    stream_item,
)
from quickdraw_client.drawings import D, DrawingLike, Result, StreamItem
from quickdraw_client.security import ClientSecurity
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc


async def _aiter(items: Iterable[D] | AsyncIterable[D]) -> AsyncIterator[D]:
    """Iterate a plain or an asynchronous iterable alike."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class AsyncQuickDrawClient:
    """asyncio client for ``quickdraw.v1.Classifier``; one channel, any number of concurrent calls."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.aio.Channel | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        security = security or ClientSecurity()
        self._metadata = security.metadata()
        self._channel = channel or security.aio_channel(target, channel_options(max_attempts, max_message_bytes))
        self._stub = pb_grpc.ClassifierStub(self._channel)

    async def classify(
        self,
        drawings: Iterable[DrawingLike],
        *,
        top_k: int = 3,
        version: int | None = None,
        raw: bool = False,
        timeout_s: float | None = None,
    ) -> list[Result]:
        """Classify drawings in one call; raises ``grpc.aio.AioRpcError`` with the server's status on failure."""
        request = build_request(drawings, top_k=top_k, version=version, raw=raw)
        return results_of(await self.classify_request(request, timeout_s))

    async def classify_request(
        self, request: pb.ClassifyRequest, timeout_s: float | None = None
    ) -> pb.ClassifyResponse:
        """Send a prepared ClassifyRequest."""
        return await self._stub.Classify(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)  # type: ignore[no-any-return]

    async def classify_stream(
        self,
        drawings: Iterable[D] | AsyncIterable[D],
        *,
        top_k: int = 3,
        version: int | None = None,
        raw: bool = False,
        timeout_s: float | None = None,
    ) -> AsyncIterator[StreamItem[D]]:
        """Classify drawings over one ClassifyStream (one drawing per message) and yield each drawing as given,
        with its result or error, as soon as it is ready (see ``QuickDrawClient.classify_stream``)."""
        pending: dict[str, D] = {}

        async def requests() -> AsyncIterator[pb.ClassifyStreamRequest]:
            i = 0
            async for d in _aiter(drawings):
                pending[str(i)] = d
                request = build_request([d], top_k=top_k, version=version, raw=raw)  # type: ignore[list-item]
                yield pb.ClassifyStreamRequest(id=str(i), request=request)
                i += 1

        call = self._stub.ClassifyStream(requests(), timeout=timeout_s, metadata=self._metadata)
        async for answer in call:
            yield stream_item(pending.pop(answer.id), answer)

    async def model_info(self, timeout_s: float | None = None) -> pb.ModelInfo:
        """The served model's name, versions, labels and limits."""
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s or self.timeout_s,  # type: ignore[no-any-return]
                                             metadata=self._metadata)  # fmt: skip

    async def close(self) -> None:
        """Close the channel (calls still running are cancelled)."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncQuickDrawClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
