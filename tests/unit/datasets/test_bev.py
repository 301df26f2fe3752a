"""BEV encoding: equality with the reference voxel method on real and generated scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesaic.datasets import read_points
from moesaic.datasets.bev import (
    PPN_GRID,
    BevEncoder,
    BevGrid,
    BevRingBuffer,
    multi_channel,
    ppn_occupancy,
    reference_voxel_occupancy,
    torch_multi_channel,
    torch_ppn_occupancy,
)
from tests.helpers.real_data import REAL_DATA

REAL = REAL_DATA
SAMPLE = Path(__file__).resolve().parents[3] / "moesaic" / "assets" / "sample_lidar" / "velodyne"
SCANS = [
    REAL / "kitti_000008.bin",
    REAL / "nuscenes_lidar_top.pcd.bin",
    SAMPLE / "000000.bin",
    SAMPLE / "000007.bin",
]


@pytest.mark.parametrize("scan", SCANS, ids=lambda p: p.name)
def test_ppn_occupancy_equals_reference(scan: Path) -> None:
    if not scan.is_file():
        pytest.skip(f"{scan} not present")
    points = read_points(scan)
    for shift in (0.0, 1.7):  # also lift the cloud so most points have z > 0
        pts = points.copy()
        pts[:, 2] += np.float32(shift)
        fast = ppn_occupancy(pts)
        assert fast.shape == (1000, 1000) and fast.dtype == np.bool_
        np.testing.assert_array_equal(fast, reference_voxel_occupancy(pts))
        assert fast.any()


def test_ppn_occupancy_cell_boundaries_and_garbage() -> None:
    edge = np.float32(0.2)
    pts = np.array(
        [
            [0.0, 0.0, 0.1, 0],  # -> cell (500, 500)
            [-100.0, -100.0, 1.0, 0],  # first cell
            [99.99, 99.99, 4.99, 0],  # last cell
            [100.0, 0.0, 1.0, 0],  # x out (half-open)
            [0.0, -100.01, 1.0, 0],  # y out
            [1.0, 1.0, 0.0, 0],  # z == 0 is not > 0
            [1.0, 1.0, 5.0, 0],  # z out (top)
            [np.nan, 1.0, 1.0, 0],
            [1.0, np.inf, 1.0, 0],
            [1e30, -1e30, 1.0, 0],
            [-edge / 2, edge / 2, 0.5, 0],  # floor of a negative fraction -> 499
        ],
        np.float32,
    )
    grid = ppn_occupancy(pts)
    np.testing.assert_array_equal(grid, reference_voxel_occupancy(pts))
    assert {tuple(c) for c in np.argwhere(grid)} == {(500, 500), (0, 0), (999, 999), (499, 500)}


def test_random_clouds_match_reference() -> None:
    rng = np.random.default_rng(3)
    for _ in range(3):
        pts = np.concatenate([rng.uniform(-110, 110, (20000, 3)), rng.random((20000, 1))], 1).astype(
            np.float32
        )
        pts[:, 2] /= 15
        # exact cell boundaries in float32
        pts[:500, :2] = np.round(pts[:500, :2] / 0.2) * np.float32(0.2)
        np.testing.assert_array_equal(ppn_occupancy(pts), reference_voxel_occupancy(pts))


def test_bad_points_are_rejected() -> None:
    with pytest.raises(ValueError, match="points: expected shape"):
        ppn_occupancy(np.zeros((10,), np.float32))
    with pytest.raises(ValueError, match="points"):
        multi_channel(np.array([["a", "b", "c", "d"]]))


def _naive_multi(pts: np.ndarray, grid: BevGrid) -> np.ndarray:
    nx, ny = grid.shape
    out = np.zeros((4, nx, ny), np.float32)
    cells: dict[tuple[int, int], list[np.ndarray]] = {}
    r = np.float32(grid.resolution)
    for p in pts:
        vx = p[0] / r + np.float32(-grid.x_range[0] / grid.resolution)
        vy = p[1] / r + np.float32(-grid.y_range[0] / grid.resolution)
        h = p[2] - np.float32(grid.z_range[0])
        if 0 <= vx < nx and 0 <= vy < ny and 0 <= h < grid.z_range[1] - grid.z_range[0]:
            cells.setdefault((int(vx), int(vy)), []).append(np.array([h, p[3]]))
    for (i, j), vals in cells.items():
        v = np.stack(vals)
        out[:, i, j] = [v[:, 0].max(), v[:, 0].min(), v[:, 1].mean(), np.log1p(len(v))]
    return out


@pytest.mark.parametrize(
    "grid", [BevGrid(1.0, (-20, 20), (-10, 30), (-2, 2)), BevGrid(0.5, (-8, 8), (-8, 8))]
)
def test_multi_channel_matches_naive_loop(grid: BevGrid) -> None:
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.normal(0, 8, (3000, 3)), rng.random((3000, 1))], 1).astype(np.float32)
    pts[:, 2] /= 4
    got = multi_channel(pts, grid)
    np.testing.assert_allclose(got, _naive_multi(pts, grid), atol=1e-5)
    # both code paths (small grid / large sparse grid) agree
    np.testing.assert_allclose(multi_channel(pts[:50], grid), _naive_multi(pts[:50], grid), atol=1e-5)
    buf = np.full((4, *grid.shape), 7.0, np.float32)
    assert multi_channel(pts, grid, out=buf) is buf
    np.testing.assert_allclose(buf, got)


def test_torch_variants_match_numpy() -> None:
    torch = pytest.importorskip("torch")
    pts = read_points(SAMPLE / "000003.bin")
    pts[:, 2] += 1.0
    t = torch.from_numpy(pts)
    np.testing.assert_array_equal(torch_ppn_occupancy(t).numpy(), ppn_occupancy(pts))
    grid = BevGrid(0.4, (-51.2, 51.2), (-51.2, 51.2))
    np.testing.assert_allclose(torch_multi_channel(t, grid).numpy(), multi_channel(pts, grid), atol=1e-5)


def test_ring_buffer_keeps_last_frames_oldest_first() -> None:
    buf = BevRingBuffer(3, (2, 4, 4))
    np.testing.assert_array_equal(buf.stacked(), np.zeros((6, 4, 4)))
    for k in range(1, 6):
        buf.push(np.full((2, 4, 4), k, np.float32))
        stacked = buf.stacked()
        expected = [max(0, k - 2), max(0, k - 2), max(0, k - 1), max(0, k - 1), k, k]
        assert [float(stacked[c, 0, 0]) for c in range(6)] == [float(v) for v in expected]
    with pytest.raises(ValueError, match="frame: expected shape"):
        buf.push(np.zeros((4, 4), np.float32))


def test_encoder_modes() -> None:
    pts = read_points(SAMPLE / "000000.bin")
    assert BevEncoder("ppn")(pts).shape == (1, 1000, 1000)
    assert BevEncoder("multi", BevGrid(0.4, (-51.2, 51.2), (-51.2, 51.2))).shape == (4, 256, 256)
    with pytest.raises(ValueError, match="fixed"):
        BevEncoder("ppn", BevGrid(0.4))
    assert PPN_GRID.shape == (1000, 1000) and PPN_GRID.layers == 50
