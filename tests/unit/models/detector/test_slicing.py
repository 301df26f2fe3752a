"""Tiling covers the frame; merging undoes tile offsets and removes border duplicates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesaic.models.detector.slicing import Tile, merge_tiles, sliced_detect, tile_image, tile_origins
from moesaic.runtime.detections import Detections

NAMES = ("vehicle", "pedestrian")


@pytest.mark.parametrize(
    ("w", "h", "tile", "overlap"), [(1000, 600, 256, 0.2), (256, 256, 256, 0.2), (100, 50, 256, 0.0)]
)
def test_tiles_cover_frame_with_overlap(w: int, h: int, tile: int, overlap: float) -> None:
    img = np.zeros((h, w, 3), np.uint8)
    tiles = tile_image(img, tile, overlap)
    covered = np.zeros((h, w), bool)
    for t in tiles:
        assert t.image.shape[:2] == (min(tile, h), min(tile, w))
        covered[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] = True
    assert covered.all()
    xs = sorted({t.x0 for t in tiles})
    if len(xs) > 1:
        assert all(b - a <= tile * (1 - overlap) + 1 for a, b in itertools.pairwise(xs))


def test_tile_arguments_validated() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_origins(100, 100, 32, 1.0)
    with pytest.raises(ValueError, match="tile"):
        tile_origins(100, 100, 0)


def _oracle(frame_boxes: np.ndarray, classes: np.ndarray):  # type: ignore[no-untyped-def]
    """A detector that sees the ground-truth boxes wholly inside the crop it is given."""

    def detect_at(tile: Tile) -> Detections:
        x0, y0 = tile.x0, tile.y0
        inside = (
            (frame_boxes[:, 0] >= x0) & (frame_boxes[:, 1] >= y0)
            & (frame_boxes[:, 2] <= x0 + tile.width) & (frame_boxes[:, 3] <= y0 + tile.height)
        )  # fmt: skip
        shift = np.array([x0, y0, x0, y0], np.float32)
        return Detections(frame_boxes[inside] - shift, np.full(inside.sum(), 0.9), classes[inside], NAMES)

    return detect_at


@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_merge_restores_frame_coordinates_without_duplicates(method: str) -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 580, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 18, (40, 2))], 1).astype(np.float32)
    classes = rng.integers(0, 2, 40)
    img = np.zeros((600, 600, 3), np.uint8)
    detect_at = _oracle(boxes, classes)
    tiles = tile_image(img, 200, 0.25)
    merged = merge_tiles([(t, detect_at(t)) for t in tiles], iou=0.5, method=method)  # type: ignore[arg-type]
    assert merged.class_names == NAMES
    # Each ground-truth box comes back exactly once (overlapping tiles saw many twice).
    assert len(merged) == len(boxes)
    order = np.lexsort((merged.boxes[:, 1], merged.boxes[:, 0]))
    ref = np.lexsort((boxes[:, 1], boxes[:, 0]))
    np.testing.assert_allclose(merged.boxes[order], boxes[ref], atol=0.05)
    assert merged.class_ids[order].tolist() == classes[ref].tolist()


def test_sliced_detect_and_empty_results() -> None:
    img = np.zeros((300, 500, 3), np.uint8)
    calls: list[tuple[int, ...]] = []

    def detect(crop: np.ndarray) -> Detections:
        calls.append(crop.shape)
        return Detections.empty(NAMES)

    out = sliced_detect(detect, img, 256, overlap=0.2, full_frame=True)
    assert len(out) == 0 and out.class_names == NAMES
    assert calls[-1] == (300, 500, 3) and len(calls) == len(tile_image(img, 256, 0.2)) + 1
    with pytest.raises(ValueError, match="method"):
        merge_tiles([], method="mean")  # type: ignore[arg-type]
