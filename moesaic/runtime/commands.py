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

__all__ = ["register", "synthetic_inputs"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``profile`` and ``build-engine`` to the ``moesaic`` command."""
    p = subparsers.add_parser("profile", help="measure latency, throughput and energy of each model")
    p.add_argument("--models", type=Path, required=True, help="model repository (one folder per model)")
    p.add_argument("--model", action="append", default=None, help="profile only this model (repeatable)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default: 1)")
    p.add_argument("--runs", type=int, default=50, help="timed inferences per batch size (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed inferences first (default: 5)")
    p.add_argument("--device", default="auto", help="cpu, cuda:N, jetson or auto (default: auto)")
    p.add_argument(
        "--idle-seconds", type=float, default=2.0, help="idle draw measured for this long (default: 2)"
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="run at least this long when energy is measured (default: 2)",
    )
    p.add_argument(
        "--shape", action="append", default=[], metavar="NAME=DxDx..", help="input shape (repeatable)"
    )
    p.add_argument("--out", type=Path, default=Path("profile.json"), help="profile file to write")
    p.set_defaults(func=_profile_command)

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


def _parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
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


def _parse_batches(text: str) -> list[int]:
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


def _profile_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from moesaic.nodes.repository import scan_models
    from moesaic.runtime.devices import discover_device
    from moesaic.runtime.energy import open_meter
    from moesaic.runtime.profiler import ProfileRecord, profile_engine, write_profile_file

    console = Console(stderr=True)
    try:
        batches = _parse_batches(args.batch)
        shapes = _parse_shapes(args.shape)
        if args.runs < 1:
            raise ValueError(f"--runs: must be >= 1, got {args.runs}")
        models = scan_models(args.models)
        if args.model:
            unknown = sorted(set(args.model) - {m.name for m in models})
            if unknown:
                raise LookupError(f"--model: {unknown} not in {args.models} (has {[m.name for m in models]})")
            models = [m for m in models if m.name in args.model]
        device = discover_device(args.device)
    except (ValueError, LookupError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2

    records: list[ProfileRecord] = []
    failed = 0
    with open_meter(device) as meter:
        label = "measured" if meter.measured else "ESTIMATED"
        console.print(f"device {device.id} ({device.name}); energy: {meter.source} ({label})")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            for served in models:
                served.load(device)
                engine = served.engine
                if engine is None:
                    console.print(f"[red]{escape(served.name)}: failed to load: {escape(served.error)}[/red]")
                    failed += 1
                    continue
                try:
                    specs = engine.describe().inputs
                    for batch in batches:
                        inputs = synthetic_inputs(specs, batch, shapes)
                        if inputs is None:
                            console.print(f"{served.name}: batch {batch} skipped (fixed batch dimension)")
                            continue
                        task = bar.add_task(f"{served.name} batch {batch}", total=args.runs)

                        def advance(i: int, task: Any = task) -> None:
                            bar.update(task, completed=min(i, args.runs))

                        record = profile_engine(
                            engine,
                            inputs,
                            runs=args.runs,
                            warmup=args.warmup,
                            meter=meter,
                            idle_s=args.idle_seconds,
                            min_duration_s=args.min_seconds if meter.measured else 0.0,
                            model=served.name,
                            device=device.id,
                            batch_size=batch,
                            on_run=advance,
                        )
                        records.append(record)
                except (ValueError, EngineError) as exc:
                    console.print(f"[red]{escape(served.name)}: profiling failed: {escape(str(exc))}[/red]")
                    failed += 1
                finally:
                    served.close()

    write_profile_file(args.out, records)
    table = Table(title=f"profile on {device.name} ({device.id})")
    for col in (
        "model",
        "engine",
        "batch",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "items/s",
        "mJ/inference",
        "idle W",
        "energy",
    ):
        table.add_column(col, justify="left" if col in ("model", "engine", "energy") else "right")
    for r in records:
        table.add_row(
            r.model,
            r.engine,
            str(r.batch_size),
            f"{r.latency_ms.p50:.2f}",
            f"{r.latency_ms.p95:.2f}",
            f"{r.latency_ms.p99:.2f}",
            f"{r.throughput_per_s:.1f}",
            f"{r.energy_mj_per_inference:.1f}",
            f"{r.idle_watts:.1f}",
            r.energy_source,
        )
    out = Console()
    (out if out.is_terminal else Console(width=160)).print(table)
    console.print(f"wrote {len(records)} record(s) to {args.out}")
    return 1 if failed else 0


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
