"""The KServe/Triton CUDA shared-memory extension, driven by tritonclient unchanged.

tritonclient runs in its own process (tests/helpers/triton_cuda_shm_client.py) against a real
node. On a host without a CUDA driver (this CPU machine) the node refuses a CUDA region by name
and does not list the extension; the GPU round trips are in tests/gpu/test_cuda_shared_memory.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from moesaic.nodes.server import NodeServer
from moesaic.runtime import cuda_ipc
from tests.helpers.nodes import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "helpers" / "triton_cuda_shm_client.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="needs tritonclient[grpc] (a dev dependency)"
)


def run_client(address: str, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), address, mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(cuda_ipc.available(), reason="this host has a CUDA driver (tests/gpu covers it)")
def test_a_node_without_cuda_refuses_cuda_regions_by_name(node: NodeServer) -> None:
    out = run_client(node.address, "refused")
    assert "cuda_shared_memory" not in out["extensions"]
    assert "system_shared_memory" in out["extensions"]
    assert out["no_cuda"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "CUDA shared memory needs a CUDA device: no CUDA driver" in out["no_cuda"]["message"]
    assert out["short_handle"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "expected the 64 bytes of a cudaIpcMemHandle_t, got 3" in out["short_handle"]["message"]
