"""A hung engine: the node stops feeding systemd's watchdog and reports the model NOT_SERVING.

The node runs as the service would (``moesaic node`` under a fake systemd: ``$NOTIFY_SOCKET``
and ``WATCHDOG_USEC``), with one model whose engine blocks forever on a marked input.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moesaic.fleet import free_port
from moesaic.nodes.codec import encode_request
from tests.integration.ingest.test_services_notify import NotifySocket, notify, stop  # noqa: F401

pytestmark = pytest.mark.timeout(90)

REPO_ROOT = Path(__file__).resolve().parents[2]
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _health(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


def test_hung_engine_stops_the_watchdog_and_goes_not_serving(tmp_path: Path, notify: NotifySocket) -> None:  # noqa: F811
    repo = tmp_path / "models"
    (repo / "hang").mkdir(parents=True)
    (repo / "hang" / "model.yaml").write_text("engine: {type: test_hang}\n")
    config = tmp_path / "node.yaml"
    config.write_text("hang_timeout_s: 1.0\nprobe_interval_s: 300\n")
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    script = [sys.executable, str(REPO_ROOT / "tests" / "helpers" / "slow_node.py")]
    args = ["node", "--models", str(repo), "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen([*script, *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        notify.wait_for("READY=1", 30, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(INFER)
            # A normal request is answered, and the watchdog is fed.
            call(encode_request("hang", {"x": np.ones((1, 4), np.float32)}), timeout=10)
            notify.messages.clear()
            notify.collect(0.5)
            assert notify.messages.count("WATCHDOG=1") >= 3
            assert _health(channel, "hang") == health_pb2.HealthCheckResponse.SERVING
            # This one never comes back from the engine.
            stuck = np.full((1, 4), 13, np.float32)

            def never_answered() -> None:
                with contextlib.suppress(grpc.RpcError):  # DEADLINE_EXCEEDED after 8 s
                    call(encode_request("hang", {"x": stuck}), timeout=8)

            hung = threading.Thread(target=never_answered, daemon=True)
            hung.start()
            notify.collect(2.5)  # past hang_timeout_s and a monitor check
            notify.messages.clear()
            notify.collect(1.0)
            assert "WATCHDOG=1" not in notify.messages
            assert _health(channel, "hang") == health_pb2.HealthCheckResponse.NOT_SERVING
            # New requests are refused at once, naming the state, instead of queueing behind the hang.
            with pytest.raises(grpc.RpcError) as info:
                call(encode_request("hang", {"x": np.ones((1, 4), np.float32)}), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "hung" in (info.value.details() or "")
    finally:
        proc.kill()
        proc.wait()
