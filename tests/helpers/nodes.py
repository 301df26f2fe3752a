"""Start real node servers for tests: in-process (:func:`running_node`) or as a subprocess
(:func:`node_process`), each on a free loopback port, and wait until they are ready."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from moesaic.fleet import free_port
from moesaic.nodes.config import load_node_config
from moesaic.nodes.server import NodeServer
from moesaic.proto import inference_pb2, inference_pb2_grpc

__all__ = ["REPO_ROOT", "free_port", "node_process", "running_node", "wait_server_ready"]

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_node(models: Path, **overrides: Any) -> Iterator[NodeServer]:
    """An in-process :class:`NodeServer` on ``127.0.0.1:0``, models loaded; stopped on exit."""
    config = load_node_config(env={}, overrides={"listen": "127.0.0.1:0", "models": models, **overrides})
    node = NodeServer(config)
    node.start()
    try:
        if not node.wait_ready(60):
            raise TimeoutError("node did not load its models within 60 s")
        yield node
    finally:
        node.stop(grace=0)


def wait_server_ready(
    address: str, timeout: float = 30.0, *, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Poll ServerReady on ``address`` until true; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"node exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            with contextlib.suppress(grpc.RpcError):
                if stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=1).ready:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"node at {address} not ready after {timeout} s")


@contextlib.contextmanager
def node_process(
    models: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    script: Sequence[str] | None = None,
    wait: bool = True,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m moesaic node`` (or ``script``) on a free port; yields (process, address)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [
        *(script or [sys.executable, "-m", "moesaic"]),
        "node",
        "--models",
        str(models),
        "--listen",
        address,
        *args,
    ]
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if wait:
            wait_server_ready(address, proc=proc)
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
