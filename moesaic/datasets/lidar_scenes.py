"""Synthetic labelled LiDAR scenes: a race track ray-cast with open3d's RaycastingScene.

A closed track (a wobbly loop) with a concrete wall on each side, traffic cones near the
walls, other cars that drive round the track at their own speeds, and the ego car carrying a
spinning multi-beam LiDAR (64 beams x 1024 azimuth steps by default, range noise, dropouts).
Every point carries a semantic label (:data:`CLASS_NAMES`); labels become BEV label maps with
:func:`bev_labels`, and :func:`dense_bev` rasterises the true obstacle footprints (walls,
cones, cars, occluded parts included) — the reconstruction target.

Sequences are written in the KITTI / SemanticKITTI layout::

    DIR/velodyne/000000.bin     float32 x, y, z, intensity (sensor frame)
    DIR/labels/000000.label     uint32 class id per point
    DIR/poses.txt               one 3x4 sensor-to-world matrix per line
    DIR/objects/000000.json     the moving cars of that frame (world frame)
    DIR/scene.json              track, walls, cones, sensor and class names

    >>> from moesaic.datasets.lidar_scenes import generate_sequence, LidarSequence
    >>> generate_sequence("/tmp/seq", frames=4, seed=1)  # doctest: +SKIP
    >>> seq = LidarSequence("/tmp/seq"); points, labels = seq.points(0), seq.labels(0)  # doctest: +SKIP

open3d is needed to generate (``moesaic[lidar]``), not to read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.datasets.bev import BevGrid
from moesaic.datasets.pointcloud import read_points, write_kitti_bin

__all__ = [
    "CLASS_NAMES",
    "LidarSequence",
    "RaceTrack",
    "SceneConfig",
    "SensorModel",
    "bev_labels",
    "dense_bev",
    "generate_sequence",
    "read_labels",
]

#: Semantic classes; the id is the index. Higher ids win when a BEV cell holds several.
CLASS_NAMES = ("empty", "ground", "wall", "cone", "vehicle")
GROUND, WALL, CONE, VEHICLE = 1, 2, 3, 4
_REFLECTIVITY = np.array([0.0, 0.15, 0.45, 0.9, 0.6], np.float32)


@dataclass(frozen=True)
class SensorModel:
    """A spinning multi-beam LiDAR (defaults after a 64-beam automotive unit)."""

    beams: int = 64
    azimuth_steps: int = 1024
    elevation_deg: tuple[float, float] = (-24.9, 2.0)
    max_range: float = 100.0
    min_range: float = 1.0
    range_noise: float = 0.02
    dropout: float = 0.05
    height: float = 0.8  # metres above the ground (a race car's roll hoop)


@dataclass(frozen=True)
class SceneConfig:
    """Track geometry and traffic."""

    radius: float = 70.0
    width: float = 14.0
    wobble: tuple[float, float] = (0.18, 0.08)  # amplitudes of the 2nd and 3rd harmonic
    wall_height: float = 1.2
    wall_thickness: float = 0.4
    cones: int = 60
    cars: int = 5
    car_size: tuple[float, float, float] = (4.8, 1.9, 1.1)
    ego_speed: float = 25.0  # m/s
    frame_rate: float = 10.0  # Hz


@dataclass
class Car:
    """A car driving the track: arc-length start, speed and lateral offset."""

    s0: float
    speed: float
    offset: float
    size: tuple[float, float, float]


@dataclass
class RaceTrack:
    """A random race track with its cones and cars; ``config`` and ``seed`` fix it."""

    config: SceneConfig = field(default_factory=SceneConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        c = self.config
        phase = rng.uniform(0, 2 * np.pi, 2)
        theta = np.linspace(0, 2 * np.pi, 721)[:-1]
        r = c.radius * (
            1 + c.wobble[0] * np.cos(2 * theta + phase[0]) + c.wobble[1] * np.sin(3 * theta + phase[1])
        )
        self.centerline = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
        seg = np.diff(np.vstack([self.centerline, self.centerline[:1]]), axis=0)
        self.seg_len = np.linalg.norm(seg, axis=1)
        self.arc = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.length = float(self.arc[-1])
        tangent = seg / self.seg_len[:, None]
        self.normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)  # left of travel
        half = c.width / 2 + c.wall_thickness / 2
        self.walls = [self.centerline + half * self.normal, self.centerline - half * self.normal]
        s = rng.uniform(0, self.length, c.cones)
        side = rng.choice([-1.0, 1.0], c.cones)
        lateral = side * (c.width / 2 - rng.uniform(0.4, 1.5, c.cones))
        self.cones = np.array([self.at(si, li)[0] for si, li in zip(s, lateral, strict=True)]).reshape(-1, 2)
        self.cars = [
            Car(
                float(rng.uniform(0, self.length)),
                float(rng.uniform(15, 35)),
                float(rng.uniform(-4, 4)),
                c.car_size,
            )
            for _ in range(c.cars)
        ]

    def at(self, s: float, lateral: float = 0.0) -> tuple[np.ndarray, float]:
        """World (x, y) and heading (rad) at arc length ``s`` and lateral offset (left +)."""
        s = s % self.length
        i = int(np.searchsorted(self.arc, s, side="right") - 1)
        frac = (s - self.arc[i]) / self.seg_len[i]
        a, b = self.centerline[i], self.centerline[(i + 1) % len(self.centerline)]
        point = a + frac * (b - a) + lateral * self.normal[i]
        heading = math.atan2(b[1] - a[1], b[0] - a[0])
        return point, heading

    def cars_at(self, t: float) -> list[dict[str, Any]]:
        """The cars at time ``t`` (s): centre x, y, yaw and size, world frame."""
        out = []
        for car in self.cars:
            (x, y), yaw = self.at(car.s0 + car.speed * t, car.offset)
            out.append({"x": float(x), "y": float(y), "yaw": yaw, "size": list(car.size)})
        return out

    def ego_pose(self, t: float) -> np.ndarray:
        """4x4 sensor-to-world transform of the ego LiDAR at time ``t``."""
        (x, y), yaw = self.at(self.config.ego_speed * t, 0.0)
        pose = np.eye(4)
        pose[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
        pose[:3, 3] = [x, y, 0.0]
        return pose

    def to_json(self) -> dict[str, Any]:
        """Static scene description (walls, cones) for ``scene.json``."""
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "walls": [w.round(3).tolist() for w in self.walls],
            "cones": self.cones.round(3).tolist(),
        }


def _ribbon(polyline: np.ndarray, thickness: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of a closed wall of ``thickness`` x ``height`` along ``polyline``."""
    n = len(polyline)
    nxt = np.roll(polyline, -1, axis=0)
    prv = np.roll(polyline, 1, axis=0)
    tangent = nxt - prv
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1) * (thickness / 2)
    corners = [polyline + normal, polyline - normal]
    verts = np.zeros((n, 4, 3))
    for k, (c, z) in enumerate([(0, 0.0), (1, 0.0), (0, height), (1, height)]):
        verts[:, k, :2] = corners[c]
        verts[:, k, 2] = z
    i = np.arange(n)[:, None] * 4
    j = ((np.arange(n) + 1) % n)[:, None] * 4
    quads = [(0, 2), (1, 3), (2, 3)]  # left face, right face, top
    tris = []
    for a, b in quads:
        tris.append(np.hstack([i + a, j + a, j + b]))
        tris.append(np.hstack([i + a, j + b, i + b]))
    return verts.reshape(-1, 3), np.vstack(tris)


