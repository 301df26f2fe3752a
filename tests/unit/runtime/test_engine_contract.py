"""One contract, every backend: the same model (``y = x + 1``, ``total = sum(x)``) served by
ONNX Runtime, PyTorch (TorchScript and torch.export) and TensorRT (where importable) must
load with warm-up, report ready, describe itself, infer correctly, reject bad input with a
``ValueError`` naming the tensor, and close idempotently. The last test serves the model
through the torch backend from a real node over gRPC."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moesaic.runtime.energy import ENERGY_SOURCES
from moesaic.runtime.engine import Engine, EngineError, create_engine
from tests.helpers.onnx_models import write_add_model
from tests.helpers.torch_models import write_torch_add_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


def _tensorrt_usable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


# backend id -> (build the model folder, engine config, the method load() must call to warm up)
Backend = tuple[Callable[[Path], Path], dict[str, Any], str]
BACKENDS: dict[str, Backend] = {
    "onnxruntime": (lambda root: write_add_model(root, "add"), {"type": "onnxruntime"}, "infer"),
    "torch-torchscript": (
        lambda root: write_torch_add_model(root, "add", "torchscript"),
        {"type": "torch", "device": "cpu"},
        "_forward",
    ),
    "torch-export": (
        lambda root: write_torch_add_model(root, "add", "export"),
        {"type": "torch", "device": "cpu"},
        "_forward",
    ),
    "tensorrt": (lambda root: write_add_model(root, "add"), {"type": "tensorrt"}, "_run"),
}
PARAMS = [
    pytest.param(name, marks=[pytest.mark.tensorrt, pytest.mark.gpu]) if name == "tensorrt" else name
    for name in BACKENDS
]


@pytest.fixture(params=PARAMS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Engine, list[int]]:
    """(backend type, an engine not yet loaded, a list counting warm-up calls)."""
    name = request.param
    if name == "tensorrt" and not _tensorrt_usable():
        pytest.skip("tensorrt is not importable or there is no CUDA device")
    build, config, warm_method = BACKENDS[name]
    folder = build(tmp_path)
    engine = create_engine(config, folder)
    calls: list[int] = []
    inner = getattr(engine, warm_method)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return inner(*args, **kwargs)

    setattr(engine, warm_method, counting)  # instance attribute: the backend's own calls go through it
    return config["type"], engine, calls


def test_lifecycle(backend: tuple[str, Engine, list[int]]) -> None:
    kind, engine, calls = backend
    assert not engine.ready
    with pytest.raises(EngineError):
        engine.describe()
    engine.load()
    try:
        assert engine.ready
        assert calls, "load() must warm the model up"
        warmed = len(calls)
        desc = engine.describe()
        assert desc.backend == kind == engine.backend
        assert [(s.name, s.datatype, len(s.shape)) for s in desc.inputs] == [("x", "FP32", 2)]
        assert sorted(s.name for s in desc.outputs) == ["total", "y"]
        for batch in (1, 3):
            x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
            out = engine.infer({"x": x})
            np.testing.assert_allclose(out["y"], x + 1)
            assert out["y"].dtype == np.float32
            assert float(out["total"]) == pytest.approx(float(x.sum()))
        assert len(calls) >= warmed
    finally:
        engine.close()
    assert not engine.ready
    engine.close()  # idempotent
    with pytest.raises(EngineError):
        engine.infer({"x": np.zeros((1, 4), np.float32)})


@pytest.mark.parametrize(
    "inputs",
    [
        {"x": np.zeros((1, 4), np.float64)},  # wrong datatype
        {"x": np.zeros((4,), np.float32)},  # wrong rank
        {"x": np.zeros((1, 5), np.float32)},  # wrong fixed dimension
        {},  # missing input
        {"x": np.zeros((1, 4), np.float32), "z": np.zeros((1, 4), np.float32)},  # unknown input
    ],
    ids=["datatype", "rank", "dimension", "missing", "unknown"],
)
def test_bad_input_raises_value_error(
    backend: tuple[str, Engine, list[int]], inputs: dict[str, np.ndarray]
) -> None:
    _, engine, _ = backend
    with engine:
        with pytest.raises(ValueError, match=r"x|z"):
            engine.infer(inputs)
        out = engine.infer({"x": np.ones((2, 4), np.float32)})  # still serving afterwards
        np.testing.assert_allclose(out["y"], 2.0)


def test_node_serves_a_torch_model(tmp_path: Path) -> None:
    from moesaic.nodes.client import NodeClient
    from tests.helpers.nodes import running_node

    write_torch_add_model(
        tmp_path,
        "torch_add",
        "export",
        model_yaml="task: test\nengine: {type: torch, device: cpu}\n",
    )

    async def call(address: str) -> tuple[Any, Any]:
        async with NodeClient(address) as node:
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            result = await node.infer("torch_add", {"x": x}, timeout=10)
            description = await node.describe(timeout=5)
            return result, description

    with running_node(tmp_path) as node:
        result, description = asyncio.run(call(node.address))
    np.testing.assert_allclose(result.outputs["y"], np.arange(8, dtype=np.float32).reshape(2, 4) + 1)
    model = next(m for m in description.models if m.name == "torch_add")
    assert (model.engine, model.state, model.ready) == ("torch", "ready", True)
    assert result.energy_source.removesuffix("+attributed") in ENERGY_SOURCES
