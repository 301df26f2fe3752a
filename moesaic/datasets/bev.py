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

import threading
from collections.abc import Callable
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
    "TorchBevRingBuffer",
    "bev_image",
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


#: The reference PPN grid: 0.2 m, 1000 x 1000, z in [-5, 5) m with 50 layers.
PPN_GRID = BevGrid()

_BLOCK = 1 << 17
"""Most points handled in one pass; bigger scans go in blocks of this many points."""


class _Scratch(threading.local):
    """Per-thread scratch buffers for one block of points, grown on demand and reused.

    Fresh ~0.5 MB temporaries per call can cost more in page faults than the arithmetic
    itself (hundreds of faults per 120k-point scan on a VM); these buffers cost none after
    the first call. At most 3.8 MB per thread (a block of :data:`_BLOCK` points).
    """

    def __init__(self) -> None:
        self.size = 0
        self.f32 = np.empty((3, 0), _F32)
        self.i32 = np.empty((2, 0), np.int32)
        self.idx = np.empty((1, 0), np.intp)
        self.mask = np.empty((2, 0), np.bool_)

    def reserve(self, n: int) -> _Scratch:
        """Make every buffer hold at least ``n`` (<= :data:`_BLOCK`) points."""
        if n > self.size:
            size = min(_BLOCK, 1 << max(12, (n - 1).bit_length()))
            self.f32 = np.empty((3, size), _F32)
            self.i32 = np.empty((2, size), np.int32)
            self.idx = np.empty((1, size), np.intp)
            self.mask = np.empty((2, size), np.bool_)
            self.size = size
        return self


_SCRATCH = _Scratch()


def _first_at_or_above(fn: Callable[[np.ndarray], np.ndarray], limit: float) -> int:
    """Bit pattern of the smallest positive float32 ``z`` with ``fn(z) >= limit`` (``fn`` monotonic)."""
    lo, hi = 0, int(np.array(np.inf, _F32).view(np.uint32))  # fn(lo) < limit <= fn(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fn(np.array([mid], np.uint32).view(_F32))[0] >= _F32(limit):
            hi = mid
        else:
            lo = mid
    return hi


#: ``0 < z`` and ``floor(z / 0.2 + 25) < 50`` (float32) <=> ``1 <= bits(z) < _PPN_Z_TOP_BITS``:
#: both sides are monotonic in ``z``, and positive float32 bit patterns are ordered like the
#: values (negative ones, -0.0 and NaN fall outside as unsigned integers).
_PPN_Z_TOP_BITS = _first_at_or_above(lambda z: z / _F32(0.2) + _F32(25.0), 50.0)
_BITS_999 = np.array(999.0, _F32).view(np.uint32)[()]


def bev_image(grid: np.ndarray) -> np.ndarray:
    """A BEV grid indexed ``[ix, iy]`` (x forward, y left) as image rows and columns, the one
    orientation every picture of a grid uses (``moesaic bev``, the bridge's ``/png`` topic):
    a map seen from above with the vehicle heading up, its left on the image's left. Rows from
    the top are decreasing x, columns from the left decreasing y; any channels after the first
    two axes are kept.

    >>> g = np.zeros((3, 3), np.uint8); g[2, 2] = 1       # front-left corner cell
    >>> np.argwhere(bev_image(g)).tolist()                 # top-left pixel
    [[0, 0]]
    """
    return np.ascontiguousarray(np.asarray(grid)[::-1, ::-1])


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


def ppn_occupancy(points: Any) -> np.ndarray:
    """The PPN occupancy grid of one scan: ``(1000, 1000)`` bool indexed ``[ix, iy]``.

    Exactly the reference definition (see the module docstring), in the same float32
    arithmetic; no Python loop over points. The scan is processed in blocks of
    :data:`_BLOCK` points (one block for a usual scan) through reused per-thread scratch
    buffers, so no large temporary is allocated per call; in a block where few points have
    ``z > 0`` (a typical scan, sensor above the ground) those are gathered first. The z test
    is one unsigned comparison of the float bits, the x / y test one more, the flat cell index
    ``ix * 1000 + iy`` is exact float32 math, then one fancy assignment per block.
    """
    pts = check_points(points)
    grid = np.zeros(1000 * 1000, np.bool_)
    scratch = _SCRATCH.reserve(len(pts))
    bits = pts.view(np.uint32)
    with np.errstate(invalid="ignore"):  # NaN / inf -> int for cells outside, dropped
        for start in range(0, len(pts), _BLOCK):
            _ppn_block(pts[start : start + _BLOCK], bits[start : start + _BLOCK], grid, scratch)
    occupancy: np.ndarray = grid.reshape(1000, 1000)
    return occupancy


