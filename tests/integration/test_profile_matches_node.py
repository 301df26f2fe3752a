"""``moesaic profile`` times the node's own path, so its figures are what a node later reports.

The coordinator starts from profiles (its priors) and corrects them from replies; a profile
that timed the engine alone would under-predict every model with pre/post-processing.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import grpc
import numpy as np
import pytest

from moesaic.cli import main
from moesaic.nodes.codec import decode_response, encode_request
from moesaic.runtime.profiler import load_profile_file
from tests.helpers.nodes import running_node
from tests.helpers.onnx_models import write_matmul_model

INFER = "/inference.GRPCInferenceService/ModelInfer"


def test_profile_predicts_what_the_node_reports(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_matmul_model(models, "mm", model_yaml="engine: {type: onnxruntime, intra_op_threads: 1}\n")
    out = tmp_path / "profile.json"
    args = ["profile", "--models", str(models), "--device", "cpu", "--batch", "256", "--runs", "500"]
    assert main([*args, "--shape", "x=256x256", "--idle-seconds", "1.5", "--out", str(out)]) == 0
    (record,) = load_profile_file(out)
    assert set(record.stages_ms) == {"codec", "preprocess", "engine", "postprocess"}
    assert record.stages_ms["engine"] <= record.latency_ms.p50 * 1.05

    request = encode_request("mm", {"x": np.ones((256, 256), np.float32)})
    compute, energy = [], []
    with running_node(models) as node, grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary(INFER)
        for _ in range(40):  # the node's running energy figure settles
            call(request, timeout=10)
        for _ in range(500):
            params = decode_response(call(request, timeout=10))[0].parameters
            compute.append(params["compute_ms"].double_param)
            energy.append(params["energy_mj"].double_param)
    assert statistics.median(compute) == pytest.approx(record.latency_ms.p50, rel=0.20)
    assert statistics.median(energy) == pytest.approx(record.energy_mj_per_inference, rel=0.20)
