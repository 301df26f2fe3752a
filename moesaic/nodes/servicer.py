"""gRPC adapters of the node: KServe v2 ``inference.GRPCInferenceService`` and ``moesaic.v1.Node``.

``ModelInfer`` is registered with no protobuf (de)serialiser: it receives the request's wire
bytes, cuts the tensors out as ``memoryview`` slices (:mod:`moesaic.nodes.codec`), reads them
with ``np.frombuffer`` (validated by :mod:`moesaic.nodes.validation`), hands them to the
transport-free :class:`~moesaic.nodes.dataplane.DataPlane` with the call's deadline (the gRPC
deadline or the ``deadline_ms`` parameter, whichever is earlier) and writes the reply the same
way. Every reply carries parameters ``compute_ms`` (pre + engine + post), ``queue_ms``,
``energy_mj`` (attributed dynamic energy), ``energy_source`` (``nvml``, ``jetson-ina3221``,
``rapl`` or ``estimate``, with ``+attributed``), ``queue_depth`` and ``expected_wait_ms``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from moesaic import __version__
from moesaic.metrics import Metrics
from moesaic.nodes.codec import RAW_INPUT_FIELD, encode_response
from moesaic.nodes.dataplane import DataPlane
from moesaic.nodes.repository import ServedModel
from moesaic.nodes.validation import RequestValidator
from moesaic.proto import inference_pb2, moesaic_pb2, moesaic_pb2_grpc
from moesaic.rpc import abort, status_of
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.profiler import ProfileRecord

__all__ = ["INFERENCE_SERVICE", "NODE_SERVICE", "InferenceServicer", "NodeServicer"]

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
NODE_SERVICE = "moesaic.v1.Node"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_libtorch"}


class InferenceServicer:
    """KServe v2 ``GRPCInferenceService`` over the node's :class:`DataPlane`."""

    def __init__(self, plane: DataPlane, metrics: Metrics, *, is_ready: Callable[[], bool]) -> None:
        self.plane = plane
        self.metrics = metrics
        self.is_ready = is_ready
        self.validator = RequestValidator(plane.ready_model)
        self._ok = metrics.requests.labels(method="ModelInfer", code="OK")

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        pb = inference_pb2

        def typed(fn: Callable[..., Any], request: Any) -> grpc.RpcMethodHandler:
            return unary(
                fn,
                request_deserializer=request.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        return grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE,
            {
                "ServerLive": typed(self.server_live, pb.ServerLiveRequest),
                "ServerReady": typed(self.server_ready, pb.ServerReadyRequest),
                "ModelReady": typed(self.model_ready, pb.ModelReadyRequest),
                "ServerMetadata": typed(self.server_metadata, pb.ServerMetadataRequest),
                "ModelMetadata": typed(self.model_metadata, pb.ModelMetadataRequest),
                "ModelInfer": unary(self.model_infer),  # bytes in, bytes out
            },
        )

    # -------------------------------------------------------------- control plane

    def server_live(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerReadyResponse(ready=self.is_ready())

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return inference_pb2.ModelReadyResponse(ready=self.plane.model(request.name).ready)
        except Exception as exc:
            abort(context, exc)

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerMetadataResponse(name="moesaic", version=__version__, extensions=[])

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = self.plane.ready_model(request.name)
        except Exception as exc:
            abort(context, exc)
        meta = inference_pb2.ModelMetadataResponse(
            name=model.name, versions=["1"], platform=_PLATFORMS.get(model.engine_type, model.engine_type)
        )
        for spec in model.inputs:
            meta.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            meta.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return meta

    # -------------------------------------------------------------- data plane

    def model_infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = self.validator.decode(data, RAW_INPUT_FIELD)
            deadline = _deadline(context.time_remaining(), request.deadline_ms)
            reply = self.plane.infer(
                request.model,
                request.inputs,
                request.parameters,
                requested=request.requested,
                deadline=deadline,
                alive=context.is_active,
            )
            stages = reply.stages
            data_out = encode_response(
                request.model.name,
                reply.outputs,
                parameters={
                    "compute_ms": stages.compute * 1e3,
                    "queue_ms": stages.queue * 1e3,
                    "energy_mj": reply.energy_j * 1e3,
                    "energy_source": reply.energy_source,
                    "queue_depth": reply.queue.depth,
                    "expected_wait_ms": reply.queue.expected_wait_s * 1e3,
                },
                request_id=request.request_id,
                model_version=request.model_version,
            )
        except Exception as exc:
            code, _ = status_of(exc)
            self.metrics.requests.labels(method="ModelInfer", code=code.name).inc()
            abort(context, exc)
        self._ok.inc()
        return data_out


def _deadline(time_remaining: float | None, deadline_ms: float | None) -> float | None:
    """The request's deadline (monotonic seconds): the earlier of gRPC's and ``deadline_ms``."""
    if time_remaining is None and deadline_ms is None:
        return None
    now = time.monotonic()
    grpc_deadline = now + time_remaining if time_remaining is not None else float("inf")
    return min(grpc_deadline, now + deadline_ms / 1e3) if deadline_ms is not None else grpc_deadline


class NodeServicer(moesaic_pb2_grpc.NodeServicer):
    """``moesaic.v1.Node/Describe``: device, models and their measured profiles."""

    def __init__(
        self,
        node_id: str,
        device: DeviceInfo,
        plane: DataPlane,
        profiles: Sequence[ProfileRecord],
    ) -> None:
        self.node_id = node_id
        self.device = device
        self.plane = plane
        self.models: Mapping[str, ServedModel] = plane.models
        self.profiles = list(profiles)

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:
        d = self.device
        idle = self.plane.cost.idle_watts
        reply = moesaic_pb2.NodeDescription(
            node_id=self.node_id,
            version=__version__,
            device=moesaic_pb2.Device(
                kind=d.kind,
                name=d.name,
                memory_bytes=d.memory_bytes,
                power_limit_watts=d.power_limit_watts,
                cores=d.cores,
                energy_source=d.energy_source,
                id=d.id,
                idle_watts=0.0 if idle != idle else idle,  # NaN: not learnt yet
            ),
        )
        for model in self.models.values():
            desc = reply.models.add(
                name=model.name,
                task=model.spec.task,
                engine=model.engine_type,
                ready=model.ready,
                state=model.state,
                class_names=model.class_names,
                error=model.error,
                device=model.device,
                provider=model.provider,
            )
            if model.ready:
                queue = self.plane.queue_state(model)
                desc.queue_depth, desc.expected_wait_ms = queue.depth, queue.expected_wait_s * 1e3
                desc.service_ms = queue.service_s * 1e3
                desc.energy_mj = self.plane.cost.energy_j(model.name) * 1e3
            for rec in self.profiles:
                if rec.model != model.name:
                    continue
                desc.profiles.add(
                    batch_size=rec.batch_size,
                    latency_ms=moesaic_pb2.LatencyQuantiles(
                        p50=rec.latency_ms.p50, p95=rec.latency_ms.p95, p99=rec.latency_ms.p99
                    ),
                    throughput_per_s=rec.throughput_per_s,
                    energy_mj_per_inference=rec.energy_mj_per_inference,
                    idle_watts=rec.idle_watts,
                    energy_source=rec.energy_source,
                    engine=rec.engine,
                )
        return reply
