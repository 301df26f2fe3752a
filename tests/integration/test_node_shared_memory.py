"""The KServe/Triton system shared-memory extension, driven by tritonclient unchanged.

tritonclient runs in its own process (tests/helpers/triton_shm_client.py) against a real node:
an input read from one region, an output written into another, the status, unregistering, and
the errors of an unregistered region, a bad key and a name registered twice.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moesaic.nodes.server import NodeServer
from tests.helpers.nodes import REPO_ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None or not Path("/dev/shm").is_dir(),
    reason="needs tritonclient[grpc] (a dev dependency) and /dev/shm",
)

SCRIPT = REPO_ROOT / "tests" / "helpers" / "triton_shm_client.py"


def test_tritonclient_shared_memory_round_trip(node: NodeServer) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), node.address], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert "system_shared_memory" in out["extensions"]
    assert [name for name, _, _ in out["status"]] == ["in", "out"]
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for k in range(2):
        run = out[f"run{k}"]
        np.testing.assert_array_equal(run["y"], x * (k + 1) + 1)
        assert run["total"] == pytest.approx(float((x * (k + 1)).sum()))
        assert run["listed"] == ["total", "y"]  # the travelling output first, the region's after
    assert out["unregistered"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'nope' is not registered" in out["unregistered"]["message"]
    assert out["bad_key"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "expected a name like '/frame0'" in out["bad_key"]["message"]
    assert out["twice"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "already registered" in out["twice"]["message"]
    assert out["after_unregister"] == 0
