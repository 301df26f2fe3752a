"""The ppn_bev processor: raw points -> BEV -> per-sensor ring buffer -> engine -> outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from moesaic.datasets import read_points  # noqa: E402
from moesaic.models.ppn.encoding import PpnEncoding  # noqa: E402
from moesaic.models.ppn.networks import build_network  # noqa: E402
from moesaic.models.ppn.training import export_onnx  # noqa: E402
from moesaic.runtime.engine import create_engine  # noqa: E402
from moesaic.runtime.processing import create_processor, processor_types  # noqa: E402

torch.set_num_threads(1)
SAMPLE = Path(__file__).resolve().parents[4] / "moesaic" / "assets" / "sample_lidar" / "velodyne"
OPTIONS = {
    "mode": "multi",
    "frames": 3,
    "resolution": 1.6,
    "x_range": [-51.2, 51.2],
    "y_range": [-51.2, 51.2],
}


def _folder(tmp_path: Path, task: str) -> Path:
    enc = PpnEncoding.from_options(OPTIONS)
    folder = tmp_path / f"ppn-{task}"
    folder.mkdir()
    export_onnx(build_network(task, "small", enc.in_channels).eval(), task, enc, folder / "model.onnx")  # type: ignore[arg-type]
    return folder


@pytest.mark.parametrize(("task", "name", "channels"), [("seg", "probs", 5), ("rec", "bev", 1)])
def test_points_in_bev_out(tmp_path: Path, task: str, name: str, channels: int) -> None:
    assert "ppn_bev" in processor_types()
    folder = _folder(tmp_path, task)
    proc = create_processor({"type": "ppn_bev", "task": task, **OPTIONS}, folder)
    engine = create_engine({"type": "onnxruntime", "intra_op_threads": 1}, folder)
    engine.load()
    specs = proc.inputs(engine.describe().inputs)
    assert [(s.name, s.datatype, s.shape) for s in specs] == [("points", "FP32", (-1, 4))]
    (out_spec,) = proc.outputs(engine.describe().outputs)
    assert (out_spec.name, out_spec.shape) == (name, (channels, 64, 64))
    assert proc.class_names() == (["empty", "ground", "wall", "cone", "vehicle"] if task == "seg" else [])
    points = read_points(SAMPLE / "000000.bin")
    for frame in range(4):
        inputs, ctx = proc.preprocess({"points": points}, {"sensor_id": "lidar_a"})
        (stacked,) = inputs.values()
        assert stacked.shape == (1, 12, 64, 64)
        # the newest frame is last; the ring buffer fills from the back
        assert stacked[0, 8:].any() and (stacked[0, :4].any() == (frame >= 2))
        out = proc.postprocess(engine.infer(inputs), ctx)
    assert out[name].shape == (channels, 64, 64) and out[name].dtype == np.float32
    if task == "seg":
        np.testing.assert_allclose(out[name].sum(0), 1.0, atol=1e-4)
    else:
        assert out[name].min() >= 0.0 and out[name].max() <= 1.0
    # another sensor has its own, empty history
    inputs, _ = proc.preprocess({"points": points}, {"sensor_id": b"lidar_b"})
    assert not next(iter(inputs.values()))[0, :8].any()
    engine.close()


def test_bad_inputs_name_the_field(tmp_path: Path) -> None:
    proc = create_processor({"type": "ppn_bev", "task": "seg", **OPTIONS, "max_points": 10}, tmp_path)
    with pytest.raises(ValueError, match="points: expected shape"):
        proc.preprocess({"points": np.zeros((5, 3), np.float32)}, {})
    with pytest.raises(ValueError, match="points: expected FP32"):
        proc.preprocess({"points": np.zeros((5, 4), np.float64)}, {})
    with pytest.raises(ValueError, match="max_points"):
        proc.preprocess({"points": np.zeros((11, 4), np.float32)}, {})
    with pytest.raises(ValueError, match="points: missing"):
        proc.preprocess({"xyz": np.zeros((1, 4), np.float32)}, {})
    with pytest.raises(ValueError, match="unknown option"):
        create_processor({"type": "ppn_bev", "frame": 3}, tmp_path)
    with pytest.raises(ValueError, match=r"processor\.task"):
        create_processor({"type": "ppn_bev", "task": "det"}, tmp_path)
    with pytest.raises(ValueError, match="fixed grid"):
        create_processor({"type": "ppn_bev", "mode": "ppn", "resolution": 0.4}, tmp_path)


def test_shipped_experts_load(tmp_path: Path) -> None:
    models = Path(__file__).resolve().parents[4] / "models"
    folders = [models / "ppn-seg-small", models / "ppn-rec-small"]
    if not all((f / "model.onnx").is_file() for f in folders):
        pytest.skip("trained experts not in models/")
    from moesaic.nodes.repository import load_model_spec

    for folder in folders:
        spec, engine_config = load_model_spec(folder)
        assert spec.processor is not None and spec.processor["type"] == "ppn_bev"
        proc = create_processor(spec.processor, folder)
        engine = create_engine(engine_config, folder)
        engine.load()
        proc.inputs(engine.describe().inputs)
        inputs, ctx = proc.preprocess({"points": read_points(SAMPLE / "000000.bin")}, {"sensor_id": "s"})
        out = proc.postprocess(engine.infer(inputs), ctx)
        assert next(iter(out.values())).shape[-2:] == (256, 256)
        engine.close()
