"""tritonclient[grpc], unchanged and in its own process, drives a moesaic node."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moesaic.nodes.server import NodeServer
from tests.helpers.nodes import REPO_ROOT

# Never import tritonclient here: its `inference.*` protobuf package clashes with moesaic's.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] is a dev dependency"
)

SCRIPT = REPO_ROOT / "tests" / "helpers" / "triton_client.py"
DATA = {
    "FP32": [[0.5, -1.0, 3.25]],
    "FP16": [[0.5, -1.0, 3.25]],
    "INT64": [[1099511627776, -1, 0]],
    "INT32": [[7, -1, 0]],
    "UINT8": [[0, 1, 255]],
    "BOOL": [[True, False, True]],
    "BYTES": [["a", "bc", ""]],
}


def _triton(address: str, model: str, request: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), address, model, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tritonclient_all_datatypes_batched(node: NodeServer, tmp_path: Path) -> None:
    batch = 3
    inputs = [
        {"name": f"x_{t.lower()}", "datatype": t, "shape": [batch, 3], "data": data * batch}
        for t, data in DATA.items()
    ]
    out = _triton(node.address, "echo", {"inputs": inputs}, tmp_path)
    assert out["live"] and out["ready"] and out["model_ready"]
    meta_in = {t["name"]: (t["datatype"], t["shape"]) for t in out["metadata"]["inputs"]}
    meta_out = {t["name"]: (t["datatype"], t["shape"]) for t in out["metadata"]["outputs"]}
    for t in DATA:
        assert meta_in[f"x_{t.lower()}"] == (t, [-1, 3])
        assert meta_out[f"x_{t.lower()}_out"] == (t, [-1, 3])
    assert "error" not in out, out.get("error")
    for spec in inputs:
        got = out["outputs"][f"{spec['name']}_out"]
        assert got["datatype"] == spec["datatype"] and got["shape"] == [batch, 3]
        expected = np.array(spec["data"]).reshape(-1).tolist()
        if spec["datatype"] == "FP16":
            np.testing.assert_allclose(np.array(got["data"]).reshape(-1), expected)
        else:
            assert np.array(got["data"]).reshape(-1).tolist() == expected, spec["name"]
    assert {"compute_ms", "energy_mj", "energy_source"} <= set(out["parameters"])


def test_tritonclient_requested_output_and_errors(node: NodeServer, tmp_path: Path) -> None:
    request = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2, 3, 4]] * 2}],
        "outputs": ["y"],
    }
    out = _triton(node.address, "add", request, tmp_path)
    assert list(out["outputs"]) == ["y"] and out["outputs"]["y"]["data"] == [[2, 3, 4, 5]] * 2
    bad = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}]}
    out = _triton(node.address, "add", bad, tmp_path)
    assert out["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': datatype INT32; expected FP32" in out["error"]["message"]
