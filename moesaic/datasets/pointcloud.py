"""Reading LiDAR point clouds: KITTI ``.bin``, nuScenes ``.pcd.bin``, PCD, PLY and ``.npy``.

Every reader returns one layout: an ``(N, 4)`` float32 array of x, y, z, intensity in the
sensor frame (metres). Formats without intensity get intensity 0. A corrupt or truncated file
raises ``ValueError`` naming the file and the byte offset where it goes wrong.

    >>> from moesaic.datasets import read_points
    >>> points = read_points("/work/shared/data/real/kitti_000008.bin")  # doctest: +SKIP
    >>> points.shape[1], points.dtype
    (4, dtype('float32'))

A folder of scans is a :class:`PointCloudSequence`, ordered by the timestamp or frame number
in the file names (``000042.bin``, ``...__LIDAR_TOP__1532402927647951.pcd.bin``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

__all__ = ["POINT_FORMATS", "PointCloudSequence", "read_points", "write_kitti_bin"]

#: File suffixes :func:`read_points` understands, longest first.
POINT_FORMATS = (".pcd.bin", ".bin", ".pcd", ".ply", ".npy")

_FLOAT = np.dtype("<f4")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in POINT_FORMATS:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported point-cloud format; expected one of {', '.join(POINT_FORMATS)}")


def _check_finite(path: Path, points: np.ndarray, record_bytes: int, base: int = 0) -> None:
    if np.isfinite(points).all():  # one fast pass over the whole block; locate only on failure
        return
    bad = ~np.isfinite(points[:, :3]).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{path}: corrupt point {row}: non-finite coordinate at byte offset {base + row * record_bytes}"
        )


def _read_raw_floats(path: Path, columns: int) -> np.ndarray:
    size = path.stat().st_size
    record = columns * _FLOAT.itemsize
    if size % record:
        whole = size - size % record
        raise ValueError(
            f"{path}: truncated: {size} bytes is not a whole number of {columns}-float records "
            f"({record} bytes each); the last record starts at byte offset {whole} and is incomplete"
        )
    points = np.fromfile(path, dtype=_FLOAT).reshape(-1, columns)
    _check_finite(path, points[:, :3] if columns != 4 else points, record)
    return np.ascontiguousarray(points[:, :4])


def _read_npy(path: Path) -> np.ndarray:
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt .npy header at byte offset 0: {exc}") from None
        header_end = f.tell()
    size = path.stat().st_size
    expected = header_end + int(np.prod(shape)) * dtype.itemsize
    if size < expected:
        raise ValueError(
            f"{path}: truncated: data ends at byte offset {size}, expected {expected} bytes for shape {shape}"
        )
    if dtype.hasobject or len(shape) != 2 or shape[1] < 3:
        raise ValueError(f"{path}: expected a numeric (N, 3+) array, got shape {shape} dtype {dtype}")
    array = np.load(path, allow_pickle=False)
    points = np.zeros((shape[0], 4), np.float32)
    points[:, : min(4, shape[1])] = array[:, :4]
    _check_finite(path, points, shape[1] * dtype.itemsize, header_end)
    return points


def _header_lines(path: Path, data: bytes, end_marker: bytes, limit: int = 4096) -> tuple[list[str], int]:
    """ASCII header lines of a PCD/PLY file and the byte offset where the body starts."""
    offset = 0
    lines: list[str] = []
    while offset < min(len(data), limit):
        nl = data.find(b"\n", offset)
        if nl < 0:
            break
        line = data[offset:nl].decode("ascii", errors="replace").strip()
        lines.append(line)
        offset = nl + 1
        if line.encode().startswith(end_marker):
            return lines, offset
    raise ValueError(f"{path}: corrupt header: no {end_marker.decode()!r} line before byte offset {offset}")


def _check_pcd_body(path: Path, data: bytes) -> None:
    lines, body = _header_lines(path, data, b"DATA")
    fields = {ln.split()[0].upper(): ln.split()[1:] for ln in lines if ln and not ln.startswith("#")}
    kind = fields.get("DATA", ["?"])[0].lower()
    if kind != "binary":
        return
    try:
        points = int(fields["POINTS"][0])
        sizes = [int(s) for s in fields["SIZE"]]
        counts = [int(c) for c in fields.get("COUNT", ["1"] * len(sizes))]
        record = sum(s * c for s, c in zip(sizes, counts, strict=True))
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: corrupt PCD header (POINTS/SIZE/COUNT): {exc}") from None
    expected = body + points * record
    if len(data) < expected:
        raise ValueError(
            f"{path}: truncated: binary PCD body ends at byte offset {len(data)}, expected {expected} "
            f"({points} points x {record} bytes from offset {body})"
        )


_PLY_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2,
              "uint16": 2, "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4,
              "double": 8, "float64": 8}  # fmt: skip


def _check_ply_body(path: Path, data: bytes) -> None:
    if not data.startswith(b"ply"):
        raise ValueError(f"{path}: corrupt PLY: missing 'ply' magic at byte offset 0")
    lines, body = _header_lines(path, data, b"end_header")
    if not any(ln.startswith("format binary") for ln in lines):
        return
    total = 0
    count = 0
    for ln in lines:
        parts = ln.split()
        if parts[:1] == ["element"]:
            count = int(parts[2])
        elif parts[:1] == ["property"]:
            if parts[1] == "list":
                return  # variable-size records (faces): leave the check to the parser
            total += count * _PLY_SIZES.get(parts[1], 4)
    if len(data) < body + total:
        raise ValueError(
            f"{path}: truncated: binary PLY body ends at byte offset {len(data)}, expected {body + total}"
        )


def _read_open3d(path: Path, suffix: str) -> np.ndarray:
    data = path.read_bytes()
    if suffix == ".pcd":
        _check_pcd_body(path, data)
    else:
        _check_ply_body(path, data)
    try:
        import open3d as o3d
    except ImportError:
        from moesaic.runtime.engine import MissingExtraError

        raise MissingExtraError("open3d", "lidar") from None
    cloud = o3d.t.io.read_point_cloud(str(path))  # type: ignore[arg-type]
    if "positions" not in cloud.point or len(cloud.point["positions"]) == 0:
        if len(data) > 0 and b"POINTS 0" not in data[:4096] and b"vertex 0" not in data[:4096]:
            raise ValueError(
                f"{path}: corrupt {suffix[1:].upper()} file: no points could be read from byte offset 0"
            )
        return np.zeros((0, 4), np.float32)
    xyz = cloud.point["positions"].numpy()
    points = np.zeros((xyz.shape[0], 4), np.float32)
    points[:, :3] = xyz
    for name in ("intensity", "intensities", "reflectance"):
        if name in cloud.point:
            points[:, 3] = cloud.point[name].numpy().reshape(-1)
            break
    _check_finite(path, points, 0)
    return points


def read_points(path: str | Path) -> np.ndarray:
    """Read one scan as an ``(N, 4)`` float32 array (x, y, z, intensity).

    KITTI ``.bin`` holds 4 float32 per point, nuScenes ``.pcd.bin`` 5 (the fifth, the ring
    index, is dropped); ``.pcd`` and ``.ply`` go through open3d (``moesaic[lidar]``);
    ``.npy`` holds an ``(N, 3+)`` numeric array. Raises ``ValueError`` naming the file and the
    byte offset for truncated or corrupt files, and ``FileNotFoundError`` for missing ones.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such point-cloud file")
    if suffix == ".pcd.bin":
        return _read_raw_floats(path, 5)
    if suffix == ".bin":
        return _read_raw_floats(path, 4)
    if suffix == ".npy":
        return _read_npy(path)
    return _read_open3d(path, suffix)


