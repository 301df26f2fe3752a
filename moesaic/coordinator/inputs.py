"""Perceive request inputs -> the node-boundary tensors every expert of a task takes.

- ``points`` (PointCloud): float32 ``fields`` per point -> ``points`` FP32 [N, 4] + parameter
  ``sensor_id``;
- ``image`` (JPEG/PNG/rgb8) -> ``image`` UINT8 [H, W, 3];
- ``tensor`` -> that tensor under its name (``x`` when unnamed);
- task ``vlm`` adds ``prompt`` BYTES [1] from option ``prompt`` (default ``<OD>``).

Every error is an :class:`~moesaic.errors.InvalidInput` naming the field.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesaic.errors import InvalidInput, quote
from moesaic.runtime.engine import dtype_of

__all__ = [
    "COMMON_OPTIONS",
    "TASK_OPTIONS",
    "RequestInputs",
    "check_options",
    "decode_image",
    "decode_inputs",
    "tile_options",
]

TASK_OPTIONS: dict[str, frozenset[str]] = {
    "detection": frozenset({"slice", "overlap"}),
    "vlm": frozenset({"prompt"}),
}
"""Perceive ``options`` each task understands; any other key is refused, by name."""

COMMON_OPTIONS = frozenset({"experts"})
"""Options of every task: ``experts=a,b`` restricts the choice to these experts (A/B tests,
baselines); an id that is not an expert of the task is refused when the request is planned."""

_MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class RequestInputs:
    tensors: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of an image input."""
        image = self.tensors.get("image")
        return None if image is None else (int(image.shape[1]), int(image.shape[0]))


def decode_image(data: bytes, encoding: str, width: int = 0, height: int = 0) -> np.ndarray:
    """RGB8 [H, W, 3] of a JPEG/PNG or raw rgb8 image."""
    enc = (encoding or "").lower()
    if enc == "rgb8":
        if width <= 0 or height <= 0:
            raise InvalidInput("image.width/height: required (> 0) for rgb8 images")
        if width * height > _MAX_IMAGE_PIXELS:
            raise InvalidInput(f"image: {width}x{height} exceeds {_MAX_IMAGE_PIXELS} pixels")
        if len(data) != width * height * 3:
            raise InvalidInput(
                f"image.data: expected {width * height * 3} bytes for {width}x{height} rgb8, got {len(data)}"
            )
        return np.frombuffer(data, np.uint8).reshape(height, width, 3)
    if enc in ("jpeg", "jpg", "png", ""):
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
                with Image.open(io.BytesIO(data)) as img:  # the header only: size before pixels
                    if img.width * img.height > _MAX_IMAGE_PIXELS:
                        raise InvalidInput(
                            f"image: {img.width}x{img.height} exceeds {_MAX_IMAGE_PIXELS} pixels",
                            reason="too_many_pixels",
                        )
                    return np.asarray(img.convert("RGB"))
        except Image.DecompressionBombError:
            raise InvalidInput(
                f"image: declares more than {_MAX_IMAGE_PIXELS} pixels (a decompression bomb)",
                reason="too_many_pixels",
            ) from None
        except (UnidentifiedImageError, ImportError):  # ImportError: ultralytics' patched open
            raise InvalidInput(f"image.data: not a readable {enc or 'image'}", reason="bad_image") from None
        except OSError as exc:
            raise InvalidInput(
                f"image.data: cannot decode {enc or 'image'}: {exc}", reason="bad_image"
            ) from None
    raise InvalidInput(f"image.encoding: {encoding!r} is not one of jpeg, png, rgb8")


def check_options(task: str, options: Mapping[str, str]) -> None:
    """:class:`InvalidInput` naming unknown options of ``task`` or a bad value, before any work."""
    known = TASK_OPTIONS.get(task, frozenset()) | COMMON_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(quote(name, 32) for name in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise InvalidInput(
            f"options: {names} not understood by task {task!r} (it takes {sorted(known) or 'none'})",
            reason="unknown_option",
        )
    if "slice" in options or "overlap" in options:
        tile_options(options)


def tile_options(options: Mapping[str, str]) -> tuple[int, float]:
    """(tile size in pixels, overlap fraction) of a sliced detection request."""
    try:
        tile = int(options["slice"])
    except (KeyError, ValueError):
        raise InvalidInput(
            f"options.slice: expected a tile size in pixels, got {quote(options.get('slice', ''))}",
            reason="bad_option",
        ) from None
    if not 32 <= tile <= 8192:
        raise InvalidInput(
            f"options.slice: tile size must lie in [32, 8192], got {tile}", reason="bad_option"
        )
    try:
        overlap = float(options.get("overlap", "0.2"))
    except ValueError:
        raise InvalidInput(
            f"options.overlap: expected a fraction, got {quote(options['overlap'])}", reason="bad_option"
        ) from None
    if not 0 <= overlap < 0.9:
        raise InvalidInput(f"options.overlap: must lie in [0, 0.9), got {overlap}", reason="bad_option")
    return tile, overlap


def decode_inputs(task: str, request: Any, options: Mapping[str, str] | None = None) -> RequestInputs:
    """Tensors and parameters of a ``moesaic.v1.PerceiveRequest`` for ``task``'s experts."""
    options = dict(options or {})
    which = request.WhichOneof("input")
    params: dict[str, Any] = {}
    if which == "points":
        fields = request.points.fields or 4
        if fields < 4:
            raise InvalidInput(f"points.fields: expected >= 4 values per point, got {fields}")
        data = request.points.data
        if len(data) % (4 * fields):
            raise InvalidInput(
                f"points.data: {len(data)} bytes is not a whole number of {fields}-float points"
            )
        pts = np.frombuffer(data, "<f4").reshape(-1, fields)[:, :4]
        if not np.all(np.isfinite(pts)):
            raise InvalidInput("points.data: values must be finite")
        tensors = {"points": np.ascontiguousarray(pts, dtype=np.float32)}
        if request.sensor_id:
            params["sensor_id"] = request.sensor_id
    elif which == "image":
        img = request.image
        tensors = {"image": decode_image(img.data, img.encoding, img.width, img.height)}
    elif which == "tensor":
        t = request.tensor
        dtype = dtype_of(t.datatype)
        if t.datatype == "BYTES":
            raise InvalidInput("tensor.datatype: BYTES tensors are not accepted as Perceive input")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"tensor.shape: dimensions must be >= 0, got {list(shape)}")
        count = int(np.prod(shape)) if shape else 1
        if len(t.data) != count * dtype.itemsize:
            raise InvalidInput(
                f"tensor.data: expected {count * dtype.itemsize} bytes for {t.datatype} {list(shape)}, "
                f"got {len(t.data)}"
            )
        tensors = {t.name or "x": np.frombuffer(t.data, dtype).reshape(shape)}
    else:
        raise InvalidInput("input: one of points, image or tensor is required")
    if task == "vlm":
        tensors["prompt"] = np.array([options.get("prompt", "<OD>").encode()], dtype=object)
    return RequestInputs(tensors, params)
