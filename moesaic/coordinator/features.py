"""Cheap request features the gate looks at, one extractor per input kind.

Each extractor runs in well under a millisecond on a typical frame (it subsamples large
inputs) and returns a fixed-length float64 vector whose names are in ``FEATURE_NAMES``:

>>> features_of("tensor", {"x": np.ones((1, 4), np.float32)}).shape
(12,)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from moesaic.errors import InvalidInput

__all__ = ["FEATURE_NAMES", "INPUT_KINDS", "features_of", "input_kind_of"]

_MAX_POINTS = 20000
_MAX_PIXELS = 256

FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    "points": (
        "log_count",
        "range_mean",
        "range_std",
        "range_p90",
        "z_mean",
        "z_std",
        "z_p95",
        "intensity_mean",
        "far_fraction",
    ),
    "image": (
        "log_pixels",
        "aspect",
        "brightness",
        "contrast",
        "edge_density",
        "saturation",
        "dark_fraction",
        "bright_fraction",
    ),
    "tensor": ("log_size", "mean", "std", "min", "max", "abs_mean", *(f"v{i}" for i in range(6))),
}
INPUT_KINDS = tuple(FEATURE_NAMES)


def input_kind_of(inputs: Mapping[str, np.ndarray]) -> str:
    """``points`` when a ``points`` tensor is present, ``image`` for ``image``, else ``tensor``."""
    if "points" in inputs:
        return "points"
    if "image" in inputs:
        return "image"
    return "tensor"


def _points(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float32).reshape(-1, points.shape[-1] if points.ndim > 1 else 4)
    count = len(p)
    if count == 0:
        return np.array([0.0, 0, 0, 0, 0, 0, 0, 0, 0])
    if count > _MAX_POINTS:
        p = p[:: count // _MAX_POINTS + 1]
    rng = np.hypot(p[:, 0], p[:, 1])
    z = p[:, 2]
    intensity = p[:, 3] if p.shape[1] > 3 else np.zeros(len(p), np.float32)
    return np.array(
        [
            np.log1p(count),
            rng.mean(),
            rng.std(),
            np.percentile(rng, 90),
            z.mean(),
            z.std(),
            np.percentile(z, 95),
            intensity.mean(),
            (rng > 30.0).mean(),
        ],
        dtype=np.float64,
    )


def _image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    h, w = img.shape[:2]
    step = max(1, max(h, w) // _MAX_PIXELS)
    small = img[::step, ::step, :3].astype(np.float32) / 255.0
    gray = small.mean(axis=2)
    gx = np.abs(np.diff(gray, axis=1)).mean() if gray.shape[1] > 1 else 0.0
    gy = np.abs(np.diff(gray, axis=0)).mean() if gray.shape[0] > 1 else 0.0
    saturation = (small.max(axis=2) - small.min(axis=2)).mean() if small.shape[2] > 1 else 0.0
    return np.array(
        [
            np.log1p(h * w),
            w / max(h, 1),
            gray.mean(),
            gray.std(),
            gx + gy,
            saturation,
            (gray < 0.15).mean(),
            (gray > 0.85).mean(),
        ],
        dtype=np.float64,
    )


def _tensor(x: np.ndarray) -> np.ndarray:
    v = np.asarray(x).astype(np.float64, copy=False).reshape(-1)
    if v.size == 0:
        return np.zeros(12)
    head = np.zeros(6)
    head[: min(6, v.size)] = v[:6]
    return np.array(
        [np.log1p(v.size), v.mean(), v.std(), v.min(), v.max(), np.abs(v).mean(), *head], dtype=np.float64
    )


def features_of(kind: str, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Feature vector of one request for input ``kind`` (``points``, ``image`` or ``tensor``)."""
    if kind == "points":
        if "points" not in inputs:
            raise InvalidInput("input: the gate of this task expects a point cloud")
        out = _points(inputs["points"])
    elif kind == "image":
        if "image" not in inputs:
            raise InvalidInput("input: the gate of this task expects an image")
        out = _image(inputs["image"])
    elif kind == "tensor":
        if not inputs:
            raise InvalidInput("input: no tensor given")
        out = _tensor(next(iter(inputs.values())))
    else:
        raise InvalidInput(f"input kind {kind!r} is not one of {list(INPUT_KINDS)}")
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
