"""Shared fixtures: small ONNX model repositories and real node servers on loopback.

- ``model_repo``: a folder with ``echo`` (identity over FP32/FP16/INT64/INT32/UINT8/BOOL/BYTES
  inputs ``x_<type>``, outputs ``x_<type>_out``, batch dimension dynamic) and ``add``
  (``y = x + 1``, ``total = sum(x)``).
- ``node``: an in-process node serving ``model_repo`` on a free port (``node.address``).
- helpers: ``tests.helpers.onnx_models`` (build models), ``tests.helpers.nodes`` (start nodes
  in-process or as subprocesses), ``tests.helpers.certs`` (TLS material).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.helpers` importable however pytest is started
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from moesaic.nodes.server import NodeServer  # noqa: E402
from tests.helpers.nodes import running_node  # noqa: E402
from tests.helpers.onnx_models import write_add_model, write_identity_model  # noqa: E402

ECHO_TYPES = ("FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES")


def build_model_repo(root: Path) -> Path:
    """The standard test repository (see module docstring) under ``root``."""
    write_identity_model(root, "echo", [(f"x_{t.lower()}", t, (-1, 3)) for t in ECHO_TYPES])
    write_add_model(root, "add", model_yaml="task: test\nmax_batch_size: 8\ndescription: x + 1\n")
    return root


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    repo = build_model_repo(tmp_path_factory.mktemp("node-models"))
    with running_node(repo, max_message_bytes=8 << 20) as server:
        yield server
