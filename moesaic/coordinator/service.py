"""The gRPC adapter of the coordinator: ``moesaic.v1.Coordinator`` Perceive and PerceiveStream.

Wire types are converted to domain types here and the transport-neutral
:class:`~moesaic.coordinator.core.Coordinator` does the work; domain errors map to gRPC
status codes through :func:`moesaic.rpc.status_of` (unary) or become the ``error`` field of
a stream response (the stream goes on). :func:`serve` runs the server with health,
reflection, Prometheus metrics and systemd READY/watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from moesaic.budget import Budget
from moesaic.coordinator.config import FleetConfig
from moesaic.coordinator.core import Coordinator, PerceiveInput, Perception
from moesaic.coordinator.fusion import FUSED_TASKS
from moesaic.coordinator.inputs import check_options, decode_inputs
from moesaic.errors import InvalidInput, as_moesaic_error, quote
from moesaic.metrics import Metrics
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc
from moesaic.rpc import abort_async, add_health_and_reflection, add_port, create_server, status_of
from moesaic.runtime.engine import datatype_of
from moesaic.systemd import Watchdog, notify_ready, notify_stopping

__all__ = ["COORDINATOR_SERVICE", "CoordinatorServicer", "serve", "to_domain", "to_proto"]

COORDINATOR_SERVICE = "moesaic.v1.Coordinator"
log = logging.getLogger(__name__)


class MalformedRequest:
    """Bytes that are not a ``PerceiveRequest``: answered INVALID_ARGUMENT, never UNKNOWN."""

    request_id = ""
    task = ""

    def __init__(self, error: str) -> None:
        self.error = error


def parse_request(data: bytes) -> Any:
    """The ``PerceiveRequest`` in ``data``, or a :class:`MalformedRequest` saying why not
    (grpc would answer a deserializer's exception with UNKNOWN)."""
    try:
        return moesaic_pb2.PerceiveRequest.FromString(data)
    except DecodeError as exc:
        return MalformedRequest(str(exc))


def to_domain(request: Any, deadline: float | None = None) -> PerceiveInput:
    """A ``PerceiveRequest`` as a :class:`PerceiveInput`; :class:`InvalidInput` naming the bad field."""
    if isinstance(request, MalformedRequest):
        raise InvalidInput(f"malformed PerceiveRequest: {request.error}", reason="malformed")
    if request.task not in FUSED_TASKS:
        raise InvalidInput(
            f"task: {quote(request.task)} is not one of {list(FUSED_TASKS)}", reason="unknown_task"
        )
    b = request.budget
    for name, value in (("latency_ms", b.latency_ms), ("energy_mj", b.energy_mj)):
        if not np.isfinite(value) or value < 0:
            raise InvalidInput(f"budget.{name}: expected a finite value >= 0 (0 = unbounded), got {value}")
    options = dict(request.options)
    check_options(request.task, options)
    return PerceiveInput(
        task=request.task,
        inputs=decode_inputs(request.task, request, options),
        budget=Budget(latency_ms=b.latency_ms, energy_mj=b.energy_mj),
        request_id=request.request_id,
        options=options,
        deadline=deadline,
    )


def _fill(tensor: Any, name: str, array: np.ndarray) -> None:
    """Write ``array`` into the response's own ``Tensor`` field: building a message and
    appending or copying it in copies its bytes again (20 MB for a 1024x1024 BEV grid's
    class probabilities)."""
    arr = np.ascontiguousarray(array)
    tensor.name = name
    tensor.datatype = datatype_of(arr.dtype)
    tensor.shape.extend(arr.shape)
    tensor.data = arr.tobytes()


def to_proto(p: Perception) -> Any:
    """A :class:`Perception` as a ``PerceiveResponse``."""
    response = moesaic_pb2.PerceiveResponse(
        request_id=p.request_id,
        task=p.task,
        predicted_latency_ms=p.predicted_latency_ms,
        predicted_energy_mj=p.predicted_energy_mj,
        measured_latency_ms=p.measured_latency_ms,
        measured_energy_mj=p.measured_energy_mj,
        energy_measured=p.energy_measured,
        budget_met=p.budget_met,
        budget=moesaic_pb2.Budget(latency_ms=p.budget.latency_ms, energy_mj=p.budget.energy_mj),
        budget_reason=p.budget_reason,
        feasible=p.feasible,
        cheapest_latency_ms=p.cheapest_latency_ms,
        cheapest_energy_mj=p.cheapest_energy_mj,
    )
    for r in p.runs:
        response.experts.add(
            expert_id=r.expert.id,
            node=r.expert.node,
            model=r.expert.model,
            weight=r.weight,
            latency_ms=r.latency_ms,
            energy_mj=r.energy_mj,
            energy_measured=r.energy_measured,
            status=r.status,
            error=r.error,
        )
    fused = p.fused
    if fused.detections is not None:
        d = fused.detections
        response.detections.SetInParent()
        for i in range(len(d)):
            response.detections.items.add(
                xyxy=[float(v) for v in d.boxes[i]],
                score=float(d.scores[i]),
                class_id=int(d.class_ids[i]),
                class_name=d.name_of(i),
            )
    elif fused.grid is not None:
        _fill(response.grid, *fused.grid)
    elif fused.text is not None:
        response.text = fused.text
    for name, arr in fused.extras.items():
        _fill(response.extras.add(), name, arr)
    return response


class CoordinatorServicer(moesaic_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, metrics: Metrics | None = None) -> None:
        self.coordinator = coordinator
        self.metrics = metrics

    def handler(self) -> grpc.GenericRpcHandler:
        """``moesaic.v1.Coordinator`` with a deserializer that never raises (see :func:`parse_request`)."""
        serialize = moesaic_pb2.PerceiveResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            COORDINATOR_SERVICE,
            {
                "Perceive": grpc.unary_unary_rpc_method_handler(
                    self.Perceive, request_deserializer=parse_request, response_serializer=serialize
                ),
                "PerceiveStream": grpc.stream_stream_rpc_method_handler(
                    self.PerceiveStream, request_deserializer=parse_request, response_serializer=serialize
                ),
            },
        )

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method=method, code=code.name).inc()

    async def _answer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Any:
        """The response to one request, with the caller's deadline; counts its status code."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            response = to_proto(await self.coordinator.perceive(to_domain(request, deadline)))
        except Exception as exc:
            err = as_moesaic_error(exc, where=method)
            self._count(method, status_of(err)[0])
            raise err from None
        self._count(method, grpc.StatusCode.OK)
        return response

    async def Perceive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await self._answer(request, context, "Perceive")
        except Exception as exc:
            await abort_async(context, exc)

    async def PerceiveStream(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in request_iterator:
            try:
                response = await self._answer(request, context, "PerceiveStream")
            except Exception as exc:
                code, message = status_of(exc)
                yield moesaic_pb2.PerceiveResponse(
                    request_id=request.request_id, task=request.task, error=f"{code.name}: {message}"
                )
                continue
            yield response


async def serve(
    config: FleetConfig,
    listen: str,
    *,
    ready: asyncio.Event | None = None,
    bound: list[int] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the coordinator on ``listen`` until SIGINT/SIGTERM (or cancellation).

    ``bound`` receives the port actually bound (for ``HOST:0``); ``ready`` is set once serving.
    """
    settings = config.coordinator
    metrics = Metrics(component="coordinator")
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    server = create_server(max_message_bytes=settings.max_message_bytes, aio=True)
    async with Coordinator(config, metrics=metrics) as coordinator:
        server.add_generic_rpc_handlers((CoordinatorServicer(coordinator, metrics).handler(),))
        health = add_health_and_reflection(server, [COORDINATOR_SERVICE])
        port = add_port(server, listen, tls=settings.tls)
        if bound is not None:
            bound.append(port)
        await server.start()
        for name in ("", COORDINATOR_SERVICE):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        up = len(coordinator.registry.replicas())
        log.info("coordinator listening on port %d with %d expert replicas up", port, up)
        notify_ready(f"serving on port {port}, {up} experts up")
        if ready is not None:
            ready.set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            async with Watchdog():
                await stop.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            notify_stopping()
            for name in ("", COORDINATOR_SERVICE):
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            await server.stop(grace=2.0)
