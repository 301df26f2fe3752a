"""Bird's-eye-view (BEV) encoding of LiDAR scans, on the CPU (numpy) and the GPU (torch).

Two modes:

* **ppn** — the occupancy grid of the Parallel Perception Network (arXiv 2412.18165):
  0.2 m cells, 1000 x 1000 (x, y in [-100, 100) m), z in [-5, 5) m in 50 layers,
  ``ix = floor(x / 0.2 + 500)`` (same for y), ``iz = floor(z / 0.2 + 25)``; a cell is occupied
  when it holds a point inside the grid with ``z > 0``. :func:`ppn_occupancy` computes it
  exactly (the same float32 arithmetic), :func:`reference_voxel_occupancy` the way the
  reference does, through a full 3D voxel grid (kept for the equality test and benchmark).
* **multi** — four channels per cell on a configurable :class:`BevGrid`: max height, min
  height, mean intensity and ``log1p(point count)``; empty cells are 0 in every channel.

Arrays are indexed ``[ix, iy]`` (x along the first axis). :class:`BevRingBuffer` stacks the
last T frames as channels, oldest first.

    >>> import numpy as np
    >>> from moesaic.datasets.bev import ppn_occupancy
    >>> grid = ppn_occupancy(np.array([[1.0, -2.0, 0.5, 0.3]], np.float32))
    >>> grid.shape, bool(grid[505, 490])
    ((1000, 1000), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "MULTI_CHANNELS",
    "PPN_GRID",
    "BevEncoder",
    "BevGrid",
    "BevMode",
    "BevRingBuffer",
    "check_points",
    "multi_channel",
    "ppn_occupancy",
    "reference_voxel_occupancy",
    "torch_multi_channel",
    "torch_ppn_occupancy",
]

BevMode = Literal["ppn", "multi"]
#: Channel names of the multi mode, in order.
MULTI_CHANNELS = ("max_height", "min_height", "mean_intensity", "log_density")

_F32 = np.float32


@dataclass(frozen=True)
class BevGrid:
    """A BEV grid: cell size and the x, y, z ranges it covers (metres, half-open)."""

    resolution: float = 0.2
    x_range: tuple[float, float] = (-100.0, 100.0)
    y_range: tuple[float, float] = (-100.0, 100.0)
    z_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ValueError(f"resolution: must be > 0, got {self.resolution}")
        for name in ("x_range", "y_range", "z_range"):
            lo, hi = getattr(self, name)
            if not hi > lo:
                raise ValueError(f"{name}: expected (low, high) with high > low, got {(lo, hi)}")

    @property
    def shape(self) -> tuple[int, int]:
        """(cells along x, cells along y)."""
        return (
            round((self.x_range[1] - self.x_range[0]) / self.resolution),
            round((self.y_range[1] - self.y_range[0]) / self.resolution),
        )

    @property
    def layers(self) -> int:
        """Voxel layers along z."""
        return round((self.z_range[1] - self.z_range[0]) / self.resolution)

    def cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """x and y of every cell centre, each of shape :attr:`shape`."""
        nx, ny = self.shape
        xs = self.x_range[0] + (np.arange(nx) + 0.5) * self.resolution
        ys = self.y_range[0] + (np.arange(ny) + 0.5) * self.resolution
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        return gx, gy


#: The reference PPN grid: 0.2 m, 1000 x 1000, z in [-5, 5) m with 50 layers.
PPN_GRID = BevGrid()


def check_points(points: Any, name: str = "points") -> np.ndarray:
    """Validate an ``(N, 3+)`` array and return it as float32; ``ValueError`` naming ``name``."""
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] < 3:
        raise ValueError(f"{name}: expected shape (N, 4) (x, y, z, intensity), got {array.shape}")
    if array.dtype != _F32:
        if array.dtype.kind not in "fiu":
            raise ValueError(f"{name}: expected float32 values, got dtype {array.dtype}")
        array = array.astype(_F32)
    return array


def _cell_index(
    coord: np.ndarray, resolution: float, low: float, cells: int, scratch: np.ndarray | None = None
) -> np.ndarray:
    """``floor(coord / resolution + cells / 2)``-style index as uint32; out-of-range -> >= cells.

    The float32 arithmetic is exactly the reference's ``x / 0.2 + 500``: division by the float32
    resolution, then the float32 offset. Negative values and NaN wrap to huge unsigned values.
    """
    offset = _F32(-low / resolution)
    v = np.divide(coord, _F32(resolution), out=scratch)
    v += offset
    np.floor(v, out=v)
    with np.errstate(invalid="ignore"):
        return v.astype(np.int32).view(np.uint32)


def ppn_occupancy(points: Any) -> np.ndarray:
    """The PPN occupancy grid of one scan: ``(1000, 1000)`` bool indexed ``[ix, iy]``.

    Exactly the reference definition (see the module docstring), in the same float32
    arithmetic; no Python loop over points. When few points have ``z > 0`` (a typical scan
    with the sensor above the ground) they are filtered out first; otherwise every column is
    indexed in place. Either way, the rest is integer math and one fancy assignment into a
    flat bool grid.
    """
    pts = check_points(points)
    positive = pts[:, 2] > 0
    above: np.ndarray | None = positive
    if int(np.count_nonzero(positive)) * 3 < len(pts):
        pts = np.compress(positive, pts, axis=0)
        above = None
    z = pts[:, 2]
    zi = np.divide(z, _F32(0.2))
    zi += _F32(25.0)
    # floor(z / 0.2 + 25) < 50  <=>  z / 0.2 + 25 < 50: the top of the voxel grid.
    keep = zi < _F32(50.0)
    if above is not None:
        keep &= above
    ix = _cell_index(pts[:, 0], 0.2, -100.0, 1000, zi)
    iy = _cell_index(pts[:, 1], 0.2, -100.0, 1000)
    keep &= ix < 1000
    keep &= iy < 1000
    ix *= 1000
    ix += iy
    grid = np.zeros(1000 * 1000, np.bool_)
    grid[ix[keep].astype(np.intp)] = True
    occupancy: np.ndarray = grid.reshape(1000, 1000)
    return occupancy


def reference_voxel_occupancy(points: Any) -> np.ndarray:
    """The reference method: fill a 1000 x 1000 x 50 voxel grid, then reduce the z > 0 layers.

    Kept as the ground truth :func:`ppn_occupancy` is tested against and the baseline of
    ``bench/bev_encoding.py``; allocates a 50 MB grid per call.
    """
    pts = check_points(points)
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ix = np.floor(x / _F32(0.2) + _F32(500))
    iy = np.floor(y / _F32(0.2) + _F32(500))
    iz = np.floor(z / _F32(0.2) + _F32(25))
    inside = (ix >= 0) & (ix < 1000) & (iy >= 0) & (iy < 1000) & (iz >= 0) & (iz < 50)
    voxels = np.zeros((1000, 1000, 50), np.bool_)
    above = inside & (z > 0)
    voxels[ix[above].astype(np.int64), iy[above].astype(np.int64), iz[above].astype(np.int64)] = True
    return np.asarray(voxels.any(axis=2))


def _multi_select(pts: np.ndarray, grid: BevGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flat cell index (intp), height above the floor and intensity of the points inside ``grid``."""
    nx, ny = grid.shape
    cols = np.ascontiguousarray(pts.T)  # one pass; every later op runs on contiguous columns
    res = _F32(grid.resolution)
    vx = np.divide(cols[0], res)
    vx += _F32(-grid.x_range[0] / grid.resolution)
    vy = np.divide(cols[1], res)
    vy += _F32(-grid.y_range[0] / grid.resolution)
    height = np.subtract(cols[2], _F32(grid.z_range[0]))
    keep = vx >= 0
    keep &= vx < nx
    keep &= vy >= 0
    keep &= vy < ny
    keep &= height >= 0
    keep &= height < _F32(grid.z_range[1] - grid.z_range[0])
    idx = np.flatnonzero(keep)
    with np.errstate(invalid="ignore"):
        flat = vx.astype(np.int32)  # truncation == floor for the kept (non-negative) values
        flat *= ny
        flat += vy.astype(np.int32)
    intensity = cols[3].take(idx) if cols.shape[0] > 3 else None
    return flat.take(idx).astype(np.intp), height.take(idx), intensity


