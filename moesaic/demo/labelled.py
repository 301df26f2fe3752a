"""Labelled frames the demo trains its gates on, in the layout ``moesaic build-validation`` reads.

One ``.npz`` per frame (see :mod:`moesaic.coordinator.builder`):

- ``bev_segmentation``: ``points`` FP32 [N, 4], ``label`` [H, W] class per BEV cell;
- ``bev_reconstruction``: ``points``, ``bev`` [1, H, W] true obstacle footprint;
- ``detection``: ``image`` UINT8 [H, W, 3], ``boxes`` [K, 4] xyxy, ``class_ids`` [K].

LiDAR frames come from a race-track sequence ray-cast by
:func:`moesaic.datasets.lidar_scenes.generate_sequence` (the sensor of the bundled sample; a
seed of its own), with the bundled sample itself when open3d is not installed. Camera frames
are intersections rendered by :func:`moesaic.datasets.intersection.render_scene`, passed
through JPEG as the replayed frames are. Label grids take the shape of the experts' outputs
(``model.yaml``'s ``ppn_bev`` grid where there is one, else the ±51.2 m square).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moesaic.datasets.bev import BevGrid

__all__ = ["SENSOR_ID", "bev_grid", "lidar_sequence", "write_camera_frames", "write_lidar_frames"]

log = logging.getLogger(__name__)

SENSOR_ID = "demo-validation"
"""The ``sensor_id`` of the LiDAR frames: their own temporal state on the nodes."""
_HALF_WIDTH_M = 51.2
Progress = Callable[[int, int], None]


def bev_grid(model_folder: Path, shape: tuple[int, int]) -> BevGrid:
    """The grid of an expert's ``[.., H, W]`` output: its ``ppn_bev`` grid, else ±51.2 m in H x W cells."""
    from moesaic.models.ppn.encoding import PpnEncoding

    spec = yaml.safe_load((model_folder / "model.yaml").read_text()) or {}
    processor = spec.get("processor") if isinstance(spec, dict) else None
    if isinstance(processor, dict) and processor.get("type") == "ppn_bev":
        grid = PpnEncoding.from_options(processor).grid
        if grid.shape == shape:
            return grid
    h, w = shape
    resolution = 2 * _HALF_WIDTH_M / h
    return BevGrid(resolution, (-_HALF_WIDTH_M, _HALF_WIDTH_M), (-resolution * w / 2, resolution * w / 2))


def lidar_sequence(work: Path, *, frames: int, seed: int, progress: Progress | None = None) -> Any:
    """A labelled LiDAR sequence: ray-cast into ``work`` (needs open3d), else the bundled sample."""
    from moesaic.datasets.lidar_scenes import LidarSequence, SensorModel, generate_sequence

    try:
        import open3d  # noqa: F401
    except ImportError:
        sample = Path(__file__).resolve().parent.parent / "assets" / "sample_lidar"
        log.warning("open3d is not installed (moesaic[lidar]): the gates learn from the bundled sample")
        if progress:
            progress(frames, frames)
        return LidarSequence(sample)
    sensor = SensorModel(beams=32, azimuth_steps=512)  # the bundled sample's sensor
    generate_sequence(work, frames=frames, seed=seed, sensor=sensor, progress=progress)
    return LidarSequence(work)


def write_lidar_frames(sequence: Any, task: str, grid: BevGrid, out: Path) -> Path:
    """One ``.npz`` per scan of ``sequence`` with the label of ``task`` on ``grid``."""
    from moesaic.datasets.lidar_scenes import bev_labels

    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(sequence)):
        points = np.ascontiguousarray(sequence.points(i), np.float32)
        if task == "bev_segmentation":
            label = {"label": bev_labels(points, sequence.labels(i), grid)}
        elif task == "bev_reconstruction":
            label = {"bev": sequence.dense(i, grid)[None]}
        else:
            raise ValueError(f"task {task!r}: no LiDAR labels (bev_segmentation, bev_reconstruction)")
        arrays: dict[str, Any] = {"points": points, "sensor_id": np.array(SENSOR_ID), **label}
        np.savez(out / f"{i:04d}.npz", **arrays)
    return out


def write_camera_frames(out: Path, *, frames: int, seed: int, progress: Progress | None = None) -> Path:
    """``frames`` rendered intersections (640 px, through JPEG) with their boxes, one ``.npz`` each."""
    from PIL import Image

    from moesaic.datasets.intersection import render_scene

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(frames):
        scene = render_scene(rng, size=640)
        buffer = io.BytesIO()
        Image.fromarray(scene.image).save(buffer, format="JPEG", quality=90)
        image = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        np.savez(
            out / f"{i:04d}.npz",
            image=image,
            boxes=scene.detections.boxes.astype(np.float32),
            class_ids=scene.detections.class_ids.astype(np.int64),
        )
        if progress:
            progress(i + 1, frames)
    return out
