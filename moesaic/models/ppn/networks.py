"""The two PPN networks, each in a small (Jetson-class) and a large (GPU-class) size.

* :class:`SegmentationNet` — a U-Net with skip connections: ``(B, T*C, H, W)`` stacked BEV
  frames -> ``(B, classes, H, W)`` logits.
* :class:`ReconstructionNet` — the same encoder/decoder without skips: -> ``(B, 1, H, W)``
  logits of the dense obstacle map.

``large`` (width 64, depth 4) is the PPN size: ~31 M parameters for segmentation and ~28 M for
reconstruction. Inputs whose sides are not a multiple of ``2**depth`` are padded and the output
cropped back. torch is imported by this module; import it only where torch is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SIZES",
    "NetworkSize",
    "ReconstructionNet",
    "SegmentationNet",
    "Task",
    "build_network",
    "parameter_count",
]

Task = Literal["seg", "rec"]


@dataclass(frozen=True)
class NetworkSize:
    """Channel width of the first level and the number of down-samplings."""

    width: int
    depth: int


#: small: a few hundred thousand parameters (CPU / Jetson); large: the PPN size (GPU).
SIZES: dict[str, NetworkSize] = {
    "small": NetworkSize(width=16, depth=3),
    "large": NetworkSize(width=64, depth=4),
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _EncoderDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, size: NetworkSize, *, skips: bool) -> None:
        super().__init__()
        self.skips = skips
        self.depth = size.depth
        widths = [size.width * 2**i for i in range(size.depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])])
        self.down.extend(_block(widths[i], widths[i + 1]) for i in range(size.depth))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(size.depth)):
            self.up.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            self.dec.append(_block(widths[i] * (2 if skips else 1), widths[i]))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(feats[:-1]), strict=True):
            x = up(x)
            x = dec(torch.cat([x, skip], 1) if self.skips else x)
        out = self.head(x)
        return out[..., :h, :w] if (ph or pw) else out


class SegmentationNet(_EncoderDecoder):
    """U-Net with skips: stacked BEV frames -> per-cell class logits."""

    def __init__(self, in_channels: int, classes: int, size: NetworkSize) -> None:
        super().__init__(in_channels, classes, size, skips=True)


class ReconstructionNet(_EncoderDecoder):
    """Encoder-decoder without skips: stacked BEV frames -> dense obstacle-map logits."""

    def __init__(self, in_channels: int, size: NetworkSize) -> None:
        super().__init__(in_channels, 1, size, skips=False)


def build_network(task: Task, size: str, in_channels: int, classes: int = 5) -> nn.Module:
    """The network for ``task`` (``seg``/``rec``) at ``size`` (``small``/``large``)."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    if task == "seg":
        return SegmentationNet(in_channels, classes, SIZES[size])
    if task == "rec":
        return ReconstructionNet(in_channels, SIZES[size])
    raise ValueError(f"task: expected 'seg' or 'rec', got {task!r}")


def parameter_count(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