def multi_channel(points: Any, grid: BevGrid = PPN_GRID, *, out: np.ndarray | None = None) -> np.ndarray:
    """Four channels per cell: ``(4, nx, ny)`` float32, see :data:`MULTI_CHANNELS`.

    0. max height, 1. min height: metres above the grid's floor (``z - z_range[0]``), so an
       occupied cell is > 0 and an empty one is 0;
    2. mean intensity of the cell's points;
    3. ``log1p`` of the cell's point count.

    Points outside ``grid`` (x, y or z) are dropped; empty cells are 0 in every channel. Work is
    O(points), plus O(cells) when the grid is small next to the scan (pass ``out`` to reuse a
    buffer).
    """
    pts = check_points(points)
    nx, ny = grid.shape
    cells = nx * ny
    if out is None:
        result = np.zeros((4, nx, ny), _F32)
    else:
        if out.shape != (4, nx, ny) or out.dtype != _F32:
            raise ValueError(f"out: expected float32 (4, {nx}, {ny}), got {out.dtype} {out.shape}")
        result = out
        result.fill(0.0)
    flat, height, intensity = _multi_select(pts, grid)
    span = _F32(grid.z_range[1] - grid.z_range[0])
    chan = result.reshape(4, cells)
    np.maximum.at(chan[0], flat, height)
    # min via max of (span - height) > 0, so that the zero-filled buffer is a valid start.
    np.maximum.at(chan[1], flat, span - height)
    if intensity is not None:
        np.add.at(chan[2], flat, intensity)
    if cells <= 4 * flat.size:  # small grid: whole-grid passes are cheaper than gathers
        count = np.bincount(flat, minlength=cells).astype(_F32)
        np.subtract(span, chan[1], out=chan[1], where=count > 0)
        np.divide(chan[2], np.maximum(count, _F32(1.0)), out=chan[2])
        np.log(count + _F32(1.0), out=chan[3])
    else:  # large sparse grid: touch only the occupied cells
        np.add.at(chan[3], flat, _F32(1.0))
        count = chan[3][flat]
        chan[1][flat] = span - chan[1][flat]
        chan[2][flat] = chan[2][flat] / count
        chan[3][flat] = np.log1p(count)
    return result


