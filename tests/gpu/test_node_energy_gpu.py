"""Attributed energy on a real GPU with NVML's counter (needs CUDA and NVML).

The same properties as ``tests/integration/test_node_energy.py`` proves on CPU with a stepping
counter, here with the real one: a node serving a compute-bound PyTorch model on ``cuda:0``,
loaded by one and then four clients of another process for 15 s each. With
``MOESAIC_RESULTS_DIR`` set, the run's figures are written there as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesaic.nodes.config import load_node_config  # noqa: E402
from moesaic.nodes.server import NodeServer  # noqa: E402
from moesaic.runtime.energy import detect_energy_source  # noqa: E402
from tests.helpers.energy_load import measure_energy  # noqa: E402
from tests.helpers.torch_models import write_torch_mlp_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

needs_nvml = pytest.mark.skipif(
    not torch.cuda.is_available() or detect_energy_source("cuda") != "nvml",
    reason="needs a CUDA device with NVML",
)


@needs_nvml
def test_nvml_energy_is_attributed_without_double_counting(tmp_path: Path) -> None:
    write_torch_mlp_model(tmp_path, "mlp", model_yaml="engine: {type: torch, device: cuda:0}\n")
    config = load_node_config(
        env={}, overrides={"listen": "127.0.0.1:0", "models": tmp_path, "device": "cuda:0"}
    )
    node = NodeServer(config)
    node.start()
    try:
        assert node.wait_ready(120)
        assert node.cost.source == "nvml+attributed"
        run = measure_energy(node, "mlp", np.ones((512, 256), np.float32), seconds=15.0, idle_s=5.0)
    finally:
        node.stop(grace=0)
    summary = run.summary()
    if os.environ.get("MOESAIC_RESULTS_DIR"):
        out = Path(os.environ["MOESAIC_RESULTS_DIR"]) / "node_energy_gpu_test.json"
        out.write_text(json.dumps(summary, indent=2))
    assert abs(run.sum_error) <= 0.10, summary
    one, four = run.phases
    assert one.cv <= 0.25 and four.cv <= 0.25, summary
    assert four.mean_mj == pytest.approx(one.mean_mj, rel=0.15), summary
