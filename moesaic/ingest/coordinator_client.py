"""The bridge's gRPC client of ``moesaic.v1.Coordinator`` (unary Perceive with a deadline), over
TLS or mutual TLS like every other moesaic client (``tls``: :class:`~moesaic.rpc.TlsConfig`)."""

from __future__ import annotations

import grpc

from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc
from moesaic.rpc import TlsConfig, create_channel

__all__ = ["CoordinatorClient"]

_MAX_MESSAGE = 64 * 1024 * 1024


class CoordinatorClient:
    """Async context manager around one channel to a coordinator.

    >>> async def once(request):
    ...     async with CoordinatorClient("127.0.0.1:50070") as client:
    ...         return await client.perceive(request)
    """

    def __init__(self, address: str, *, timeout_s: float = 10.0, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stub: moesaic_pb2_grpc.CoordinatorStub | None = None

    async def __aenter__(self) -> CoordinatorClient:
        self._channel = create_channel(self.address, tls=self.tls, max_message_bytes=_MAX_MESSAGE)
        self._stub = moesaic_pb2_grpc.CoordinatorStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def perceive(self, request: moesaic_pb2.PerceiveRequest) -> moesaic_pb2.PerceiveResponse:
        """One Perceive call; raises ``grpc.aio.AioRpcError`` (DEADLINE_EXCEEDED after ``timeout_s``)."""
        if self._stub is None:
            raise RuntimeError("CoordinatorClient used outside 'async with'")
        response: moesaic_pb2.PerceiveResponse = await self._stub.Perceive(
            request, timeout=self.timeout_s, wait_for_ready=False
        )
        return response
