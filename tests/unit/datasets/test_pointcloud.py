"""Point-cloud IO: every format, real KITTI / nuScenes scans, corrupt and truncated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesaic.datasets import read_points
from moesaic.datasets.pointcloud import PointCloudSequence, write_kitti_bin
from tests.helpers.real_data import REAL_DATA

REAL = REAL_DATA
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="real sensor data not present")


def _cloud(n: int = 500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = rng.normal(0, 20, (n, 4)).astype(np.float32)
    pts[:, 3] = rng.random(n)
    return pts


@needs_real
def test_real_kitti_scan() -> None:
    points = read_points(REAL / "kitti_000008.bin")
    assert points.dtype == np.float32 and points.shape == (275808 // 16, 4)
    raw = np.fromfile(REAL / "kitti_000008.bin", np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(points, raw)
    assert points[:, 3].min() >= 0.0 and points[:, 3].max() <= 1.0


@needs_real
def test_real_nuscenes_scan_drops_ring_index() -> None:
    points = read_points(REAL / "nuscenes_lidar_top.pcd.bin")
    raw = np.fromfile(REAL / "nuscenes_lidar_top.pcd.bin", np.float32).reshape(-1, 5)
    assert points.shape == (raw.shape[0], 4)
    np.testing.assert_array_equal(points, raw[:, :4])


def test_npy_with_and_without_intensity(tmp_path: Path) -> None:
    pts = _cloud()
    np.save(tmp_path / "a.npy", pts)
    np.testing.assert_array_equal(read_points(tmp_path / "a.npy"), pts)
    np.save(tmp_path / "b.npy", pts[:, :3].astype(np.float64))
    got = read_points(tmp_path / "b.npy")
    np.testing.assert_allclose(got[:, :3], pts[:, :3])
    assert (got[:, 3] == 0).all()


@pytest.mark.parametrize("suffix", [".pcd", ".ply"])
def test_open3d_formats_roundtrip(tmp_path: Path, suffix: str) -> None:
    o3d = pytest.importorskip("open3d")
    pts = _cloud()
    cloud = o3d.t.geometry.PointCloud()
    cloud.point["positions"] = o3d.core.Tensor(pts[:, :3])
    cloud.point["intensity"] = o3d.core.Tensor(pts[:, 3:4])
    path = tmp_path / f"scan{suffix}"
    assert o3d.t.io.write_point_cloud(str(path), cloud)
    got = read_points(path)
    np.testing.assert_allclose(got, pts, rtol=1e-6)
    # without intensity: zeros
    plain = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts[:, :3].astype(np.float64)))
    path2 = tmp_path / f"plain{suffix}"
    assert o3d.io.write_point_cloud(str(path2), plain)
    got2 = read_points(path2)
    np.testing.assert_allclose(got2[:, :3], pts[:, :3], rtol=1e-6)
    assert (got2[:, 3] == 0).all()


def test_truncated_bin_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "000001.bin"
    path.write_bytes(_cloud(10).tobytes()[:-6])
    with pytest.raises(ValueError, match=r"000001\.bin.*truncated.*byte offset 144"):
        read_points(path)


def test_truncated_nuscenes_names_offset(tmp_path: Path) -> None:
    path = tmp_path / "x.pcd.bin"
    path.write_bytes(np.zeros((4, 5), np.float32).tobytes()[:-1])
    with pytest.raises(ValueError, match=r"x\.pcd\.bin.*byte offset 60"):
        read_points(path)


def test_non_finite_point_is_corrupt(tmp_path: Path) -> None:
    pts = _cloud(10)
    pts[3, 1] = np.nan
    path = tmp_path / "nan.bin"
    write_kitti_bin(path, pts)
    with pytest.raises(ValueError, match=r"nan\.bin.*point 3.*byte offset 48"):
        read_points(path)


def test_truncated_npy(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, _cloud(100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"t\.npy.*truncated.*byte offset"):
        read_points(path)


def test_truncated_binary_pcd(tmp_path: Path) -> None:
    o3d = pytest.importorskip("open3d")
    cloud = o3d.t.geometry.PointCloud()
    cloud.point["positions"] = o3d.core.Tensor(_cloud(50)[:, :3])
    path = tmp_path / "t.pcd"
    o3d.t.io.write_point_cloud(str(path), cloud, write_ascii=False, compressed=False)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"t\.pcd.*truncated.*byte offset"):
        read_points(path)


def test_unsupported_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        read_points(tmp_path / "scan.las")
    with pytest.raises(FileNotFoundError):
        read_points(tmp_path / "none.bin")


def test_sequence_sorted_by_number_in_name(tmp_path: Path) -> None:
    stamps = [1532402927947951, 1532402927647951, 1532402927797951]
    for i, stamp in enumerate(stamps):
        write_kitti_bin(tmp_path / f"n008__LIDAR_TOP__{stamp}.bin", np.full((i + 1, 4), i, np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    seq = PointCloudSequence(tmp_path)
    assert seq.stamps == sorted(stamps)
    assert [len(p) for p in seq] == [2, 3, 1]
    assert len(seq[0:2]) == 2
