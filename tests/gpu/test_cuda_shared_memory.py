"""CUDA shared memory on a real GPU: a client's GPU allocation read and written by a real node.

The client runs in its own process (tests/helpers/triton_cuda_shm_client.py), as a CUDA IPC
handle cannot be opened by the process that made it. Regions come from tritonclient's own
``cuda_shared_memory`` utilities (skipped without cuda-python) and from
:func:`moesaic.runtime.cuda_ipc.export`. Skipped where there is no CUDA driver or device.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from moesaic.nodes.server import NodeServer
from moesaic.runtime import cuda_ipc
from tests.integration.test_node_cuda_shared_memory import run_client

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_ipc.available(), reason=f"needs a CUDA device: {cuda_ipc.driver_problem()}"),
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="needs tritonclient[grpc]"),
]

MODES = [
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("cuda") is None, reason="tritonclient's CUDA utilities need cuda-python"
        ),
    ),
    "moesaic",
]


@pytest.mark.parametrize("mode", MODES)
def test_cuda_regions_round_trip(node: NodeServer, mode: str) -> None:
    out = run_client(node.address, mode)
    assert "cuda_shared_memory" in out["extensions"]
    assert out["status"] == [["in", 0, 48], ["out", 0, 48]]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for k in range(2):
        run = out[f"run{k}"]
        np.testing.assert_array_equal(run["y"], x * (k + 1) + 1)  # written into the GPU region
        assert run["total"] == pytest.approx(float((x * (k + 1)).sum()))
        assert run["listed"] == ["total", "y"]
    assert out["outside"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "exceed CUDA region 'in'" in out["outside"]["message"]
    assert "already registered" in out["twice"]["message"]
    assert out["too_large"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "exceeds the" in out["too_large"]["message"]
    assert out["after_unregister"] == 0
    assert "'in' is not registered" in out["after_unregister_infer"]["message"]
