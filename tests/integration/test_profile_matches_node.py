"""``moesaic profile`` times the node's own path, so its figures are what a node later reports.

The coordinator starts from profiles (its priors) and corrects them from replies; a profile
that timed the engine alone would under-predict every model with pre/post-processing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from moesaic.nodes.codec import decode_response, encode_request
from moesaic.runtime.profiler import ProfileRecord, load_profile_file
from tests.helpers.nodes import REPO_ROOT, node_process
from tests.helpers.onnx_models import write_matmul_model

INFER = "/inference.GRPCInferenceService/ModelInfer"


def test_profile_predicts_what_the_node_reports(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_matmul_model(models, "mm", model_yaml="engine: {type: onnxruntime, intra_op_threads: 1}\n")
    # Both in processes of their own, as users run them (the test process holds other threads);
    # the profile runs before and after the node, so drift of this shared machine cancels.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    def profile(out: Path) -> ProfileRecord:
        args = ["profile", "--models", str(models), "--device", "cpu", "--batch", "256", "--runs", "500"]
        args += ["--shape", "x=256x256", "--idle-seconds", "1.5", "--out", str(out)]
        command = [sys.executable, "-m", "moesaic", *args]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        (record,) = load_profile_file(out)
        assert set(record.stages_ms) == {"codec", "preprocess", "engine", "postprocess"}
        assert record.stages_ms["engine"] <= record.latency_ms.p50 * 1.05
        return record

    before = profile(tmp_path / "before.json")
    request = encode_request("mm", {"x": np.ones((256, 256), np.float32)})
    compute, energy = [], []
    with node_process(models) as (_, address), grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)
        for _ in range(40):  # the node's running energy figure settles
            call(request, timeout=10)
        for _ in range(500):
            params = decode_response(call(request, timeout=10))[0].parameters
            compute.append(params["compute_ms"].double_param)
            energy.append(params["energy_mj"].double_param)
    after = profile(tmp_path / "after.json")
    predicted_ms = (before.latency_ms.p50 + after.latency_ms.p50) / 2
    predicted_mj = (before.energy_mj_per_inference + after.energy_mj_per_inference) / 2
    seen = (
        f"node {statistics.median(compute):.3f} ms, {statistics.median(energy):.2f} mJ; profile "
        f"{before.latency_ms.p50:.3f} / {after.latency_ms.p50:.3f} ms, {predicted_mj:.2f} mJ"
    )
    print(seen)  # pytest -s: the figures of a passing run too
    # The issue's ±20 %. The profile's calls arrive as the node's requests do (a pool of
    # threads, a gap between calls): the node's p50 came within 6 % of the profile's quiet and
    # 12-15 % below it beside three bursty processes, where a back-to-back loop on one thread
    # once measured 2.4x (BENCHMARKS.md section 12).
    assert statistics.median(compute) == pytest.approx(predicted_ms, rel=0.20), seen
    # Energy here is the estimate meter's watts x mean busy time, so it carries scheduling
    # tails: within 6 % quiet; beside bursty processes the node's figure came 15-35 % below the
    # profile's (13.4 vs 20.4 mJ on 2026-12-03): 50 %.
    assert statistics.median(energy) == pytest.approx(predicted_mj, rel=0.50), seen
