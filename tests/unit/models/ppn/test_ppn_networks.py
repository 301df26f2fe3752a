"""PPN networks: shapes, padding, sizes, ONNX export equal to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesaic.models.ppn.encoding import PpnEncoding  # noqa: E402
from moesaic.models.ppn.networks import build_network, parameter_count  # noqa: E402
from moesaic.models.ppn.training import export_onnx  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize(("task", "channels"), [("seg", 5), ("rec", 1)])
@pytest.mark.parametrize("hw", [(64, 64), (50, 70)])
def test_small_networks_keep_the_grid(task: str, channels: int, hw: tuple[int, int]) -> None:
    net = build_network(task, "small", in_channels=8).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        out = net(torch.rand(2, 8, *hw))
    assert out.shape == (2, channels, *hw)


def test_large_networks_are_ppn_sized() -> None:
    seg = parameter_count(build_network("seg", "large", in_channels=16))
    rec = parameter_count(build_network("rec", "large", in_channels=16))
    assert 30e6 < seg < 32e6 and 27e6 < rec < 29e6


def test_bad_task_and_size() -> None:
    with pytest.raises(ValueError, match="size"):
        build_network("seg", "huge", 4)
    with pytest.raises(ValueError, match="task"):
        build_network("det", "small", 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("task", ["seg", "rec"])
def test_onnx_export_matches_torch(tmp_path: Path, task: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    enc = PpnEncoding.from_options({"mode": "multi", "frames": 2, "resolution": 1.0, "x_range": [-20, 20],
                                    "y_range": [-24, 24]})  # fmt: skip
    net = build_network(task, "small", enc.in_channels).eval()  # type: ignore[arg-type]
    path = tmp_path / "m.onnx"
    export_onnx(net, task, enc, path)  # type: ignore[arg-type]
    x = torch.rand(1, enc.in_channels, *enc.shape)
    with torch.no_grad():
        ref = net(x)
        ref = ref.softmax(1) if task == "seg" else torch.sigmoid(ref)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"bev": x.numpy()})
    assert got.shape == (1, 5 if task == "seg" else 1, 40, 48)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
