"""Each task's MoE² gate for the demo fleet: trained on the started nodes once, cached after.

For every task the demo serves: generate labelled frames (:mod:`moesaic.demo.labelled`), run
the fleet's real experts on them (:func:`moesaic.coordinator.builder.build_validation`),
train the gate on the resulting validation table (:func:`moesaic.coordinator.gate.train_gate`)
and keep both in the cache folder, ``$XDG_CACHE_HOME/moesaic/demo/`` (``~/.cache/...``)::

    bev_segmentation-<key>/gate.json        the gate (`moesaic train-gate` format)
    bev_segmentation-<key>/validation.npz   the table it was trained on
    bev_segmentation-<key>/meta.json        experts, frames, rows, losses, seconds

The key hashes the task, its experts' ids and every file of their model folders and
:data:`DATA_VERSION`: a changed model (or fleet) trains again, anything else loads in
milliseconds. A task whose gate cannot be trained runs with prior weights, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesaic.demo.fleet import LIDAR_TASKS, NodePlan, TaskFiles, folder_digest

__all__ = ["DATA_VERSION", "GateReport", "cache_root", "prepare_gates"]

log = logging.getLogger(__name__)

DATA_VERSION = "demo-gates/1"
"""Bump when the labelled data or the training changes: every cached gate trains again."""
LIDAR_FRAMES = 12
CAMERA_FRAMES = 12
_LIDAR_SEED = 4242
_CAMERA_SEED = 2027


@dataclass(frozen=True)
class GateReport:
    """How a task got its gate: trained now (and how long it took) or loaded from the cache."""

    task: str
    files: TaskFiles | None
    cached: bool
    seconds: float
    detail: str


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/moesaic/demo`` (default ``~/.cache/moesaic/demo``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moesaic" / "demo"


def _key(task: str, experts: list[str], folders: list[Path]) -> str:
    digest = hashlib.sha256(f"{DATA_VERSION}\0{task}\0{LIDAR_FRAMES}\0{CAMERA_FRAMES}".encode())
    for expert in sorted(experts):
        digest.update(b"\0expert\0" + expert.encode())
    for folder in sorted(folders, key=str):
        digest.update(b"\0model\0" + folder_digest(folder).encode())
    return digest.hexdigest()[:16]


async def _fleet_experts(nodes: list[NodePlan], tasks: list[str]) -> dict[str, list[str]]:
    """Expert ids per task as the coordinator's registry will see them."""
    from moesaic.coordinator.config import parse_fleet
    from moesaic.coordinator.registry import Registry

    config = parse_fleet({"nodes": [{"address": n.address, "name": n.name} for n in nodes]}, env={})
    async with Registry(config) as registry:
        return {task: sorted({e.id for e in registry.experts(task)}) for task in tasks}


async def _output_shape(nodes: list[NodePlan], task: str) -> tuple[tuple[int, int], Path]:
    """(H, W) of the first expert of ``task`` and its model folder (BEV label grids)."""
    from moesaic.nodes.client import NodeClient

    node, expert = next((n, e) for n in nodes for e in n.experts if e.task == task)
    async with NodeClient(node.address) as client:
        metadata = await client.metadata(expert.name)
    shape = [int(d) for d in metadata.outputs[0].shape]
    return (shape[-2], shape[-1]), expert.folder


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger`` at WARNING for the duration."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


