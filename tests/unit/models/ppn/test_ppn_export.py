"""PPN export for both engines, the baselines, the time-fitted schedule and the cropped batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("open3d")

from moesaic.datasets.lidar_scenes import SceneConfig, SensorModel, generate_sequence  # noqa: E402
from moesaic.models.ppn.encoding import PpnEncoding  # noqa: E402
from moesaic.models.ppn.training import (  # noqa: E402
    BevSamples,
    TrainConfig,
    evaluate,
    load_samples,
    one_cycle_lr,
    train,
    write_model_folder,
)
from moesaic.runtime.onnxruntime_engine import OnnxRuntimeConfig, OnnxRuntimeEngine  # noqa: E402
from moesaic.runtime.torch_engine import TorchEngine, TorchEngineConfig  # noqa: E402

torch.set_num_threads(1)
ENC = PpnEncoding.from_options({"mode": "multi", "frames": 2, "resolution": 0.8, "x_range": [-25.6, 25.6],
                                "y_range": [-25.6, 25.6]})  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ppn-data")
    sensor = SensorModel(beams=32, azimuth_steps=256)
    for k in range(2):
        generate_sequence(
            root / f"seq{k}", frames=4, seed=20 + k, sensor=sensor, scene=SceneConfig(cones=80, cars=6)
        )
    return root


def test_cropped_batch_is_the_crop_of_the_whole_batch(data: Path) -> None:
    samples = BevSamples([data / "seq0"], ENC)
    whole = samples.batch([1, 3])
    crop = samples.batch([1, 3], np.random.default_rng(5), crop=16)
    x = crop[0].numpy()
    assert x.shape == (2, ENC.in_channels, 16, 16)
    # find the window (flips aside): the crop equals some window of the whole grid, flipped or not
    wx = whole[0].numpy()
    found = False
    for r in range(64 - 15):
        for c in range(64 - 15):
            win = wx[..., r : r + 16, c : c + 16]
            for flip in (win, win[..., ::-1, :], win[..., :, ::-1], win[..., ::-1, ::-1]):
                if np.array_equal(flip, x):
                    found = True
    assert found
    assert crop[1].dtype == torch.int64 and crop[1].shape == (2, 16, 16)


def test_baselines_are_the_constant_answers(data: Path) -> None:
    _, val = load_samples(TrainConfig(data=data, encoding=ENC))
    seg = evaluate(None, "seg", val)
    assert seg["iou_ground"] == 0.0 and seg["iou_wall"] == 0.0
    assert seg["iou_empty"] == pytest.approx(float(np.mean(val.seg == 0)))
    rec = evaluate(None, "rec", val)
    assert rec["iou"] == 0.0 and rec["f1"] == 0.0
    assert rec["mae"] == pytest.approx(float(val.dense.mean()), rel=1e-3)


def test_one_cycle_schedule() -> None:
    lrs = [one_cycle_lr(s, 100, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert lrs[-1] < 1e-5


@pytest.mark.parametrize("task", ["seg", "rec"])
def test_exports_serve_alike_on_both_engines(data: Path, tmp_path: Path, task: str) -> None:
    config = TrainConfig(data=data, task=task, encoding=ENC, steps=2, batch=1, crop=32, max_seconds=60)  # type: ignore[arg-type]
    result = train(config)
    assert result.steps_done == 2 and set(result.baseline) == set(result.metrics)
    torch_dir = write_model_folder(tmp_path / "torch" / f"ppn-{task}", result, config, engine="torch")
    onnx_dir = write_model_folder(tmp_path / "onnx" / f"ppn-{task}", result, config)
    spec = yaml.safe_load((torch_dir / "model.yaml").read_text())
    assert spec["engine"] == {"type": "torch", "cuda_graphs": True}  # the node's --device decides
    assert spec["processor"]["resolution"] == 0.8
    assert "baseline" in yaml.safe_load((torch_dir / "training.yaml").read_text())
    assert (torch_dir / "model.pt2").stat().st_size < 4 * (torch_dir / "weights.pt").stat().st_size
    te = TorchEngine(TorchEngineConfig.model_validate({"device": "cpu", "warmup_runs": 0}), torch_dir)
    te.load()
    oe = OnnxRuntimeEngine(OnnxRuntimeConfig.model_validate({}), onnx_dir)
    oe.load()
    (spec_in,) = te.describe().inputs
    assert spec_in.shape == (1, ENC.in_channels, *ENC.shape)
    x = (np.random.default_rng(0).random(spec_in.shape) > 0.9).astype(np.float32)
    (a,) = te.infer({"bev": x}).values()
    (b,) = oe.infer({"bev": x}).values()
    assert a.shape == b.shape == (1, 5 if task == "seg" else 1, *ENC.shape)
    np.testing.assert_allclose(a, b, atol=1e-4)
