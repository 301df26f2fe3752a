"""Free ports and readiness: a gRPC server is ready when its health service says SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["free_port", "wait_grpc_ready", "wait_grpc_serving"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_grpc_ready(
    address: str,
    *,
    service: str = "",
    timeout: float = 60.0,
    process: subprocess.Popen[Any] | None = None,
) -> None:
    """Poll the gRPC health ``service`` ("" = the server) on ``address`` until SERVING.

    :class:`TimeoutError` after ``timeout`` seconds; :class:`RuntimeError` as soon as ``process``
    (the server's, when known) exits.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with {process.returncode}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{address} not SERVING within {timeout:.0f} s")
            time.sleep(0.1)


async def wait_grpc_serving(
    address: str,
    *,
    service: str = "",
    timeout: float = 60.0,
    check: Callable[[], None] | None = None,
) -> None:
    """The asyncio form of :func:`wait_grpc_ready`: ``check`` is called on every poll and may
    raise to give up early (e.g. when a child of a :class:`~moesaic.fleet.ProcessTree` died)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if check is not None:
                check()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{address} not SERVING within {timeout:.0f} s")
            await asyncio.sleep(0.2)
