"""``--metrics-port``: Prometheus /metrics of a real node after a few inferences, scraped over HTTP."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moesaic.nodes.codec import encode_request
from tests.helpers.nodes import free_port, running_node
from tests.helpers.onnx_models import write_add_model, write_batch_probe_model

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_metrics_endpoint_counts_inferences(tmp_path: Path) -> None:
    write_add_model(tmp_path, "add")
    write_batch_probe_model(
        tmp_path, "probe", model_yaml="dynamic_batching: {max_batch_size: 4, max_queue_delay_us: 0}\n"
    )
    port = free_port()
    with running_node(tmp_path, metrics_port=port) as node, grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary(INFER)
        for n in (1, 2, 3):
            call(encode_request("add", {"x": np.ones((n, 4), np.float32)}), timeout=10)
        call(encode_request("probe", {"x": np.ones((2, 3), np.float32)}), timeout=10)
        for request, code in [
            (encode_request("add", {"x": np.ones((1, 5), np.float32)}), grpc.StatusCode.INVALID_ARGUMENT),
            (encode_request("nope", {"x": np.ones((1, 4), np.float32)}), grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == code
        time.sleep(3 * node.config.energy_interval_s)  # the cost meter closes its intervals
        samples = _scrape(port)
        device = node.device.id

    # per-expert latency histogram: one observation per successful request, in buckets
    assert samples[_key("moesaic_expert_latency_seconds_count", expert="add")] == 3
    assert samples[_key("moesaic_expert_latency_seconds_count", expert="probe")] == 1
    assert samples[_key("moesaic_expert_latency_seconds_bucket", expert="add", le="+Inf")] == 3
    assert 0 < samples[_key("moesaic_expert_latency_seconds_sum", expert="add")] < 10
    # energy: the device's counter, its idle draw, and what was attributed to each model
    device_j = samples[_key("moesaic_device_energy_joules_total", device=device)]
    attributed = [
        samples[_key("moesaic_model_energy_joules_total", model=m, device=device)] for m in ("add", "probe")
    ]
    assert device_j > 0 and all(j > 0 for j in attributed)
    assert _key("moesaic_device_idle_watts", device=device) in samples
    assert samples[_key("moesaic_requests_expired_total", model="add")] == 0
    # requests by status code
    assert samples[_key("moesaic_requests_total", method="ModelInfer", code="OK")] == 4
    assert samples[_key("moesaic_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")] == 1
    assert samples[_key("moesaic_requests_total", method="ModelInfer", code="NOT_FOUND")] == 1
    # dynamic batching: engine calls and rows
    assert samples[_key("moesaic_batch_requests_count", expert="probe")] == 1
    assert samples[_key("moesaic_batch_rows_sum", expert="probe")] == 2
    assert samples[_key("moesaic_up", component="node")] == 1


def test_metrics_port_is_freed_on_stop(tmp_path: Path) -> None:
    write_add_model(tmp_path, "add")
    port = free_port()
    with running_node(tmp_path, metrics_port=port):
        assert _scrape(port)
    with running_node(tmp_path, metrics_port=port):  # binding again works: the old server is gone
        assert _scrape(port)[_key("moesaic_up", component="node")] == 1
