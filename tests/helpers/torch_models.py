"""Small PyTorch models saved as TorchScript or torch.export model folders, for tests.

``AddNet`` computes what ``tests.helpers.onnx_models.write_add_model`` builds in ONNX
(``y = x + 1``, ``total = sum(x)``), so one contract test can run it on every backend.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from moesaic.runtime.engine import Engine, TensorSpec
from moesaic.runtime.torch_engine import save_torch_model

__all__ = [
    "ADD_INPUTS",
    "ADD_OUTPUTS",
    "AddNet",
    "ConvNet",
    "load_at_once",
    "write_torch_add_model",
    "write_torch_conv_model",
    "write_torch_mlp_model",
]

ADD_INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
ADD_OUTPUTS = (TensorSpec("y", "FP32", (-1, 4)), TensorSpec("total", "FP32", ()))


class AddNet(torch.nn.Module):
    """``{"y": x + 1, "total": x.sum()}``; a dict output, matched to outputs by name."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x + 1, "total": x.sum()}


class ConvNet(torch.nn.Module):
    """A 3x3 convolution and a global pool: two tensor outputs (a tuple)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x))
        return y, y.mean(dim=(2, 3))


class Mlp(torch.nn.Module):
    """``x [N, 256]`` -> ``depth`` square layers of ``width`` -> ``y [N, 16]``: compute-bound."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = [torch.nn.Linear(256, width), torch.nn.ReLU()]
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(width, 16))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def write_torch_mlp_model(
    root: Path,
    name: str,
    *,
    width: int = 4096,
    depth: int = 6,
    rows: int = 512,
    model_yaml: str | None = None,
) -> Path:
    """Folder ``root/name``: :class:`Mlp` as TorchScript on ``x [rows, 256]`` (static: CUDA graphs)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    model = Mlp(width, depth).eval()
    inputs = (TensorSpec("x", "FP32", (rows, 256)),)
    outputs = (TensorSpec("y", "FP32", (rows, 16)),)
    traced = torch.jit.trace(model, torch.zeros(rows, 256))
    save_torch_model(traced, folder / "model.ts", inputs=inputs, outputs=outputs)
    if model_yaml is not None:
        (folder / "model.yaml").write_text(model_yaml)
    return folder


def write_torch_add_model(root: Path, name: str, fmt: str, *, model_yaml: str | None = None) -> Path:
    """Folder ``root/name`` holding AddNet as ``model.ts`` (fmt "torchscript") or ``model.pt2``."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    model = AddNet().eval()
    example = torch.zeros(2, 4)
    if fmt == "torchscript":
        save_torch_model(torch.jit.script(model), folder / "model.ts", inputs=ADD_INPUTS, outputs=ADD_OUTPUTS)
    else:
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)
        )
        save_torch_model(program, folder / "model.pt2", inputs=ADD_INPUTS, outputs=ADD_OUTPUTS)
    if model_yaml is not None:
        (folder / "model.yaml").write_text(model_yaml)
    return folder


def write_torch_conv_model(folder: Path, fmt: str, *, size: int = 8, metadata: bool = True) -> Path:
    """ConvNet on ``[-1, 3, size, size]`` as ``model.ts`` or ``model.pt2`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ConvNet().eval()
    example = torch.zeros(2, 3, size, size)
    inputs = (TensorSpec("images", "FP32", (-1, 3, size, size)),)
    outputs = (TensorSpec("features", "FP32", (-1, 4, size, size)), TensorSpec("pooled", "FP32", (-1, 4)))
    if fmt == "torchscript":
        scripted = torch.jit.trace(model, example)
        path = folder / "model.ts"
        if metadata:
            save_torch_model(scripted, path, inputs=inputs, outputs=outputs)
        else:
            torch.jit.save(scripted, str(path))
    else:
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)
        )
        path = folder / "model.pt2"
        if metadata:
            save_torch_model(program, path, inputs=inputs, outputs=outputs)
        else:
            torch.export.save(program, str(path))
    return folder


def load_at_once(engines: Sequence[Engine]) -> list[BaseException]:
    """Load ``engines`` on a thread each, released together, as a node's loader does; the
    errors they raised."""
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def load(engine: Engine) -> None:
        start.wait()
        try:
            engine.load()
        except BaseException as exc:  # collected for the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
