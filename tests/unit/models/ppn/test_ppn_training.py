"""PPN training: the edge term carries gradient, a short run lowers the loss, metrics work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open3d")

from moesaic.datasets.lidar_scenes import SceneConfig, SensorModel, generate_sequence  # noqa: E402
from moesaic.models.ppn.encoding import PpnEncoding  # noqa: E402
from moesaic.models.ppn.training import (  # noqa: E402
    BevSamples,
    TrainConfig,
    edge_loss,
    rec_loss,
    seg_loss,
    train,
    write_model_folder,
)

torch.set_num_threads(1)
ENC = PpnEncoding.from_options({"mode": "multi", "frames": 2, "resolution": 0.8, "x_range": [-25.6, 25.6],
                                "y_range": [-25.6, 25.6]})  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ppn-data")
    sensor = SensorModel(beams=32, azimuth_steps=256)
    for k in range(2):
        generate_sequence(
            root / f"seq{k}", frames=6, seed=10 + k, sensor=sensor, scene=SceneConfig(cones=80, cars=6)
        )
    return root


def test_edge_term_has_gradient() -> None:
    logits = torch.randn(2, 5, 16, 16, requires_grad=True)
    target = torch.randint(0, 5, (2, 16, 16))
    onehot = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    edge = edge_loss(logits.softmax(1), onehot)
    edge.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    rec_logits = torch.randn(1, 1, 16, 16, requires_grad=True)
    total, parts = rec_loss(rec_logits, (torch.rand(1, 1, 16, 16) > 0.8).float())
    total.backward()
    assert parts["edge"] > 0 and float(rec_logits.grad.abs().sum()) > 0  # type: ignore[union-attr]
    total, parts = seg_loss(torch.randn(1, 5, 8, 8), torch.randint(0, 5, (1, 8, 8)))
    assert set(parts) == {"ce", "dice", "edge"}


def test_samples_stack_frames_like_the_ring_buffer(data: Path) -> None:
    samples = BevSamples([data / "seq0"], ENC)
    assert len(samples) == 6
    first = samples.stack(0)
    assert first.shape == (8, 64, 64)
    assert not first[:4].any() and first[4:].any()  # zeros before the sequence starts
    np.testing.assert_array_equal(samples.stack(3)[:4], samples.frames[2])
    assert samples.seg.max() <= 4 and samples.dense.max() == 1.0


@pytest.mark.parametrize("task", ["seg", "rec"])
def test_short_training_lowers_loss(data: Path, tmp_path: Path, task: str) -> None:
    config = TrainConfig(data=data, task=task, encoding=ENC, steps=24, batch=2, crop=0, lr=5e-3)  # type: ignore[arg-type]
    result = train(config)
    first, last = np.mean(result.history[:4]), np.mean(result.history[-4:])
    assert last < first, result.history
    if task == "seg":
        assert 0.0 <= result.metrics["miou"] <= 1.0
    else:
        assert 0.0 <= result.metrics["mae"] <= 1.0 and 0.0 <= result.metrics["iou"] <= 1.0
    folder = write_model_folder(tmp_path / f"ppn-{task}", result, config)
    assert (folder / "model.onnx").is_file() and "ppn_bev" in (folder / "model.yaml").read_text()