def write_kitti_bin(path: str | Path, points: np.ndarray) -> None:
    """Write ``(N, 4)`` points as a KITTI ``.bin`` file (float32 x, y, z, intensity)."""
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"points: expected shape (N, 4), got {array.shape}")
    Path(path).write_bytes(np.ascontiguousarray(array, dtype=_FLOAT).tobytes())


_DIGITS = re.compile(r"\d+")


def _frame_key(path: Path) -> tuple[int, str]:
    stem = path.name
    for suffix in POINT_FORMATS:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    runs = _DIGITS.findall(stem)
    if not runs:
        raise ValueError(f"{path}: file name holds no frame number or timestamp to order the sequence by")
    return int(runs[-1]), path.name


class PointCloudSequence(Sequence[np.ndarray]):
    """The scans of one folder, ordered by the last number in each file name.

    ``len(seq)``, ``seq[i]`` (reads the file) and iteration; ``seq.paths`` lists the files and
    ``seq.stamps`` the numbers they are ordered by (a timestamp or a frame index).
    """

    def __init__(self, folder: str | Path, *, pattern: str = "*") -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: not a folder of scans")
        files = [
            p
            for p in self.folder.glob(pattern)
            if p.is_file() and any(p.name.lower().endswith(s) for s in POINT_FORMATS)
        ]
        keyed = sorted((_frame_key(p), p) for p in files)
        self.paths: list[Path] = [p for _, p in keyed]
        self.stamps: list[int] = [k[0] for k, _ in keyed]

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...
    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [read_points(p) for p in self.paths[index]]
        return read_points(self.paths[index])

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            yield read_points(path)
