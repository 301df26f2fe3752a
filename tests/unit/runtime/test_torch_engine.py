"""PyTorch backend specifics: I/O description sources, precisions, config errors, CUDA graphs.

The lifecycle contract shared with the other backends is in test_engine_contract.py.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moesaic.runtime.engine import EngineError, MissingExtraError, create_engine, parse_engine_config
from moesaic.runtime.torch_engine import TorchEngine, TorchEngineConfig, _CudaGate
from tests.helpers.torch_models import ConvNet, load_at_once, write_torch_conv_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
HAS_CUDA = torch.cuda.is_available()


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        y, pooled = ConvNet().eval()(torch.from_numpy(x))
    return y.numpy(), pooled.numpy()


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_embedded_metadata_names_the_outputs(tmp_path: Path, fmt: str) -> None:
    write_torch_conv_model(tmp_path, fmt)
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    with create_engine({"type": "torch", "device": "cpu"}, tmp_path) as engine:
        desc = engine.describe()
        assert [s.name for s in desc.outputs] == ["features", "pooled"]
        assert desc.details["format"] == ("torchscript" if fmt == "torchscript" else "torch.export")
        out = engine.infer({"images": x})
    ref_y, ref_pooled = _reference(x)
    np.testing.assert_allclose(out["features"], ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pooled"], ref_pooled, rtol=1e-5, atol=1e-5)


def test_export_program_without_metadata_reads_the_graph(tmp_path: Path) -> None:
    write_torch_conv_model(tmp_path, "export", metadata=False)
    with create_engine({"type": "torch", "device": "cpu"}, tmp_path) as engine:
        desc = engine.describe()
        assert [(s.name, s.datatype, s.shape) for s in desc.inputs] == [("x", "FP32", (-1, 3, 8, 8))]
        assert [(s.name, s.shape) for s in desc.outputs] == [("output0", (-1, 4, 8, 8)), ("output1", (-1, 4))]
        out = engine.infer({"x": np.ones((2, 3, 8, 8), np.float32)})
    assert out["output1"].shape == (2, 4)


def test_export_programs_load_on_threads_at_once(tmp_path: Path) -> None:
    """A node loads its models on a thread each; torch.export's deserializer is global."""
    folders = []
    for i in range(4):
        folders.append(tmp_path / f"m{i}")
        folders[-1].mkdir()
        write_torch_conv_model(folders[-1], "export")
    engines = [create_engine({"type": "torch", "device": "cpu"}, folder) for folder in folders]
    assert load_at_once(engines) == []
    x = np.ones((1, 3, 8, 8), np.float32)
    for engine in engines:
        assert engine.infer({"images": x})["pooled"].shape == (1, 4)
        engine.close()


def test_cuda_gate_lets_a_load_in_alone_and_holds_new_requests_meanwhile() -> None:
    """The gate a CUDA graph capture needs (its GPU test covers the device): a load waits for
    the requests in flight, and requests that arrive meanwhile wait for the load."""
    gate = _CudaGate()
    order: list[str] = []
    load_waiting, load_done = threading.Event(), threading.Event()

    def load() -> None:
        load_waiting.set()
        with gate.alone():
            order.append("load")
        load_done.set()

    def late_request() -> None:
        with gate.shared():
            order.append("late request")

    with gate.shared():
        loader = threading.Thread(target=load)
        loader.start()
        load_waiting.wait()
        deadline = time.monotonic() + 10
        while not gate._alone and time.monotonic() < deadline:  # the load is queued at the gate
            time.sleep(0.001)
        assert not load_done.is_set()  # the request in flight holds the load off
        late = threading.Thread(target=late_request)
        late.start()
        time.sleep(0.05)
        order.append("first request done")
    loader.join()
    late.join()
    assert order == ["first request done", "load", "late request"]


