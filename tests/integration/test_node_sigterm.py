"""SIGTERM on a node process: health goes NOT_SERVING first, the in-flight request finishes, exit 0."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moesaic.nodes.codec import decode_response, encode_request
from tests.helpers.nodes import REPO_ROOT, node_process
from tests.helpers.onnx_models import write_add_model


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    write_add_model(tmp_path, "slow", model_yaml="processor: {type: test_sleep, seconds: 1.5}\n")
    script = [sys.executable, str(REPO_ROOT / "tests" / "helpers" / "slow_node.py")]
    with node_process(tmp_path, script=script) as (proc, address), grpc.insecure_channel(address) as channel:
        events: list[tuple[float, str]] = []
        result: dict[str, Any] = {}

        def watch() -> None:
            health = health_pb2_grpc.HealthStub(channel)
            try:
                for reply in health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20):
                    events.append(
                        (time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                    )
            except grpc.RpcError:
                pass

        def infer() -> None:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            try:
                reply = call(encode_request("slow", {"x": np.ones((1, 4), np.float32)}), timeout=20)
                result["outputs"] = decode_response(reply)[1]
            except grpc.RpcError as exc:
                result["error"] = exc
            result["done"] = time.monotonic()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        worker = threading.Thread(target=infer)
        worker.start()
        time.sleep(0.5)  # the request is now sleeping inside the node
        proc.send_signal(signal.SIGTERM)
        worker.join(20)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        watcher.join(5)

    assert "error" not in result, result.get("error")
    np.testing.assert_array_equal(result["outputs"]["y"], np.full((1, 4), 2, np.float32))
    statuses = [s for _, s in events]
    assert statuses[0] == "SERVING" and "NOT_SERVING" in statuses
    not_serving_at = next(t for t, s in events if s == "NOT_SERVING")
    assert not_serving_at < result["done"], "health must go NOT_SERVING before the in-flight request ends"
