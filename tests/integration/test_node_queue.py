"""Queue truth through a real node: replies carry the queue, expired requests are never computed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from moesaic.nodes.codec import decode_response, encode_request
from tests.helpers import slow_node  # noqa: F401  (registers the test_sleep processor in-process)
from tests.helpers.nodes import running_node
from tests.helpers.onnx_models import write_add_model

INFER = "/inference.GRPCInferenceService/ModelInfer"
X = {"x": np.ones((1, 4), np.float32)}


def _sample(node: Any, name: str, **labels: str) -> float:
    node.plane.flush_metrics()
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def test_replies_carry_the_queue_and_expired_requests_never_run(tmp_path: Path) -> None:
    write_add_model(tmp_path, "slow", model_yaml="processor: {type: test_sleep, seconds: 0.4}\n")
    with running_node(tmp_path) as node, grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary(INFER)
        replies: list[Any] = []

        def one() -> None:
            replies.append(decode_response(call(encode_request("slow", X), timeout=30))[0].parameters)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        until = time.monotonic() + 10
        while node.plane.queues["slow"].state().depth < 3 and time.monotonic() < until:
            time.sleep(0.005)
        # Queued behind ~1 s of work with 150 ms to live: dropped by the node, not computed.
        with pytest.raises(grpc.RpcError) as info:
            call(encode_request("slow", X, parameters={"deadline_ms": 150.0}), timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "not computed" in (info.value.details() or "")
        for t in threads:
            t.join(30)

        assert len(replies) == 3
        depths = sorted(int(p["queue_depth"].int64_param) for p in replies)
        waits = [p["expected_wait_ms"].double_param for p in replies]
        queued = sorted(p["queue_ms"].double_param for p in replies)
        assert depths[-1] >= 1 and max(waits) > 0  # the first to finish saw the others queued
        assert queued[0] < 100 and queued[-1] > 600  # the last one waited for two others
        assert _sample(node, "moesaic_requests_expired_total", model="slow") == 1
        assert _sample(node, "moesaic_expert_latency_seconds_count", expert="slow") == 3  # 3 ran, not 4


@pytest.mark.parametrize("value", ["soon", "-5", "0", "nan", "inf"])
def test_a_bad_deadline_parameter_is_invalid_argument(tmp_path: Path, value: str) -> None:
    write_add_model(tmp_path, "add")
    with running_node(tmp_path) as node, grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary(INFER)
        with pytest.raises(grpc.RpcError) as info:
            call(encode_request("add", X, parameters={"deadline_ms": value}), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "deadline_ms" in (info.value.details() or "")