def _box(
    center: tuple[float, float], yaw: float, size: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    length, width, height = size
    corners = np.array([[sx * length / 2, sy * width / 2, sz * height] for sz in (0, 1) for sy in (-1, 1)
                        for sx in (-1, 1)])  # fmt: skip
    rot = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    corners[:, :2] = corners[:, :2] @ rot.T + np.asarray(center)
    tris = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                     [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])  # fmt: skip
    return corners, tris


def _cone(
    center: np.ndarray, radius: float = 0.15, height: float = 0.7, sides: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    ang = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    ring = np.stack(
        [center[0] + radius * np.cos(ang), center[1] + radius * np.sin(ang), np.zeros(sides)], axis=1
    )
    verts = np.vstack([ring, [[center[0], center[1], height]]])
    k = np.arange(sides)
    tris = np.stack([k, (k + 1) % sides, np.full(sides, sides)], axis=1)
    return verts, tris


class _Caster:
    """Builds the RaycastingScene of one frame and casts the sensor's rays into it."""

    def __init__(self, track: RaceTrack, sensor: SensorModel) -> None:
        try:
            import open3d as o3d
        except ImportError:
            from moesaic.runtime.engine import MissingExtraError

            raise MissingExtraError("open3d", "lidar") from None
        self.o3d = o3d
        self.track = track
        self.sensor = sensor
        c = track.config
        self.static: list[tuple[np.ndarray, np.ndarray, int]] = [
            (*_ribbon(w, c.wall_thickness, c.wall_height), WALL) for w in track.walls
        ]
        for cone in track.cones:
            self.static.append((*_cone(cone), CONE))
        elev = np.deg2rad(np.linspace(*sensor.elevation_deg, sensor.beams))
        azim = np.linspace(-np.pi, np.pi, sensor.azimuth_steps, endpoint=False)
        e, a = np.meshgrid(elev, azim, indexing="ij")
        self.dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)

    def cast(self, t: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o3d = self.o3d
        pose = self.track.ego_pose(t)
        scene = o3d.t.geometry.RaycastingScene()
        classes = [0]
        meshes = list(self.static)
        ego = pose[:2, 3]
        ground = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float) * [200, 200, 0] + [*ego, 0]
        meshes.append((ground, np.array([[0, 1, 2], [0, 2, 3]]), GROUND))
        for car in self.track.cars_at(t):
            meshes.append((*_box((car["x"], car["y"]), car["yaw"], tuple(car["size"])), VEHICLE))
        for verts, tris, cls in meshes:
            gid = scene.add_triangles(
                o3d.core.Tensor(verts.astype(np.float32)), o3d.core.Tensor(tris.astype(np.uint32))
            )
            classes.extend([0] * (gid + 1 - len(classes)))
            classes[gid] = cls
        lut = np.array(classes, np.uint32)
        origin = pose[:3, 3] + [0, 0, self.sensor.height]
        world_dirs = self.dirs @ pose[:3, :3].T
        rays = np.hstack([np.broadcast_to(origin, world_dirs.shape), world_dirs]).astype(np.float32)
        hit = scene.cast_rays(o3d.core.Tensor(rays))
        dist = hit["t_hit"].numpy()
        gid = hit["geometry_ids"].numpy()
        normal = hit["primitive_normals"].numpy()
        s = self.sensor
        ok = np.isfinite(dist) & (dist <= s.max_range) & (dist >= s.min_range)
        ok &= rng.random(dist.shape) >= s.dropout
        dist = dist[ok] + rng.normal(0, s.range_noise, ok.sum()).astype(np.float32)
        labels = lut[np.minimum(gid[ok], len(lut) - 1)]
        cos_inc = np.abs(np.sum(normal[ok] * world_dirs[ok], axis=1))
        intensity = _REFLECTIVITY[labels] * (0.3 + 0.7 * cos_inc) + rng.normal(0, 0.02, ok.sum())
        points = np.empty((int(ok.sum()), 4), np.float32)
        points[:, :3] = self.dirs[ok] * dist[:, None]  # sensor frame
        points[:, 3] = np.clip(intensity, 0.0, 1.0)
        return points, labels, pose


