"""Async client of a node (or of any KServe v2 gRPC server), used by the coordinator.

>>> async with NodeClient("127.0.0.1:8001") as node:          # doctest: +SKIP
...     await node.ready(timeout=5)
...     description = await node.describe(timeout=2)
...     result = await node.infer("toy", {"x": np.zeros((1, 4), np.float32)}, timeout=1)
...     result.outputs["y"], result.compute_ms, result.energy_mj, result.energy_source

Every call takes a timeout (seconds) and raises ``grpc.aio.AioRpcError`` on failure (its
``code()`` is the node's status: NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, ...). Output arrays
are read-only views of the reply bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from moesaic.nodes.codec import decode_response, encode_request, from_parameters
from moesaic.proto import inference_pb2, moesaic_pb2
from moesaic.rpc import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig, create_channel

__all__ = ["InferResult", "NodeClient"]

_SERVICE = "/inference.GRPCInferenceService/"


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class InferResult:
    """Outputs of one ModelInfer call and the cost the node measured around its engine call.

    ``compute_ms``/``energy_mj`` are NaN and ``energy_source`` is empty when the server does not
    report them (e.g. a plain Triton server).
    """

    model: str
    outputs: dict[str, np.ndarray]
    compute_ms: float
    energy_mj: float
    energy_source: str
    parameters: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""

    @property
    def energy_measured(self) -> bool:
        """True when the energy came from a hardware counter rather than an estimate."""
        return bool(self.energy_source) and self.energy_source.split("+")[0] != "estimate"


class NodeClient:
    """``async with NodeClient(address, tls=...) as node:`` -> ``describe``, ``infer``, ``ready``."""

    def __init__(
        self,
        address: str,
        *,
        tls: TlsConfig | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self._channel: Any = None

    async def __aenter__(self) -> NodeClient:
        self._channel = create_channel(self.address, tls=self.tls, max_message_bytes=self.max_message_bytes)
        ch = self._channel
        pb = inference_pb2
        self._infer = ch.unary_unary(
            _SERVICE + "ModelInfer", request_serializer=_identity, response_deserializer=_identity
        )
        self._server_ready = ch.unary_unary(
            _SERVICE + "ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        self._model_ready = ch.unary_unary(
            _SERVICE + "ModelReady",
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )
        self._model_metadata = ch.unary_unary(
            _SERVICE + "ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        self._describe = ch.unary_unary(
            "/moesaic.v1.Node/Describe",
            request_serializer=moesaic_pb2.DescribeRequest.SerializeToString,
            response_deserializer=moesaic_pb2.NodeDescription.FromString,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _check_open(self) -> None:
        if self._channel is None:
            raise RuntimeError("NodeClient is not open; use `async with NodeClient(...)`")

    async def ready(self, timeout: float = 5.0, *, model: str | None = None) -> bool:
        """True when the server (or ``model``) is ready; False when not ready or unreachable."""
        self._check_open()
        try:
            if model is None:
                reply = await self._server_ready(inference_pb2.ServerReadyRequest(), timeout=timeout)
            else:
                reply = await self._model_ready(inference_pb2.ModelReadyRequest(name=model), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def describe(self, timeout: float = 5.0) -> Any:
        """``moesaic.v1.NodeDescription``: node id, device, models with state and profiles."""
        self._check_open()
        return await self._describe(moesaic_pb2.DescribeRequest(), timeout=timeout)

    async def metadata(self, model: str, timeout: float = 5.0) -> Any:
        """KServe ``ModelMetadataResponse`` of ``model``."""
        self._check_open()
        return await self._model_metadata(inference_pb2.ModelMetadataRequest(name=model), timeout=timeout)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        parameters: Mapping[str, Any] | None = None,
        outputs: Sequence[str] = (),
        request_id: str = "",
        timeout: float,
    ) -> InferResult:
        """Run ``model`` on ``inputs`` (raw tensors, no copy on either side of the codec)."""
        self._check_open()
        data = encode_request(model, inputs, parameters=parameters, outputs=outputs, request_id=request_id)
        reply = await self._infer(data, timeout=timeout)
        header, tensors = decode_response(reply)
        params = from_parameters(header.parameters)
        return InferResult(
            model=header.model_name or model,
            outputs=tensors,
            compute_ms=float(params.get("compute_ms", float("nan"))),
            energy_mj=float(params.get("energy_mj", float("nan"))),
            energy_source=str(params.get("energy_source", "")),
            parameters=params,
            request_id=header.id,
        )
