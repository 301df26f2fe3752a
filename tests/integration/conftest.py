"""Integration fixtures: a real mosquitto on a free loopback port, a real gRPC Coordinator stub."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from moesaic.ingest.broker import MosquittoProcess, mosquitto_binary
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A fresh mosquitto (Debian's /usr/sbin/mosquitto) for one test; skipped when not installed."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class EchoCoordinator(moesaic_pb2_grpc.CoordinatorServicer):
    """A real ``moesaic.v1.Coordinator`` servicer that answers from the request alone.

    LiDAR requests get an 8x8 BEV class map, camera requests one box over the whole image;
    ``delay_s`` sleeps to emulate expert compute; tasks in ``fail_tasks`` get INVALID_ARGUMENT.
    Every request is recorded in ``requests``.
    """

    def __init__(self, *, delay_s: float = 0.0, fail_tasks: tuple[str, ...] = ()) -> None:
        self.delay_s = delay_s
        self.fail_tasks = fail_tasks
        self.requests: list[moesaic_pb2.PerceiveRequest] = []
        self.times: list[float] = []  # time.monotonic() of each request's arrival

    def respond(self, request: moesaic_pb2.PerceiveRequest) -> moesaic_pb2.PerceiveResponse:
        response = moesaic_pb2.PerceiveResponse(
            request_id=request.request_id or f"r{len(self.requests)}",
            task=request.task,
            predicted_latency_ms=1.0,
            measured_latency_ms=1.0 + self.delay_s * 1e3,
            predicted_energy_mj=2.0,
            measured_energy_mj=2.0,
            budget_met=True,
        )
        response.experts.add(
            expert_id="echo/model",
            node="echo",
            model="model",
            weight=1.0,
            latency_ms=1.0,
            energy_mj=2.0,
            status="ok",
        )
        if request.WhichOneof("input") == "points":
            grid = np.zeros((8, 8), np.uint8)
            grid[:4] = 1
            response.grid.CopyFrom(
                moesaic_pb2.Tensor(name="classes", datatype="UINT8", shape=[8, 8], data=grid.tobytes())
            )
        else:
            w, h = request.image.width or 1, request.image.height or 1
            response.detections.items.add(xyxy=[0, 0, w, h], score=0.9, class_id=0, class_name="vehicle")
        return response

    async def Perceive(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        self.times.append(time.monotonic())
        if request.task in self.fail_tasks:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"task {request.task!r} refused by the test"
            )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.respond(request)


@contextlib.asynccontextmanager
async def serve_coordinator(servicer: EchoCoordinator) -> AsyncIterator[str]:
    """A real grpc.aio server on a loopback port serving ``servicer``; yields its address."""
    server = grpc.aio.server()
    moesaic_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@pytest.fixture
def echo_coordinator() -> Callable[..., contextlib.AbstractAsyncContextManager[tuple[EchoCoordinator, str]]]:
    """``async with echo_coordinator(delay_s=...) as (servicer, address)``: a loopback coordinator."""

    @contextlib.asynccontextmanager
    async def start(**options: object) -> AsyncIterator[tuple[EchoCoordinator, str]]:
        servicer = EchoCoordinator(**options)  # type: ignore[arg-type]
        async with serve_coordinator(servicer) as address:
            yield servicer, address

    return start
