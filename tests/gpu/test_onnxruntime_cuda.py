"""ONNX Runtime's CUDA execution provider through the engine, the processors and a real node.

Skipped where onnxruntime-gpu (its CUDA provider) or a CUDA device is absent. Covers: the
provider chosen by default and reported in Describe and the start-up metric; I/O binding and
CUDA graphs giving the CPU provider's answers (also across input shapes); torch CUDA tensors as
engine inputs; TensorRT probed once; BEV encoded on the GPU equal to numpy's; a ``--device
cuda:0`` node serving the shipped yolo-n and ppn-seg-small with the CPU node's answers.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from moesaic.nodes.client import NodeClient  # noqa: E402
from moesaic.runtime.engine import create_engine  # noqa: E402
from moesaic.runtime.ort_providers import CUDA, TENSORRT, tensorrt_problem  # noqa: E402
from tests.helpers.nodes import REPO_ROOT, running_node  # noqa: E402
from tests.helpers.onnx_models import write_add_model  # noqa: E402
from tests.helpers.real_data import REAL_DATA  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        CUDA not in ort.get_available_providers() or not torch.cuda.is_available(),
        reason="needs onnxruntime-gpu (CUDA execution provider) and a CUDA device",
    ),
]

MODELS = REPO_ROOT / "models"
VARIANTS = {
    "plain": {"io_binding": False},
    "binding": {"io_binding": True},
    "graph": {"io_binding": True, "cuda_graph": True},
}


def _engine(folder: Path, **options: Any) -> Any:
    config = {"type": "onnxruntime", "providers": [CUDA, "CPUExecutionProvider"], **options}
    engine = create_engine(config, folder)
    engine.load()
    return engine


def _cpu(folder: Path) -> Any:
    engine = create_engine({"type": "onnxruntime", "providers": ["CPUExecutionProvider"]}, folder)
    engine.load()
    return engine


def _kitti_image() -> np.ndarray:
    import cv2

    path = REAL_DATA / "kitti_000008.png"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return np.ascontiguousarray(cv2.imread(str(path))[..., ::-1])


def _kitti_scan() -> np.ndarray:
    path = REAL_DATA / "kitti_000008.bin"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return np.fromfile(path, dtype=np.float32).reshape(-1, 4)


def test_default_providers_pick_cuda_and_skip_tensorrt_without_its_libraries(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    engine = create_engine({"type": "onnxruntime"}, folder)
    engine.load()
    details = engine.describe().details
    assert engine.describe().device == "cuda:0"
    if tensorrt_problem() is None:
        assert details["provider"] == TENSORRT
    else:
        assert details["provider"] == CUDA and TENSORRT not in details["providers"]
    engine.close()


def test_tensorrt_is_probed_once_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    tensorrt_problem.cache_clear()
    with caplog.at_level(logging.INFO, logger="moesaic.runtime.ort_providers"):
        first, second = tensorrt_problem(), tensorrt_problem()
    assert first == second
    lines = [r for r in caplog.records if "TensorRT execution provider not used" in r.getMessage()]
    assert len(lines) == (0 if first is None else 1)
    if first is not None:
        assert "libnvinfer" in first and "moesaic[tensorrt]" in first


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_yolo_on_cuda_answers_as_on_cpu(variant: str) -> None:
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    cpu = _cpu(MODELS / "yolo-n")
    expected = cpu.infer({"images": x})
    engine = _engine(MODELS / "yolo-n", **VARIANTS[variant])
    details = engine.describe().details
    assert details["provider"] == CUDA
    assert details["io_binding"] == str(VARIANTS[variant]["io_binding"]).lower()
    assert details["cuda_graph"] == str(VARIANTS[variant].get("cuda_graph", False)).lower()
    for _ in range(3):  # graph: captured on the second run, replayed after
        out = engine.infer({"images": x})
        for name, value in expected.items():
            np.testing.assert_allclose(out[name], value, rtol=1e-2, atol=0.25)  # TF32 convolutions
    # A fresh input through the same bound buffers (and graph) gives its own answer.
    y = np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)
    (name,) = expected
    got, want = engine.infer({"images": y})[name], cpu.infer({"images": y})[name]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=0.25)
    engine.close()
    cpu.close()


def test_cuda_graphs_per_input_shape(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    engine = _engine(folder, cuda_graph=True)
    assert engine.describe().details["cuda_graph"] == "true"
    for batch in (2, 3, 2, 5, 3, 2):
        x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) * batch
        out = engine.infer({"x": x})
        np.testing.assert_array_equal(out["y"], x + 1)
        assert float(out["total"]) == pytest.approx(float(x.sum()))
    engine.close()


@pytest.mark.parametrize("variant", ["binding", "graph"])
def test_torch_cuda_tensors_are_engine_inputs(tmp_path: Path, variant: str) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    engine = _engine(folder, **VARIANTS[variant])
    for k in range(3):
        x = torch.full((2, 4), float(k), device="cuda:0")
        out = engine.infer({"x": x})
        np.testing.assert_array_equal(out["y"], np.full((2, 4), k + 1, np.float32))
    engine.close()


def test_bev_encoded_on_the_gpu_equals_numpy() -> None:
    import yaml

    from moesaic.models.ppn.serving import PpnBevProcessor
    from moesaic.runtime.engine import TensorSpec

    spec = yaml.safe_load((MODELS / "ppn-seg-small" / "model.yaml").read_text())
    options = {k: v for k, v in spec["processor"].items() if k != "type"}
    engine_in = (TensorSpec("bev", "FP32", (-1, 16, 256, 256)),)
    cpu, gpu = PpnBevProcessor(options, MODELS), PpnBevProcessor(options, MODELS)
    cpu.inputs(engine_in)
    gpu.inputs(engine_in)
    gpu.place("cuda:0")
    assert gpu.encodes_on == "cuda:0" and cpu.encodes_on == "cpu"
    scan = _kitti_scan()
    rng = np.random.default_rng(3)
    for k in range(5):  # the ring buffer wraps
        points = scan if k % 2 == 0 else scan[rng.permutation(len(scan))[: len(scan) // 2]]
        a, _ = cpu.preprocess({"points": points}, {"sensor_id": "s"})
        b, _ = gpu.preprocess({"points": points}, {"sensor_id": "s"})
        assert b["bev"].is_cuda
        np.testing.assert_allclose(b["bev"].cpu().numpy(), a["bev"], atol=1e-5)


def _models_copy(tmp_path: Path, engine: str = "") -> Path:
    root = tmp_path / "models"
    for name in ("yolo-n", "ppn-seg-small"):
        shutil.copytree(MODELS / name, root / name)
        if engine:
            spec = root / name / "model.yaml"
            spec.write_text(spec.read_text().replace("engine:\n", f"engine:\n  {engine}\n", 1))
    return root


async def _answers(address: str, image: np.ndarray, scan: np.ndarray) -> tuple[Any, Any, Any]:
    async with NodeClient(address) as node:
        description = await node.describe(timeout=10)
        det = await node.infer("yolo-n", {"image": image}, timeout=30)
        seg = None
        for _ in range(4):  # fill the stream's ring buffer
            seg = await node.infer(
                "ppn-seg-small", {"points": scan}, parameters={"sensor_id": "t"}, timeout=30
            )
        return description, det, seg


@pytest.mark.parametrize("engine", ["", "cuda_graph: true"])
def test_cuda_node_serves_the_shipped_models_with_the_cpu_answers(tmp_path: Path, engine: str) -> None:
    import asyncio

    image, scan = _kitti_image(), _kitti_scan()
    with running_node(_models_copy(tmp_path / "cpu"), device="cpu") as node:
        _, det_cpu, seg_cpu = asyncio.run(_answers(node.address, image, scan))
    with running_node(_models_copy(tmp_path / "gpu", engine), device="cuda:0") as node:
        description, det, seg = asyncio.run(_answers(node.address, image, scan))
        for model in description.models:
            assert model.ready and model.device == "cuda:0" and model.provider in (CUDA, TENSORRT), model
            labels = {"model": model.name, "version": "1", "engine": "onnxruntime", "device": "cuda:0"}
            info = node.metrics.registry.get_sample_value(
                "moesaic_model_info", {**labels, "provider": model.provider}
            )
            assert info == 1.0
        ppn = node.models["ppn-seg-small"]
        assert ppn.processor is not None and getattr(ppn.processor, "encodes_on", "") == "cuda:0"
    assert len(det.outputs["boxes"]) == len(det_cpu.outputs["boxes"]) > 0
    np.testing.assert_allclose(det.outputs["boxes"], det_cpu.outputs["boxes"], atol=0.5)
    np.testing.assert_array_equal(det.outputs["class_ids"], det_cpu.outputs["class_ids"])
    np.testing.assert_allclose(seg.outputs["probs"], seg_cpu.outputs["probs"], atol=1e-2)
    assert det.compute_ms > 0 and seg.energy_source.startswith(("nvml", "estimate"))
