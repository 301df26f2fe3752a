"""Provider choice without a GPU: the node's cache folder, the TensorRT probe, output shapes a
CUDA graph's buffers are bound to (the shapes logic runs against a CPU session)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from moesaic.runtime.ort_binding import DeviceBinding, is_torch_cuda
from moesaic.runtime.ort_providers import TENSORRT, cache_dir, provider_options, tensorrt_problem
from tests.helpers.onnx_models import write_add_model

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MOESAIC_CACHE_DIR": "/a", "CACHE_DIRECTORY": "/b", "XDG_CACHE_HOME": "/c"}, "/a/x"),
        ({"CACHE_DIRECTORY": "/b:/other", "XDG_CACHE_HOME": "/c"}, "/b/x"),
        ({"XDG_CACHE_HOME": "/c"}, "/c/moesaic/x"),
    ],
)
def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for key in ("MOESAIC_CACHE_DIR", "CACHE_DIRECTORY", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cache_dir("x") == Path(expected)


def test_tensorrt_probe_runs_once_and_names_the_extra(caplog: pytest.LogCaptureFixture) -> None:
    tensorrt_problem.cache_clear()
    with caplog.at_level(logging.INFO, logger="moesaic.runtime.ort_providers"):
        problems = {tensorrt_problem() for _ in range(3)}
    (problem,) = problems
    if problem is None:
        pytest.skip("TensorRT's libraries load on this machine")
    assert "libnvinfer" in problem and "moesaic[tensorrt]" in problem
    assert sum("TensorRT execution provider not used" in r.getMessage() for r in caplog.records) == 1


def test_tensorrt_options_put_the_engine_cache_in_the_cache_folder(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add")
    options = provider_options(
        TENSORRT,
        device_id=1,
        model_file=folder / "model.onnx",
        cuda_graph=False,
        fp16=True,
        tensorrt_cache=tmp_path / "cache",
    )
    cache = Path(options["trt_engine_cache_path"])
    assert cache.parent == tmp_path / "cache" and cache.name.startswith("add-") and cache.is_dir()
    assert options["trt_fp16_enable"] == "True" and options["device_id"] == 1


def test_graph_output_shapes_resolve_symbolic_dims_from_the_inputs(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    binding = DeviceBinding(ort, session, ["y", "total"], device_id=0, cuda_graph=True)
    assert binding._output_shapes({"x": np.zeros((3, 4), np.float32)}) == [[3, 4], []]
    assert not is_torch_cuda(np.zeros(2))