def test_torchscript_without_metadata_needs_declared_io(tmp_path: Path) -> None:
    write_torch_conv_model(tmp_path, "torchscript", metadata=False)
    with pytest.raises(EngineError, match=r"engine\.inputs"):
        create_engine({"type": "torch", "device": "cpu"}, tmp_path).load()
    config = {
        "type": "torch",
        "device": "cpu",
        "inputs": [{"name": "img", "shape": [-1, 3, 8, 8]}],
        "outputs": [{"name": "a", "shape": [-1, 4, 8, 8]}, {"name": "b", "shape": [-1, 4]}],
    }
    with create_engine(config, tmp_path) as engine:
        out = engine.infer({"img": np.zeros((1, 3, 8, 8), np.float32)})
    assert sorted(out) == ["a", "b"]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_keeps_declared_datatypes(tmp_path: Path, precision: str) -> None:
    write_torch_conv_model(tmp_path, "export")
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    with create_engine({"type": "torch", "device": "cpu", "precision": precision}, tmp_path) as engine:
        out = engine.infer({"images": x})
    assert out["pooled"].dtype == np.float32
    np.testing.assert_allclose(out["pooled"], _reference(x)[1], atol=5e-2)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"type": "torch", "precision": "fp64"}, "precision"),
        ({"type": "torch", "warmup_runs": -1}, "warmup_runs"),
        ({"type": "torch", "gpu": True}, "gpu"),
        ({"type": "torch", "inputs": [{"name": "x"}]}, "shape"),
    ],
)
def test_bad_config_names_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        parse_engine_config(raw)


def test_config_defaults() -> None:
    config = parse_engine_config({"type": "torch"})
    assert isinstance(config, TorchEngineConfig)
    assert (config.device, config.precision, config.cuda_graphs, config.warmup_runs) == (
        "auto",
        "fp32",
        True,
        3,
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"device": "tpu"}, "engine.device"),
        ({"device": "cuda:0"} if not HAS_CUDA else {"device": "cuda:99"}, "engine.device"),
        ({"file": "missing.pt2"}, "engine.file"),
    ],
)
def test_load_errors_name_the_field(tmp_path: Path, config: dict[str, str], message: str) -> None:
    write_torch_conv_model(tmp_path, "export")
    engine = create_engine({"type": "torch", **config}, tmp_path)
    with pytest.raises(EngineError, match=message):
        engine.load()
    assert not engine.ready


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no model file"):
        create_engine({"type": "torch"}, tmp_path).load()


def test_missing_torch_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = TorchEngine(TorchEngineConfig(), tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(MissingExtraError) as info:
        engine.load()
    assert info.value.extra == "gpu" and "moesaic[gpu]" in str(info.value)


def test_wrong_output_count_is_an_engine_error(tmp_path: Path) -> None:
    write_torch_conv_model(tmp_path, "export")
    config = {
        "type": "torch",
        "device": "cpu",
        "warmup_runs": 0,
        "outputs": [{"name": "only", "shape": [-1, 4]}],
    }
    with create_engine(config, tmp_path) as engine, pytest.raises(EngineError, match="returned 2 outputs"):
        engine.infer({"images": np.zeros((1, 3, 8, 8), np.float32)})


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["torchscript", "export"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replay_matches_eager(tmp_path: Path, fmt: str, precision: str) -> None:
    write_torch_conv_model(tmp_path, fmt, size=32)
    base = {
        "type": "torch",
        "device": "cuda:0",
        "precision": precision,
        "static_shapes": {"images": [2, 3, 32, 32]},
    }
    rng = np.random.default_rng(2)
    with (
        create_engine({**base, "cuda_graphs": True}, tmp_path) as graphed,
        create_engine({**base, "cuda_graphs": False}, tmp_path) as eager,
    ):
        assert graphed.describe().details["cuda_graphs"] == "on"
        assert eager.describe().details["cuda_graphs"] == "off"
        for batch in (2, 2, 5, 2):  # 5: another shape, runs eagerly
            x = rng.random((batch, 3, 32, 32), dtype=np.float32)
            a, b = graphed.infer({"images": x}), eager.infer({"images": x})
            tol = 1e-5 if precision == "fp32" else 2e-2
            np.testing.assert_allclose(a["features"], b["features"], atol=tol)
            np.testing.assert_allclose(a["pooled"], _reference(x)[1], atol=tol * 5)