def generate_sequence(
    out_dir: str | Path,
    *,
    frames: int,
    seed: int = 0,
    scene: SceneConfig | None = None,
    sensor: SensorModel | None = None,
    start_time: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Ray-cast ``frames`` scans of a random track (``seed``) into ``out_dir`` (KITTI layout)."""
    if frames < 1:
        raise ValueError(f"frames: must be >= 1, got {frames}")
    out = Path(out_dir)
    for sub in ("velodyne", "labels", "objects"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    track = RaceTrack(scene or SceneConfig(), seed)
    sensor = sensor or SensorModel()
    caster = _Caster(track, sensor)
    rng = np.random.default_rng(seed + 7919)
    poses = []
    for i in range(frames):
        t = start_time + i / track.config.frame_rate
        points, labels, pose = caster.cast(t, rng)
        write_kitti_bin(out / "velodyne" / f"{i:06d}.bin", points)
        labels.astype("<u4").tofile(out / "labels" / f"{i:06d}.label")
        (out / "objects" / f"{i:06d}.json").write_text(json.dumps({"time": t, "cars": track.cars_at(t)}))
        pose_sensor = pose.copy()
        pose_sensor[2, 3] += sensor.height
        poses.append(" ".join(f"{v:.6f}" for v in pose_sensor[:3].reshape(-1)))
        if progress:
            progress(i + 1, frames)
    (out / "poses.txt").write_text("\n".join(poses) + "\n")
    meta = track.to_json() | {"sensor": asdict(sensor), "classes": list(CLASS_NAMES), "frames": frames}
    (out / "scene.json").write_text(json.dumps(meta))
    return out


def read_labels(path: str | Path, points: int | None = None) -> np.ndarray:
    """SemanticKITTI-style ``.label`` file: uint32 per point (the lower 16 bits are the class)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) % 4:
        raise ValueError(f"{path}: truncated: {len(data)} bytes is not a multiple of 4 (uint32 per point)")
    labels = np.frombuffer(data, "<u4") & 0xFFFF
    if points is not None and len(labels) != points:
        raise ValueError(f"{path}: {len(labels)} labels for {points} points")
    return labels


def bev_labels(points: np.ndarray, labels: np.ndarray, grid: BevGrid) -> np.ndarray:
    """``(nx, ny)`` uint8 class map: per cell the highest class id among its points (0 = empty)."""
    nx, ny = grid.shape
    vx = points[:, 0] / np.float32(grid.resolution) - np.float32(grid.x_range[0] / grid.resolution)
    vy = points[:, 1] / np.float32(grid.resolution) - np.float32(grid.y_range[0] / grid.resolution)
    z = points[:, 2]
    keep = (vx >= 0) & (vx < nx) & (vy >= 0) & (vy < ny) & (z >= grid.z_range[0]) & (z < grid.z_range[1])
    flat = vx[keep].astype(np.intp) * ny + vy[keep].astype(np.intp)
    out = np.zeros(nx * ny, np.uint8)
    np.maximum.at(out, flat, labels[keep].astype(np.uint8))
    return out.reshape(nx, ny)


