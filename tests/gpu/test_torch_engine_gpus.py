"""The PyTorch engine with CUDA graphs on every GPU of the host (needs CUDA; two GPUs for the second test)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesaic.runtime.engine import create_engine  # noqa: E402
from tests.helpers.torch_models import load_at_once, write_torch_conv_model  # noqa: E402

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


def _expected(folder: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    with create_engine({"type": "torch", "device": "cpu", "cuda_graphs": False}, folder) as cpu:
        return cpu.infer({"images": images})


@needs_cuda
def test_cuda_graph_replay_equals_cpu(tmp_path: Path) -> None:
    folder = write_torch_conv_model(tmp_path / "conv", "torchscript", size=16)
    images = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    config = {
        "type": "torch",
        "device": "cuda:0",
        "cuda_graphs": True,
        "static_shapes": {"images": [2, 3, 16, 16]},
    }
    with create_engine(config, folder) as engine:
        out = engine.infer({"images": images})
    _assert_close(out, _expected(folder, images), tol=1e-4)


@needs_two
def test_cuda_graphs_on_a_second_gpu_after_the_first(tmp_path: Path) -> None:
    """torch.cuda.graph's default capture stream belongs to the first GPU that captured; an
    engine on cuda:1 loaded after one on cuda:0 must capture on a stream of its own device."""
    folder = write_torch_conv_model(tmp_path / "conv", "torchscript", size=16)
    images = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    want = _expected(folder, images)
    shapes = {"images": [2, 3, 16, 16]}
    engines = [
        create_engine(
            {"type": "torch", "device": f"cuda:{i}", "cuda_graphs": True, "static_shapes": shapes}, folder
        )
        for i in (0, 1)
    ]
    try:
        for engine in engines:
            engine.load()
        for engine in engines:
            _assert_close(engine.infer({"images": images}), want, tol=1e-4)
    finally:
        for engine in engines:
            engine.close()


@needs_cuda
def test_engines_capture_their_graphs_on_threads_at_once_while_one_serves(tmp_path: Path) -> None:
    """A node loads its models on a thread each, and may load one while another serves: no
    load's warm-up or capture, and no request, may invalidate a capture
    (cudaErrorStreamCaptureInvalidated with two large PPN models on an H200; then warm-ups
    failing beside captures that only took turns)."""
    size = 256  # kernels long enough for warm-ups and captures to overlap
    folder = write_torch_conv_model(tmp_path / "conv", "export", size=size)
    images = np.random.default_rng(2).random((4, 3, size, size), dtype=np.float32)
    want = _expected(folder, images)
    shapes = {"images": [4, 3, size, size]}
    config = {"type": "torch", "device": "cuda:0", "cuda_graphs": True, "static_shapes": shapes}
    with create_engine(config, folder) as serving:
        served: list[dict[str, np.ndarray]] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    served.append(serving.infer({"images": images}))
                except BaseException as exc:  # collected for the assertion below
                    failures.append(exc)
                    return

        server = threading.Thread(target=serve)
        server.start()
        try:
            for _ in range(3):
                engines = [create_engine(config, folder) for _ in range(4)]
                try:
                    assert load_at_once(engines) == []
                    for engine in engines:
                        assert engine.describe().details["cuda_graphs"] == "on"
                        _assert_close(engine.infer({"images": images}), want)
                finally:
                    for engine in engines:
                        engine.close()
        finally:
            stop.set()
            server.join()
    assert failures == [] and served
    _assert_close(served[-1], want)


def _assert_close(out: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float = 1e-3) -> None:
    for name, expected in want.items():
        np.testing.assert_allclose(out[name], expected, rtol=tol, atol=tol)