class BevEncoder:
    """One encoding (mode + grid) as a callable: ``points -> (C, nx, ny)`` float32.

    ``ppn`` gives one channel (occupancy as 0/1) on :data:`PPN_GRID`; ``multi`` gives four on
    ``grid``.
    """

    def __init__(self, mode: BevMode = "multi", grid: BevGrid | None = None) -> None:
        if mode not in ("ppn", "multi"):
            raise ValueError(f"mode: expected 'ppn' or 'multi', got {mode!r}")
        if mode == "ppn" and grid not in (None, PPN_GRID):
            raise ValueError("grid: the ppn mode is fixed to the reference grid (0.2 m, 1000 x 1000)")
        self.mode: BevMode = mode
        self.grid = PPN_GRID if grid is None else grid

    @property
    def channels(self) -> int:
        """Channels per frame."""
        return 1 if self.mode == "ppn" else len(MULTI_CHANNELS)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, nx, ny) of one encoded frame."""
        return (self.channels, *self.grid.shape)

    def __call__(self, points: Any) -> np.ndarray:
        if self.mode == "ppn":
            return ppn_occupancy(points).astype(_F32)[None]
        return multi_channel(points, self.grid)


class BevRingBuffer:
    """The last ``frames`` encoded frames, stacked as channels (oldest first, newest last).

    Before ``frames`` scans have arrived, the missing older frames are zeros.
    """

    def __init__(self, frames: int, frame_shape: tuple[int, ...]) -> None:
        if frames < 1:
            raise ValueError(f"frames: must be >= 1, got {frames}")
        self.frames = frames
        self.frame_shape = tuple(frame_shape)
        self._data = np.zeros((frames, *self.frame_shape), _F32)
        self._next = 0
        self.count = 0

    def push(self, frame: np.ndarray) -> None:
        """Add the newest frame, dropping the oldest once full."""
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame: expected shape {self.frame_shape}, got {frame.shape}")
        self._data[self._next] = frame
        self._next = (self._next + 1) % self.frames
        self.count += 1

    def stacked(self) -> np.ndarray:
        """``(frames * C, nx, ny)``: the frames oldest to newest, channels of each together."""
        order = np.roll(np.arange(self.frames), -self._next)
        stacked = self._data[order]
        return stacked.reshape(self.frames * (self.frame_shape[0] if len(self.frame_shape) == 3 else 1),
                               *self.frame_shape[-2:])  # fmt: skip

    def clear(self) -> None:
        """Forget every frame."""
        self._data.fill(0.0)
        self._next = 0
        self.count = 0


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        from moesaic.runtime.engine import MissingExtraError  # numpy-only import path above

        raise MissingExtraError("torch", "gpu") from None
    return torch


def _torch_index(coord: torch.Tensor, resolution: float, low: float) -> torch.Tensor:
    torch = _torch()
    v = coord / torch.tensor(resolution, dtype=torch.float32, device=coord.device)
    return v + torch.tensor(-low / resolution, dtype=torch.float32, device=coord.device)


def torch_ppn_occupancy(points: torch.Tensor) -> torch.Tensor:
    """:func:`ppn_occupancy` on a torch tensor (any device): ``(1000, 1000)`` bool."""
    torch = _torch()
    pts = points.to(torch.float32)
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ix = torch.floor(_torch_index(x, 0.2, -100.0))
    iy = torch.floor(_torch_index(y, 0.2, -100.0))
    zi = z / torch.tensor(0.2, dtype=torch.float32, device=z.device) + 25.0
    keep = (z > 0) & (zi < 50) & (ix >= 0) & (ix < 1000) & (iy >= 0) & (iy < 1000)
    flat = ix.to(torch.int64) * 1000 + iy.to(torch.int64)
    flat = torch.where(keep, flat, torch.full_like(flat, 1000 * 1000))
    grid = torch.zeros(1000 * 1000 + 1, dtype=torch.bool, device=pts.device)
    grid[flat] = True
    return grid[:-1].view(1000, 1000)


def torch_multi_channel(points: torch.Tensor, grid: BevGrid = PPN_GRID) -> torch.Tensor:
    """:func:`multi_channel` on a torch tensor (any device): ``(4, nx, ny)`` float32."""
    torch = _torch()
    pts = points.to(torch.float32)
    nx, ny = grid.shape
    cells = nx * ny
    vx = _torch_index(pts[:, 0], grid.resolution, grid.x_range[0])
    vy = _torch_index(pts[:, 1], grid.resolution, grid.y_range[0])
    z = pts[:, 2]
    height = z - torch.tensor(grid.z_range[0], dtype=torch.float32, device=z.device)
    span = grid.z_range[1] - grid.z_range[0]
    keep = (vx >= 0) & (vx < nx) & (vy >= 0) & (vy < ny) & (height >= 0) & (height < span)
    flat = vx.to(torch.int64) * ny + vy.to(torch.int64)
    flat = torch.where(keep, flat, torch.full_like(flat, cells))  # a spill cell, dropped below
    intensity = pts[:, 3] if pts.shape[1] > 3 else torch.zeros_like(z)
    out = torch.zeros(4, cells + 1, dtype=torch.float32, device=pts.device)
    count = torch.zeros(cells + 1, dtype=torch.float32, device=pts.device)
    count.index_add_(0, flat, torch.ones_like(z))
    out[0].scatter_reduce_(0, flat, height, reduce="amax", include_self=True)
    out[1].fill_(float("inf")).scatter_reduce_(0, flat, height, reduce="amin", include_self=True)
    out[2].index_add_(0, flat, intensity)
    out[1][count == 0] = 0.0
    out[2] = out[2] / count.clamp(min=1.0)
    out[3] = torch.log1p(count)
    return out[:, :cells].reshape(4, nx, ny)
