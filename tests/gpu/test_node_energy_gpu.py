"""Attributed energy on a real GPU with NVML's counter (needs CUDA and NVML).

The same properties as ``tests/integration/test_node_energy.py`` proves on CPU with a stepping
counter, here with the real one: a node serving a compute-bound PyTorch model on ``cuda:0``,
loaded by one and then four clients of another process for 15 s each. With
``MOESAIC_RESULTS_DIR`` set, the run's figures are written there as JSON.
"""

from __future__ import annotations

import json
import os
import time
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


def _metric(port: int, name: str) -> float:
    """The sum of a Prometheus counter's samples on a node's /metrics."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@needs_nvml
def test_two_nodes_on_one_gpu_charge_its_dynamic_energy_once(tmp_path: Path) -> None:
    """Node A (this process) and node B (another process) serve the same model on ``cuda:0``.
    While only B works, A charges nothing and keeps its idle figure; while both work, what the
    two attribute adds up to the counter's dynamic energy once, not twice."""
    import threading

    from moesaic.fleet import ProcessTree, free_port, wait_grpc_ready
    from tests.helpers.energy_load import run_clients

    write_torch_mlp_model(tmp_path / "models", "mlp", model_yaml="engine: {type: torch, device: cuda:0}\n")
    port, metrics_port = free_port(), free_port()
    array = np.ones((512, 256), np.float32)
    (tmp_path / "logs").mkdir()
    with ProcessTree(tmp_path / "logs") as tree:
        process = tree.spawn(
            "node-b",
            ["moesaic", "node", "--models", str(tmp_path / "models"), "--device", "cuda:0",
             "--listen", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port)],
        )  # fmt: skip
        config = load_node_config(
            env={}, overrides={"listen": "127.0.0.1:0", "models": tmp_path / "models", "device": "cuda:0"}
        )
        node_a = NodeServer(config)
        node_a.start()
        try:
            assert node_a.wait_ready(120)
            wait_grpc_ready(f"127.0.0.1:{port}", timeout=180, process=process)
            source = node_a.cost.meter
            time.sleep(2.0)
            j0, t0 = source.joules(), time.monotonic()
            time.sleep(4.0)
            idle_w = (source.joules() - j0) / (time.monotonic() - t0)
            run_clients(f"127.0.0.1:{port}", "mlp", array, 1, 2.0)  # B warms up

            a0, b0, j1, t1 = (
                node_a.cost.snapshot(),
                _metric(metrics_port, "moesaic_model_energy_joules_total"),
                source.joules(),
                time.monotonic(),
            )
            run_clients(f"127.0.0.1:{port}", "mlp", array, 2, 10.0)
            time.sleep(0.6)
            a1, b1 = node_a.cost.snapshot(), _metric(metrics_port, "moesaic_model_energy_joules_total")
            dynamic_b_alone = source.joules() - j1 - idle_w * (time.monotonic() - t1)
            a_charged_while_b_worked = a1.attributed_joules - a0.attributed_joules
            idle_learnt = node_a.cost.idle_watts

            phase: dict[str, object] = {}
            a2, b2, j2, t2 = (
                node_a.cost.snapshot(),
                _metric(metrics_port, "moesaic_model_energy_joules_total"),
                source.joules(),
                time.monotonic(),
            )
            other = threading.Thread(
                target=lambda: phase.update(b=run_clients(f"127.0.0.1:{port}", "mlp", array, 1, 10.0))
            )
            other.start()
            phase["a"] = run_clients(node_a.address, "mlp", array, 1, 10.0)
            other.join()
            time.sleep(0.6)
            a3, b3 = node_a.cost.snapshot(), _metric(metrics_port, "moesaic_model_energy_joules_total")
            dynamic_both = source.joules() - j2 - idle_w * (time.monotonic() - t2)
        finally:
            node_a.stop(grace=0)
    summary = {
        "idle_w_measured": idle_w,
        "idle_w_learnt_by_a": idle_learnt,
        "b_alone": {
            "dynamic_j": dynamic_b_alone,
            "a_charged_j": a_charged_while_b_worked,
            "b_charged_j": b1 - b0,
        },
        "both": {
            "dynamic_j": dynamic_both,
            "a_charged_j": a3.attributed_joules - a2.attributed_joules,
            "b_charged_j": b3 - b2,
            "a_foreign_j": a3.foreign_joules - a2.foreign_joules,
        },
    }
    if os.environ.get("MOESAIC_RESULTS_DIR"):
        out = Path(os.environ["MOESAIC_RESULTS_DIR"]) / "node_energy_two_nodes_gpu_test.json"
        out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    assert a_charged_while_b_worked <= 0.05 * dynamic_b_alone, summary
    assert idle_learnt == pytest.approx(idle_w, rel=0.05), summary
    both = summary["both"]
    assert both["a_charged_j"] + both["b_charged_j"] == pytest.approx(dynamic_both, rel=0.15), summary
