"""A GPU node never serves a model on the CPU behind the user's back.

This machine has no GPU, so the node is told its device is ``cuda:0`` (the one fake: a device
that cannot exist here); ONNX Runtime then really has no GPU provider, which is the case to catch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moesaic.nodes.config import load_node_config
from moesaic.nodes.server import NodeServer
from moesaic.nodes.servicer import NodeServicer
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.energy import EstimateMeter
from tests.helpers.onnx_models import write_add_model

GPU = DeviceInfo(
    kind="cuda",
    name="a GPU",
    memory_bytes=0,
    power_limit_watts=0.0,
    cores=0,
    energy_source="estimate",
    id="cuda:0",
)


def _node(models: Path, **overrides: object) -> NodeServer:
    config = load_node_config(env={}, overrides={"listen": "127.0.0.1:0", "models": models, **overrides})
    return NodeServer(config, device=GPU, meter=EstimateMeter(10.0))


def test_a_gpu_node_whose_model_would_run_on_cpu_refuses_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_add_model(tmp_path, "add")
    node = _node(tmp_path)
    assert node.run() == 2
    model = node.models["add"]
    assert model.state == "failed" and "would run on cpu, not cuda:0" in model.error
    assert "onnxruntime-gpu" in model.error and "--allow-cpu-fallback" in model.error
    assert any("would run on cpu" in r.getMessage() for r in caplog.records)


def test_allowed_fallback_serves_on_cpu_and_says_so(tmp_path: Path) -> None:
    write_add_model(tmp_path, "add")
    node = _node(tmp_path, allow_cpu_fallback=True)
    node.start()
    try:
        assert node.wait_ready(60)
        model = node.models["add"]
        assert model.ready and model.device == "cpu" and model.provider == "CPUExecutionProvider"
        labels = {"model": "add", "version": "1", "engine": "onnxruntime", "device": "cpu"}
        info = node.metrics.registry.get_sample_value(
            "moesaic_model_info", {**labels, "provider": "CPUExecutionProvider"}
        )
        assert info == 1.0
        described = NodeServicer(node.config.node_id, node.device, node.plane, []).Describe(None, None)
        (desc,) = described.models
        assert (desc.engine, desc.device, desc.provider) == ("onnxruntime", "cpu", "CPUExecutionProvider")
    finally:
        node.stop(grace=0)
