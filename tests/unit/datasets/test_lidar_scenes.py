"""Synthetic LiDAR scenes: sensor model, labels, KITTI layout, BEV label and dense maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesaic.datasets import read_points
from moesaic.datasets.bev import BevGrid
from moesaic.datasets.lidar_scenes import (
    CLASS_NAMES,
    LidarSequence,
    RaceTrack,
    SensorModel,
    bev_labels,
    dense_bev,
    generate_sequence,
    read_labels,
)

SAMPLE = Path(__file__).resolve().parents[3] / "moesaic" / "assets" / "sample_lidar"
GRID = BevGrid(0.4, (-51.2, 51.2), (-51.2, 51.2))


@pytest.fixture(scope="module")
def seq(tmp_path_factory: pytest.TempPathFactory) -> LidarSequence:
    pytest.importorskip("open3d")
    out = tmp_path_factory.mktemp("scene")
    generate_sequence(out, frames=3, seed=4, sensor=SensorModel(beams=16, azimuth_steps=512, dropout=0.1))
    return LidarSequence(out)


def test_kitti_layout_and_labels(seq: LidarSequence) -> None:
    root = seq.folder
    assert sorted(p.name for p in (root / "velodyne").iterdir()) == ["000000.bin", "000001.bin", "000002.bin"]
    assert len(seq.poses) == 3 and json.loads((root / "scene.json").read_text())["classes"] == list(
        CLASS_NAMES
    )
    points, labels = seq.points(0), seq.labels(0)
    assert points.dtype == np.float32 and points.shape[1] == 4 and len(labels) == len(points)
    assert len(points) <= 16 * 512 * 0.95  # dropouts and misses
    present = set(np.unique(labels).tolist())
    assert {1, 2} <= present and present <= {1, 2, 3, 4}
    ground = points[labels == 1]
    assert abs(float(np.median(ground[:, 2])) + 0.8) < 0.05  # sensor 0.8 m above the ground
    rng = np.linalg.norm(points[:, :3], axis=1)
    assert rng.min() >= 0.9 and rng.max() <= 100.2
    assert points[:, 3].min() >= 0.0 and points[:, 3].max() <= 1.0


def test_cars_move_between_frames(seq: LidarSequence) -> None:
    cars0 = json.loads((seq.folder / "objects" / "000000.json").read_text())["cars"]
    cars2 = json.loads((seq.folder / "objects" / "000002.json").read_text())["cars"]
    moved = [np.hypot(a["x"] - b["x"], a["y"] - b["y"]) for a, b in zip(cars0, cars2, strict=True)]
    assert min(moved) > 2.0  # >= 15 m/s for 0.2 s
    assert not np.allclose(seq.poses[0], seq.poses[2])


def test_bev_labels_and_dense_target(seq: LidarSequence) -> None:
    points, labels = seq.points(1), seq.labels(1)
    classes = bev_labels(points, labels, GRID)
    assert classes.shape == GRID.shape and classes.dtype == np.uint8
    assert (classes == 2).sum() > 20
    dense = seq.dense(1, GRID)
    assert dense.shape == GRID.shape and set(np.unique(dense)) <= {0.0, 1.0}
    # every wall cell seen by the sensor is in the dense obstacle map (allow one-cell edge effects)
    wall = classes == 2
    near = dense.copy()
    for axis in (0, 1):
        for shift in (-1, 1):
            near = np.maximum(near, np.roll(dense, shift, axis))
    assert near[wall].mean() > 0.9
    assert dense.sum() > wall.sum()  # the dense map also holds what the scan misses


def test_track_is_closed_and_deterministic() -> None:
    a, b = RaceTrack(seed=3), RaceTrack(seed=3)
    np.testing.assert_array_equal(a.cones, b.cones)
    p0, _ = a.at(0.0)
    p1, _ = a.at(a.length)
    np.testing.assert_allclose(p0, p1, atol=1e-6)


def test_bundled_sample_sequence() -> None:
    sample = LidarSequence(SAMPLE)
    assert len(sample) >= 8
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 4_000_000
    points = read_points(sample.scans[0])
    assert len(read_labels(SAMPLE / "labels" / "000000.label", len(points))) == len(points)
    assert dense_bev(sample.scene or {}, [], sample.poses[0], GRID).sum() > 0


def test_bad_label_file(tmp_path: Path) -> None:
    path = tmp_path / "x.label"
    path.write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match=r"x\.label.*truncated"):
        read_labels(path)
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="2 labels for 3 points"):
        read_labels(path, 3)
