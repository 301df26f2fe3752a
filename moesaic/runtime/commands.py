"""``moesaic profile`` and ``moesaic build-engine``.

::

    moesaic profile --models models/ --batch 1,4,8 --runs 100 --out profile.json
    moesaic build-engine models/det/model.onnx --out models/det/model.plan --fp16

``profile`` loads each model folder the way a node does (model repository, ``engine:`` of
model.yaml), feeds its engine synthetic inputs of the declared shapes (dynamic leading dim
= batch size; other dynamic dims from ``--shape`` or 1) and measures latency, throughput and
energy with the best meter of the device. ``build-engine`` builds a TensorRT plan for the
GPU it runs on, printing the builder's progress.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.runtime.engine import EngineError, MissingExtraError, TensorSpec, dtype_of

__all__ = ["parse_batches", "parse_shapes", "register", "synthetic_inputs"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``build-engine`` to the ``moesaic`` command (``profile``: :mod:`moesaic.nodes.profiling`)."""
    b = subparsers.add_parser("build-engine", help="build a TensorRT plan from ONNX for this GPU")
    b.add_argument("onnx", type=Path, help="model.onnx")
    b.add_argument("--out", type=Path, required=True, help="plan file to write (e.g. model.plan)")
    b.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    b.add_argument("--int8", action="store_true", help="allow INT8 kernels (needs --calib)")
    b.add_argument("--calib", type=Path, default=None, help="folder of .npy/.npz calibration batches")
    b.add_argument("--workspace", type=int, default=1024, metavar="MB", help="builder workspace limit (MiB)")
    b.add_argument("--max-batch", type=int, default=8, help="largest batch when the batch dim is dynamic")
    b.set_defaults(func=_build_command)


# ---------------------------------------------------------------- profile


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shape {item!r}: expected NAME=DxDx..., e.g. images=1x3x640x640") from None
    return shapes


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {text!r}: expected comma-separated positive integers, e.g. 1,4,8")
    return batches


def synthetic_inputs(
    specs: tuple[TensorSpec, ...],
    batch: int,
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray] | None:
    """Random inputs fitting ``specs`` at ``batch``; None when a fixed batch dim forbids it."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        if shapes and spec.name in shapes:
            shape = shapes[spec.name]
        else:
            if spec.shape and spec.shape[0] != -1 and spec.shape[0] != batch:
                return None
            shape = tuple((batch if i == 0 else 1) if d == -1 else d for i, d in enumerate(spec.shape))
        dtype = dtype_of(spec.datatype)
        if dtype.kind == "f":
            out[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype == np.uint8:
            out[spec.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif dtype.kind in "iub":
            out[spec.name] = np.zeros(shape, dtype=dtype)
        else:
            raise ValueError(f"input {spec.name!r}: cannot synthesise {spec.datatype} inputs")
    return out


# ---------------------------------------------------------------- build-engine


def _build_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from moesaic.runtime.tensorrt_build import BuildProgress, build_plan

    console = Console(stderr=True)
    try:
        with console.status(f"building {args.out} from {args.onnx}") as status:
            progress = BuildProgress(lambda line: status.update(f"building {args.out}: {escape(line)}"))
            build_plan(
                args.onnx,
                args.out,
                fp16=args.fp16,
                int8=args.int8,
                calib_dir=args.calib,
                workspace_mb=args.workspace,
                max_batch=args.max_batch,
                progress=progress,
            )
    except MissingExtraError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 3
    except (ValueError, EngineError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    console.print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0