class _Trainer:
    """Trains the gates that are not in the cache, showing progress on ``progress``."""

    def __init__(self, nodes: list[NodePlan], work: Path, progress: Any) -> None:
        self.nodes = nodes
        self.work = work
        self.progress = progress
        self._lidar: asyncio.Task[Any] | None = None

    def _bar(self, description: str, total: int) -> Any:
        bar = self.progress.add_task(description, total=total)
        return lambda done, _total: self.progress.update(bar, completed=done)

    async def _sequence(self) -> Any:
        from moesaic.demo.labelled import lidar_sequence

        if self._lidar is None:
            advance = self._bar("ray-casting LiDAR frames", LIDAR_FRAMES)
            self._lidar = asyncio.create_task(
                asyncio.to_thread(
                    lidar_sequence,
                    self.work / "lidar",
                    frames=LIDAR_FRAMES,
                    seed=_LIDAR_SEED,
                    progress=advance,
                )
            )
        return await self._lidar

    async def data(self, task: str) -> Path:
        """The labelled frames of ``task``."""
        from moesaic.demo.labelled import bev_grid, write_camera_frames, write_lidar_frames

        out = self.work / task
        if task in LIDAR_TASKS:
            sequence = await self._sequence()
            shape, folder = await _output_shape(self.nodes, task)
            return await asyncio.to_thread(write_lidar_frames, sequence, task, bev_grid(folder, shape), out)
        advance = self._bar("rendering camera frames", CAMERA_FRAMES)
        return await asyncio.to_thread(
            write_camera_frames, out, frames=CAMERA_FRAMES, seed=_CAMERA_SEED, progress=advance
        )

    async def train(self, task: str, folder: Path) -> dict[str, Any]:
        """Labelled frames -> validation table on the real nodes -> gate, written into ``folder``."""
        import numpy as np

        from moesaic.coordinator.builder import build_validation
        from moesaic.coordinator.config import parse_fleet
        from moesaic.coordinator.gate import Gate, mixture_loss, train_gate

        data = await self.data(task)
        bar = self.progress.add_task(f"{task}: experts on {len(list(data.glob('*.npz')))} frames", total=2)
        config = parse_fleet({"nodes": [{"address": n.address, "name": n.name} for n in self.nodes]}, env={})
        table = await build_validation(config, task, data)
        self.progress.update(bar, completed=1, description=f"{task}: training the gate")
        gate = await asyncio.to_thread(train_gate, table)
        self.progress.update(bar, completed=2, description=f"{task}: gate trained")
        folder.mkdir(parents=True)
        table.save(folder / "validation.npz")
        gate.save(folder / "gate.json")
        singles = [float(-np.log(np.maximum(table.q[:, i], 1e-12)).mean()) for i in range(len(table.experts))]
        uniform = Gate.uniform(table.task, table.experts, table.input_kind)
        return {
            "experts": list(table.experts),
            "frames": len(table.features),
            "rows": len(table.frame),
            "loss": {
                "gate": mixture_loss(gate, table),
                "uniform": mixture_loss(uniform, table),
                "best_single": dict(zip(table.experts, singles, strict=True)),
            },
        }


async def prepare_gates(
    nodes: list[NodePlan],
    tasks: list[str],
    *,
    cache: Path,
    work: Path,
    console: Any,
    retrain: bool = False,
) -> dict[str, GateReport]:
    """Each task's gate and validation table: from ``cache``, else trained on the running ``nodes``."""
    import grpc
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    experts = await _fleet_experts(nodes, tasks)
    models: Mapping[str, list[Path]] = {
        task: sorted({e.folder for n in nodes for e in n.experts if e.task == task}) for task in tasks
    }
    reports: dict[str, GateReport] = {}
    missing: dict[str, Path] = {}
    for task in tasks:
        folder = cache / f"{task}-{_key(task, experts[task], models[task])}"
        files = TaskFiles(folder / "gate.json", folder / "validation.npz")
        if not retrain and files.gate.is_file() and files.validation.is_file():
            reports[task] = GateReport(task, files, True, 0.0, f"cached in {folder}")
        else:
            missing[task] = folder
    if not missing:
        return reports
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    cache.mkdir(parents=True, exist_ok=True)
    with (
        _quiet("moesaic.coordinator.builder"),  # a line per frame would tear the progress bars
        Progress(*columns, TimeElapsedColumn(), console=console) as progress,
    ):
        trainer = _Trainer(nodes, work, progress)

        async def one(task: str, folder: Path) -> GateReport:
            started = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=cache))
            try:
                meta = await trainer.train(task, staging / "gate")
                seconds = time.monotonic() - started
                meta["seconds"] = round(seconds, 2)
                (staging / "gate" / "meta.json").write_text(json.dumps(meta, indent=1))
                shutil.rmtree(folder, ignore_errors=True)
                (staging / "gate").rename(folder)  # all or nothing: an interrupted run leaves no half gate
            except (ValueError, LookupError, OSError, grpc.RpcError) as exc:
                log.warning("gate of %s not trained: %s", task, exc)
                return GateReport(task, None, False, time.monotonic() - started, f"not trained ({exc})")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            detail = f"trained on {meta['frames']} frames, {meta['rows']} rows in {seconds:.1f} s"
            return GateReport(
                task, TaskFiles(folder / "gate.json", folder / "validation.npz"), False, seconds, detail
            )

        done = await asyncio.gather(*(one(task, folder) for task, folder in missing.items()))
    reports.update({r.task: r for r in done})
    return {task: reports[task] for task in tasks}