def _footprints(scene: dict[str, Any], cars: list[dict[str, Any]], step: float) -> np.ndarray:
    """World (x, y) samples covering every obstacle's footprint, ``step`` apart."""
    chunks = []
    thickness = scene["config"]["wall_thickness"]
    for wall in scene["walls"]:
        w = np.asarray(wall)
        b = np.roll(w, -1, axis=0)
        n = max(2, int(np.ceil(np.max(np.linalg.norm(b - w, axis=1)) / step)) + 1)
        f = np.linspace(0, 1, n)[None, :, None]
        line = (w[:, None] + f * (b - w)[:, None]).reshape(-1, 2)
        tangent = np.repeat(b - w, n, axis=0)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) / np.linalg.norm(tangent, axis=1, keepdims=True)
        for off in np.linspace(-thickness / 2, thickness / 2, max(2, int(thickness / step) + 1)):
            chunks.append(line + off * normal)
    cones = np.asarray(scene["cones"]).reshape(-1, 2)
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    disc = np.vstack([[0.0, 0.0], 0.15 * np.stack([np.cos(ang), np.sin(ang)], 1)])
    chunks.append((cones[:, None] + disc[None]).reshape(-1, 2))
    for car in cars:
        length, width, _ = car["size"]
        gx, gy = np.meshgrid(
            np.arange(-length / 2, length / 2 + 1e-6, step), np.arange(-width / 2, width / 2 + 1e-6, step)
        )
        local = np.stack([gx.ravel(), gy.ravel()], 1)
        c, s = math.cos(car["yaw"]), math.sin(car["yaw"])
        chunks.append(local @ np.array([[c, s], [-s, c]]) + [car["x"], car["y"]])
    return np.vstack(chunks)


def dense_bev(
    scene: dict[str, Any], cars: list[dict[str, Any]], pose: np.ndarray, grid: BevGrid
) -> np.ndarray:
    """``(nx, ny)`` float32: 1 where a wall, cone or car stands (occluded or not), sensor frame."""
    world = _footprints(scene, cars, step=grid.resolution / 2)
    inv = np.linalg.inv(pose)
    local = world @ inv[:2, :2].T + inv[:2, 3]
    nx, ny = grid.shape
    vx = (local[:, 0] - grid.x_range[0]) / grid.resolution
    vy = (local[:, 1] - grid.y_range[0]) / grid.resolution
    keep = (vx >= 0) & (vx < nx) & (vy >= 0) & (vy < ny)
    out = np.zeros((nx, ny), np.float32)
    out[vx[keep].astype(np.intp), vy[keep].astype(np.intp)] = 1.0
    return out


class LidarSequence:
    """A sequence in the layout :func:`generate_sequence` writes (or plain KITTI ``velodyne/``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        velodyne = self.folder / "velodyne"
        if not velodyne.is_dir():
            raise FileNotFoundError(f"{self.folder}: no velodyne/ folder (KITTI layout expected)")
        self.scans = sorted(velodyne.glob("*.bin"))
        meta = self.folder / "scene.json"
        self.scene: dict[str, Any] | None = json.loads(meta.read_text()) if meta.is_file() else None
        poses = self.folder / "poses.txt"
        self.poses: list[np.ndarray] = []
        if poses.is_file():
            for line in poses.read_text().split("\n"):
                if line.strip():
                    m = np.eye(4)
                    m[:3] = np.array(line.split(), float).reshape(3, 4)
                    self.poses.append(m)

    def __len__(self) -> int:
        return len(self.scans)

    def points(self, i: int) -> np.ndarray:
        """Scan ``i`` as ``(N, 4)`` float32."""
        return read_points(self.scans[i])

    def labels(self, i: int) -> np.ndarray:
        """Per-point class ids of scan ``i``."""
        return read_labels(self.folder / "labels" / (self.scans[i].stem + ".label"))

    def dense(self, i: int, grid: BevGrid) -> np.ndarray:
        """The true obstacle footprint map of frame ``i`` (:func:`dense_bev`)."""
        if self.scene is None or not self.poses:
            raise ValueError(f"{self.folder}: no scene.json/poses.txt, so no dense BEV target")
        cars = json.loads((self.folder / "objects" / (self.scans[i].stem + ".json")).read_text())["cars"]
        return dense_bev(self.scene, cars, self.poses[i], grid)