def _ppn_block(block: np.ndarray, bits: np.ndarray, grid: np.ndarray, scratch: _Scratch) -> None:
    """Mark the cells of one block of points in the flat ``grid``."""
    m = len(block)
    keep = scratch.mask[0, :m]
    u = scratch.i32[0, :m].view(np.uint32)
    np.subtract(bits[:, 2], np.uint32(1), out=u)  # 0 < z < top, see _PPN_Z_TOP_BITS
    np.less(u, np.uint32(_PPN_Z_TOP_BITS - 1), out=keep)
    count = int(np.count_nonzero(keep))
    if count == 0:
        return
    gathered = count * 3 < m
    if gathered:  # few points above the ground (a typical scan): gather them, drop the mask
        block = np.compress(keep, block, axis=0)
        m = count
    vx, vy = scratch.f32[0, :m], scratch.f32[1, :m]
    # floor(x / 0.2 + 500) in float32, as the reference; same for y.
    np.divide(block[:, 0], _F32(0.2), out=vx)
    vx += _F32(500.0)
    np.floor(vx, out=vx)
    np.divide(block[:, 1], _F32(0.2), out=vy)
    vy += _F32(500.0)
    np.floor(vy, out=vy)
    # 0 <= ix, iy <= 999: one unsigned comparison of the larger bit pattern (floats >= +0.0 are
    # ordered like their bits; negative values, NaN and inf compare above 999.0; -0.0 cannot
    # occur: a sum that cancels exactly is +0.0).
    big = scratch.i32[0, :m].view(np.uint32)
    inside = scratch.mask[1, :m]
    np.maximum(vx.view(np.uint32), vy.view(np.uint32), out=big)
    np.less_equal(big, _BITS_999, out=inside)
    if not gathered:
        inside &= keep
    # ix * 1000 + iy is exact in float32 for cells inside (< 2**24); the rest is dropped.
    vx *= _F32(1000.0)
    vx += vy
    flat32, flat = scratch.i32[1, :m], scratch.idx[0, :m]
    np.copyto(flat32, vx, casting="unsafe")  # float32 -> int32 -> intp beats float32 -> intp
    np.copyto(flat, flat32)
    if int(np.count_nonzero(inside)) < m:
        flat = flat[inside]  # boolean indexing: faster than np.compress / np.take with out=
    grid[flat] = True


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


