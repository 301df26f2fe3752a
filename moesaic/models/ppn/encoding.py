"""How a PPN expert turns points into its network input: BEV mode, grid and frame count.

The same options live in a model folder's ``model.yaml`` under ``processor:`` and drive
training, export and serving, so all three encode alike::

    processor: {type: ppn_bev, task: seg, mode: multi, frames: 4, resolution: 0.4,
                x_range: [-51.2, 51.2], y_range: [-51.2, 51.2], z_range: [-5.0, 5.0]}

``mode: ppn`` is the reference encoding (0.2 m, 1000 x 1000 occupancy, 16 frames): a GPU
configuration. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moesaic.datasets.bev import PPN_GRID, BevEncoder, BevGrid, BevMode

__all__ = ["CPU_ENCODING", "PPN_ENCODING", "PpnEncoding"]

_KEYS = {"mode", "frames", "resolution", "x_range", "y_range", "z_range"}


@dataclass(frozen=True)
class PpnEncoding:
    """BEV mode, grid and the number of stacked frames T."""

    mode: BevMode = "multi"
    frames: int = 4
    grid: BevGrid = field(default_factory=lambda: BevGrid(0.4, (-51.2, 51.2), (-51.2, 51.2), (-5.0, 5.0)))

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames: must be >= 1, got {self.frames}")
        BevEncoder(self.mode, self.grid)  # validates mode and grid together

    @property
    def channels_per_frame(self) -> int:
        return 1 if self.mode == "ppn" else 4

    @property
    def in_channels(self) -> int:
        """Network input channels: frames x channels per frame."""
        return self.frames * self.channels_per_frame

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) = (cells along x, cells along y)."""
        return self.grid.shape

    def encoder(self) -> BevEncoder:
        return BevEncoder(self.mode, self.grid)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PpnEncoding:
        """From ``processor:`` options (other keys are ignored); ``ValueError`` names the field."""
        mode = options.get("mode", "multi")
        frames = int(options.get("frames", 16 if mode == "ppn" else 4))
        if mode == "ppn":
            for key in ("resolution", "x_range", "y_range", "z_range"):
                if key in options:
                    raise ValueError(f"processor.{key}: the ppn mode has a fixed grid; drop {key}")
            return cls("ppn", frames, PPN_GRID)
        try:
            grid = BevGrid(
                float(options.get("resolution", 0.4)),
                tuple(options.get("x_range", (-51.2, 51.2))),
                tuple(options.get("y_range", (-51.2, 51.2))),
                tuple(options.get("z_range", (-5.0, 5.0))),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"processor: bad grid: {exc}") from None
        return cls(mode, frames, grid)

    def to_options(self) -> dict[str, Any]:
        """The ``processor:`` options that rebuild this encoding."""
        if self.mode == "ppn":
            return {"mode": "ppn", "frames": self.frames}
        g = self.grid
        return {
            "mode": self.mode,
            "frames": self.frames,
            "resolution": g.resolution,
            "x_range": list(g.x_range),
            "y_range": list(g.y_range),
            "z_range": list(g.z_range),
        }


#: The shipped CPU experts: 0.4 m cells, 256 x 256 (±51.2 m), four channels, T = 4.
CPU_ENCODING = PpnEncoding()
#: The reference PPN input: occupancy, 0.2 m, 1000 x 1000, T = 16.
PPN_ENCODING = PpnEncoding("ppn", 16, PPN_GRID)
