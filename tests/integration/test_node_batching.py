"""Dynamic batching on a real node: concurrent requests merge into one ONNX Runtime call.

The ``probe`` models return ``rows``: the first dimension the engine was called with, so each
reply shows the batch it ran in; the node's ``moesaic_batch_*`` histograms count engine calls.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from moesaic.nodes.codec import decode_response, encode_request, from_parameters
from moesaic.nodes.server import NodeServer
from tests.helpers.nodes import node_process, running_node
from tests.helpers.onnx_models import write_batch_probe_model, write_gather_model

INFER = "/inference.GRPCInferenceService/ModelInfer"
LONG = 20_000_000  # us: batches in these tests go because they are full, never by the delay


@pytest.fixture(scope="module")
def batching_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    root = tmp_path_factory.mktemp("batching-models")
    write_batch_probe_model(root, "plain")
    write_batch_probe_model(
        root, "probe", model_yaml=f"dynamic_batching: {{max_batch_size: 4, max_queue_delay_us: {LONG}}}\n"
    )
    write_batch_probe_model(
        root,
        "pairs",
        model_yaml="dynamic_batching:\n  max_batch_size: 8\n"
        f"  max_queue_delay_us: {LONG}\n  preferred_batch_sizes: [2]\n",
    )
    write_gather_model(
        root, "gather", model_yaml=f"dynamic_batching: {{max_batch_size: 4, max_queue_delay_us: {LONG}}}\n"
    )
    with running_node(root, max_workers=16) as node:
        yield node


def _call(node: NodeServer, model: str, inputs: dict[str, np.ndarray], timeout: float = 30) -> Any:
    """(outputs, parameters) of one ModelInfer, or the ``grpc.RpcError``."""
    with grpc.insecure_channel(node.address) as channel:
        try:
            reply = channel.unary_unary(INFER)(encode_request(model, inputs), timeout=timeout)
        except grpc.RpcError as exc:
            return exc
    header, outputs = decode_response(reply)
    return outputs, from_parameters(header.parameters)


def _concurrently(node: NodeServer, model: str, requests: Sequence[dict[str, np.ndarray]]) -> list[Any]:
    start = threading.Barrier(len(requests))

    def one(inputs: dict[str, np.ndarray]) -> Any:
        start.wait()
        return _call(node, model, inputs)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def _batches(node: NodeServer, model: str) -> tuple[float, float]:
    """(engine calls, requests merged into them) of ``model`` so far, from the node's metrics."""
    registry = node.metrics.registry
    calls = registry.get_sample_value("moesaic_batch_requests_count", {"expert": model}) or 0.0
    merged = registry.get_sample_value("moesaic_batch_requests_sum", {"expert": model}) or 0.0
    return calls, merged


def test_concurrent_requests_merge_into_one_engine_call(batching_node: NodeServer) -> None:
    rng = np.random.default_rng(0)
    requests = [{"x": rng.normal(size=(n, 3)).astype(np.float32)} for n in (1, 2, 1)]
    calls_before, merged_before = _batches(batching_node, "probe")
    replies = _concurrently(batching_node, "probe", requests)
    calls, merged = _batches(batching_node, "probe")
    assert (calls - calls_before, merged - merged_before) == (1, 3)  # 3 requests, 1 engine call
    assert batching_node.metrics.registry.get_sample_value("moesaic_batch_rows_sum", {"expert": "probe"}) >= 4
    for inputs, reply in zip(requests, replies, strict=True):
        assert not isinstance(reply, grpc.RpcError), reply
        outputs, params = reply
        assert outputs["rows"].tolist() == [4] * len(inputs["x"])  # ran in a batch of 4 rows
        alone, _ = _call(batching_node, "plain", inputs)  # the same model without batching
        np.testing.assert_array_equal(outputs["y"], alone["y"])
        assert alone["rows"].tolist() == [len(inputs["x"])] * len(inputs["x"])
        assert params["compute_ms"] > 0 and params["energy_mj"] >= 0 and params["energy_source"]


