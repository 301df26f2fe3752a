"""Sliced inference for small objects: tile, detect per tile, merge across tile borders.

A pedestrian 6 pixels tall in a 1920-pixel frame shrinks to 2 pixels when the whole frame
is letterboxed to 640; cut into 640-pixel tiles it keeps its 6 pixels. Tiles overlap so an
object cut by one border appears whole in the neighbour; :func:`merge_tiles` shifts every
tile's boxes back to frame pixels and merges duplicates by class-aware NMS or weighted
boxes fusion (``ensemble-boxes``).

The coordinator fans the tiles of one frame out to several detector experts on different
nodes and merges their answers with the same :func:`merge_tiles`::

    tiles = tile_image(frame, 640, overlap=0.2)
    results = [(t, detector.detect(t.image)) for t in tiles]      # or in parallel, remotely
    merged = merge_tiles(results, iou=0.5, method="nms")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesaic.models.detector.yolo_ops import batched_nms
from moesaic.runtime.detections import Detections
from moesaic.runtime.engine import MissingExtraError

__all__ = ["Tile", "merge_tiles", "sliced_detect", "tile_image", "tile_origins"]


@dataclass(frozen=True)
class Tile:
    """One crop of a frame: its top-left corner (frame pixels) and its pixels (a view)."""

    x0: int
    y0: int
    image: np.ndarray

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends flush with the border
    return sorted(set(starts))


def tile_origins(width: int, height: int, tile: int, overlap: float = 0.2) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering a ``width`` x ``height`` frame."""
    if tile < 1:
        raise ValueError(f"tile: expected a positive size in pixels, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap: expected a fraction in [0, 1), got {overlap}")
    stride = max(1, round(tile * (1.0 - overlap)))
    return [(x, y) for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def tile_image(image: np.ndarray, tile: int, overlap: float = 0.2) -> list[Tile]:
    """Cut ``image`` (``[H, W, C]``) into ``tile`` x ``tile`` crops overlapping by ``overlap``.

    Tiles are row-major; the last row/column is shifted inwards to stay inside the frame,
    and a frame smaller than ``tile`` gives one tile of the whole frame.

    >>> [(t.x0, t.y0) for t in tile_image(np.zeros((100, 180, 3), np.uint8), 100, 0.2)]
    [(0, 0), (80, 0)]
    """
    if image.ndim != 3:
        raise ValueError(f"image: expected [H, W, C], got shape {list(image.shape)}")
    h, w = image.shape[:2]
    return [Tile(x, y, image[y : y + tile, x : x + tile]) for x, y in tile_origins(w, h, tile, overlap)]


def _shifted(tile: Tile, dets: Detections) -> Detections:
    offset = np.array([tile.x0, tile.y0, tile.x0, tile.y0], np.float32)
    return Detections(dets.boxes + offset, dets.scores, dets.class_ids, dets.class_names, dets.labels)


def _concat(parts: Sequence[Detections], class_names: tuple[str, ...]) -> Detections:
    if not parts:
        return Detections.empty(class_names)
    return Detections(
        np.concatenate([p.boxes for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.class_ids for p in parts]),
        class_names,
    )


def _wbf(dets: Detections, width: float, height: float, iou: float, skip: float) -> Detections:
    try:
        from ensemble_boxes import weighted_boxes_fusion
    except ImportError:
        raise MissingExtraError("ensemble-boxes", "coordinator") from None

    scale = np.array([width, height, width, height], np.float32)
    boxes = (dets.boxes / scale).clip(0.0, 1.0)
    fused, scores, labels = weighted_boxes_fusion(
        [boxes.tolist()],
        [dets.scores.tolist()],
        [dets.class_ids.tolist()],
        iou_thr=iou,
        skip_box_thr=skip,
        conf_type="max",
    )
    out = np.asarray(fused, np.float32).reshape(-1, 4) * scale
    return Detections(
        out, np.asarray(scores, np.float32), np.asarray(labels).astype(np.int64), dets.class_names
    )


def merge_tiles(
    results: list[tuple[Tile, Detections]],
    *,
    iou: float = 0.5,
    method: Literal["nms", "wbf"] = "nms",
    skip_score: float = 0.0,
) -> Detections:
    """Merge per-tile detections (tile pixels) into one set in frame pixels.

    ``nms`` keeps the highest-scoring box of each overlapping same-class group; ``wbf``
    averages each group's coordinates weighted by score (a box cut by a tile border and seen
    whole in the neighbour tile then lands between the two). Boxes under ``skip_score`` are
    dropped first. Class names come from the first result that has them.
    """
    if method not in ("nms", "wbf"):
        raise ValueError(f"method: expected 'nms' or 'wbf', got {method!r}")
    class_names: tuple[str, ...] = next((d.class_names for _, d in results if d.class_names), ())
    parts = [_shifted(t, d) for t, d in results if len(d)]
    merged = _concat(parts, class_names)
    if skip_score > 0.0:
        merged = merged.select(merged.scores >= skip_score)
    if not len(merged):
        return Detections.empty(class_names)
    if method == "wbf":
        width = max(float(t.x0 + t.width) for t, _ in results)
        height = max(float(t.y0 + t.height) for t, _ in results)
        return _wbf(merged, width, height, iou, skip_score)
    keep = batched_nms(merged.boxes, merged.scores, merged.class_ids, iou)
    return merged.select(keep)


def sliced_detect(
    detect_fn: Callable[[np.ndarray], Detections],
    image: np.ndarray,
    tile: int,
    *,
    overlap: float = 0.2,
    iou: float = 0.5,
    method: Literal["nms", "wbf"] = "nms",
    full_frame: bool = False,
) -> Detections:
    """Run ``detect_fn`` on every tile of ``image`` (and on the whole frame when
    ``full_frame``, which catches objects larger than a tile) and merge the results."""
    results = [(t, detect_fn(t.image)) for t in tile_image(image, tile, overlap)]
    if full_frame and len(results) > 1:
        results.append((Tile(0, 0, image), detect_fn(image)))
    return merge_tiles(results, iou=iou, method=method)