def _multi_block(
    block: np.ndarray, grid: BevGrid, scratch: _Scratch
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flat cell index (intp), height above the floor and intensity of the points of ``block``
    inside ``grid``; views of ``scratch``, valid until its next use."""
    nx, ny = grid.shape
    m = len(block)
    res = _F32(grid.resolution)
    vx, vy, height = scratch.f32[0, :m], scratch.f32[1, :m], scratch.f32[2, :m]
    ix, iy = scratch.i32[0, :m], scratch.i32[1, :m]
    np.divide(block[:, 0], res, out=vx)
    vx += _F32(-grid.x_range[0] / grid.resolution)
    np.divide(block[:, 1], res, out=vy)
    vy += _F32(-grid.y_range[0] / grid.resolution)
    np.subtract(block[:, 2], _F32(grid.z_range[0]), out=height)
    # Float comparisons, as NaN-safe on every platform as the definition (float -> int of NaN
    # differs between x86 and ARM); the kept values are >= 0, so truncation is the floor.
    keep, inside = scratch.mask[0, :m], scratch.mask[1, :m]
    np.greater_equal(vx, _F32(0.0), out=keep)
    np.less(vx, _F32(nx), out=inside)
    keep &= inside
    np.greater_equal(vy, _F32(0.0), out=inside)
    keep &= inside
    np.less(vy, _F32(ny), out=inside)
    keep &= inside
    np.greater_equal(height, _F32(0.0), out=inside)
    keep &= inside
    np.less(height, _F32(grid.z_range[1] - grid.z_range[0]), out=inside)
    keep &= inside
    np.copyto(ix, vx, casting="unsafe")
    np.copyto(iy, vy, casting="unsafe")
    ix *= ny
    ix += iy
    index = scratch.idx[0, :m]
    np.copyto(index, ix)
    intensity = block[:, 3] if block.shape[1] > 3 else None
    if int(np.count_nonzero(keep)) == m:  # the whole block is inside: nothing to gather
        return index, height, intensity
    # boolean indexing gathers faster than np.compress / np.take into preallocated outputs
    return index[keep], height[keep], None if intensity is None else intensity[keep]


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
    span = _F32(grid.z_range[1] - grid.z_range[0])
    chan = result.reshape(4, cells)
    scratch = _SCRATCH.reserve(len(pts))
    flats: list[np.ndarray] = []
    with np.errstate(invalid="ignore"):  # NaN / inf -> int: outside the grid anyway
        for start in range(0, max(len(pts), 1), _BLOCK):
            flat, height, intensity = _multi_block(pts[start : start + _BLOCK], grid, scratch)
            np.maximum.at(chan[0], flat, height)
            # min via max of (span - height) > 0, so that the zero-filled buffer is a valid start.
            np.subtract(span, height, out=height)
            np.maximum.at(chan[1], flat, height)
            if intensity is not None:
                np.add.at(chan[2], flat, intensity)
            flats.append(flat if len(pts) <= _BLOCK else flat.copy())
    flat = flats[0] if len(flats) == 1 else np.concatenate(flats)
    if cells <= 4 * flat.size:  # small grid: bincount, then finish the occupied cells only
        # (empty cells stay 0, as 0 / max(count, 1) and log(count + 1) give there)
        counts = np.bincount(flat, minlength=cells)
        occupied = np.flatnonzero(counts)
        count = counts[occupied].astype(_F32)
        chan[1][occupied] = span - chan[1][occupied]
        chan[2][occupied] = chan[2][occupied] / count
        chan[3][occupied] = np.log(count + _F32(1.0))
    else:  # large sparse grid: touch only the occupied cells
        np.add.at(chan[3], flat, _F32(1.0))
        # each occupied cell once (a scan of the counts) unless the points are far fewer
        cell = np.flatnonzero(chan[3] != 0) if cells <= 32 * flat.size else flat
        count = chan[3][cell]
        chan[1][cell] = span - chan[1][cell]
        chan[2][cell] = chan[2][cell] / count
        chan[3][cell] = np.log1p(count)
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


class TorchBevRingBuffer:
    """:class:`BevRingBuffer` of torch tensors on one device (a GPU): frames never leave it.

    ``stacked()`` is one gather on the device: ``(frames * C, nx, ny)``, oldest frame first.
    """

    def __init__(self, frames: int, frame_shape: tuple[int, ...], device: Any) -> None:
        if frames < 1:
            raise ValueError(f"frames: must be >= 1, got {frames}")
        torch = _torch()
        self.frames = frames
        self.frame_shape = tuple(frame_shape)
        self._data = torch.zeros((frames, *self.frame_shape), dtype=torch.float32, device=device)
        self._order = torch.arange(frames, device=device)
        self._next = 0
        self.count = 0

    def push(self, frame: torch.Tensor) -> None:
        """Add the newest frame (a tensor of ``frame_shape``), dropping the oldest once full."""
        if tuple(frame.shape) != self.frame_shape:
            raise ValueError(f"frame: expected shape {self.frame_shape}, got {tuple(frame.shape)}")
        self._data[self._next].copy_(frame)
        self._next = (self._next + 1) % self.frames
        self.count += 1

    def stacked(self) -> torch.Tensor:
        """``(frames * C, nx, ny)`` on the device: the frames oldest to newest."""
        order = self._order.roll(-self._next)
        return self._data.index_select(0, order).reshape(-1, *self.frame_shape[-2:])

    def clear(self) -> None:
        """Forget every frame."""
        self._data.zero_()
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