def test_requests_of_other_shapes_are_not_merged(batching_node: NodeServer) -> None:
    requests = [{"x": np.full((1, f), i, np.float32)} for i, f in enumerate([3, 5, 3, 5])]
    calls_before, merged_before = _batches(batching_node, "pairs")
    replies = _concurrently(batching_node, "pairs", requests)
    assert _batches(batching_node, "pairs") == (calls_before + 2, merged_before + 4)
    # one batch of two per shape (preferred size 2): 4 requests, 2 engine calls
    for inputs, reply in zip(requests, replies, strict=True):
        assert not isinstance(reply, grpc.RpcError), reply
        outputs, _ = reply
        assert outputs["rows"].tolist() == [2]
        np.testing.assert_array_equal(outputs["y"], inputs["x"] * 2 + 1)


def test_a_failing_batch_fails_every_member_and_the_node_keeps_serving(batching_node: NodeServer) -> None:
    requests = [{"idx": np.array([i], np.int64)} for i in (0, 1, 99, 2)]  # 99: out of the table
    replies = _concurrently(batching_node, "gather", requests)
    for reply in replies:
        assert isinstance(reply, grpc.RpcError)
        assert reply.code() == grpc.StatusCode.INTERNAL
        assert "batch of 4 requests (4 rows) failed" in reply.details() and "idx=99" in reply.details()
    good = _concurrently(batching_node, "gather", [{"idx": np.array([i], np.int64)} for i in (3, 2, 1, 0)])
    assert [r[0]["row"].tolist() for r in good] == [[[30, 31]], [[20, 21]], [[10, 11]], [[0, 1]]]
    errors = batching_node.metrics.registry.get_sample_value(
        "moesaic_requests_total", {"method": "ModelInfer", "code": "INTERNAL"}
    )
    assert errors is not None and errors >= 4


def test_deadline_passing_in_the_queue(batching_node: NodeServer) -> None:
    registry = batching_node.metrics.registry
    labels = {"method": "ModelInfer", "code": "DEADLINE_EXCEEDED"}
    before = registry.get_sample_value("moesaic_requests_total", labels) or 0.0
    calls_before, _ = _batches(batching_node, "probe")
    reply = _call(batching_node, "probe", {"x": np.ones((1, 3), np.float32)}, timeout=0.3)
    assert isinstance(reply, grpc.RpcError) and reply.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5  # the node itself gave up on it, took it out of the queue
    while (registry.get_sample_value("moesaic_requests_total", labels) or 0.0) == before:
        assert time.monotonic() < deadline, "the node did not record DEADLINE_EXCEEDED"
        time.sleep(0.02)
    batcher = batching_node.models["probe"].batcher
    assert batcher is not None and batcher.queued() == 0
    assert _batches(batching_node, "probe")[0] == calls_before  # it never reached the engine


def test_sigterm_sends_queued_requests_at_once(tmp_path: Path) -> None:
    write_batch_probe_model(
        tmp_path, "probe", model_yaml=f"dynamic_batching: {{max_batch_size: 8, max_queue_delay_us: {LONG}}}\n"
    )
    with node_process(tmp_path) as (proc, address), grpc.insecure_channel(address) as channel:
        result: dict[str, Any] = {}

        def infer() -> None:
            try:
                reply = channel.unary_unary(INFER)(
                    encode_request("probe", {"x": np.ones((1, 3), np.float32)}), timeout=30
                )
                result["outputs"] = decode_response(reply)[1]
            except grpc.RpcError as exc:
                result["error"] = exc

        worker = threading.Thread(target=infer)
        started = time.monotonic()
        worker.start()
        time.sleep(0.5)  # queued, waiting up to 20 s for company
        proc.send_signal(signal.SIGTERM)
        worker.join(15)
        assert proc.wait(timeout=15) == 0, proc.stderr.read() if proc.stderr else ""
    assert "error" not in result, result.get("error")
    assert result["outputs"]["rows"].tolist() == [1]
    assert time.monotonic() - started < 8  # not the 20 s delay, nor the 10 s grace
