"""Fusing the outputs of the experts that ran, with their gate weights renormalised over them.

- ``detection``: weighted boxes fusion (the ``ensemble_boxes`` package), gate weights as model
  weights; a box only one expert found keeps its score times that expert's weight.
- ``bev_segmentation``: weighted class probabilities -> class map (UINT8 [H, W]) + ``probs``.
- ``bev_reconstruction``: weighted mean of ``bev``.
- ``classification``: weighted class probabilities.
- ``vlm``: the text of the expert with the highest weight.

>>> fused = fuse("classification", [ExpertOutput("a", 0.75, {"probs": np.array([1.0, 0.0])}),
...                                 ExpertOutput("b", 0.25, {"probs": np.array([0.0, 1.0])})])
>>> fused.grid[1].tolist()
[0.75, 0.25]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesaic.runtime.detections import Detections
from moesaic.runtime.engine import MissingExtraError

__all__ = ["FUSED_TASKS", "ExpertOutput", "Fused", "fuse", "fuse_detections", "warm_up"]

FUSED_TASKS = ("bev_segmentation", "bev_reconstruction", "detection", "vlm", "classification")


@dataclass(frozen=True)
class ExpertOutput:
    expert_id: str
    weight: float
    outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Fused:
    """One fused result: exactly one of detections, grid (name, array) or text."""

    detections: Detections | None = None
    grid: tuple[str, np.ndarray] | None = None
    text: str | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def _normalised(parts: Sequence[ExpertOutput]) -> np.ndarray:
    if not parts:
        raise ValueError("fusion: no expert outputs to fuse")
    w = np.array([max(p.weight, 0.0) for p in parts], np.float64)
    total = w.sum()
    return w / total if total > 0 else np.full(len(parts), 1.0 / len(parts))


def _output(part: ExpertOutput, name: str) -> np.ndarray:
    if name not in part.outputs:
        raise ValueError(f"expert {part.expert_id}: output {name!r} missing (has {sorted(part.outputs)})")
    return np.asarray(part.outputs[name])


def _weighted_mean(parts: Sequence[ExpertOutput], name: str) -> np.ndarray:
    """The weighted mean of one output over the experts, in FP32 (one expert's output as is:
    a 1024x1024 BEV grid's probabilities are 20 MB, and copying them through FP64 cost more
    than the expert's GPU run)."""
    first = np.asarray(_output(parts[0], name), np.float32)
    if len(parts) == 1:
        return first
    w = _normalised(parts)
    total = np.multiply(first, np.float32(w[0]))
    for wi, part in zip(w[1:], parts[1:], strict=True):
        arr = _output(part, name)
        if arr.shape != first.shape:
            raise ValueError(
                f"expert {part.expert_id}: {name} has shape {list(arr.shape)}, "
                f"expected {list(first.shape)} like {parts[0].expert_id}"
            )
        total += np.float32(wi) * np.asarray(arr, np.float32)
    return total


def fuse_detections(
    parts: Sequence[ExpertOutput],
    *,
    image_size: tuple[int, int] | None = None,
    class_names: Sequence[str] = (),
    iou: float = 0.55,
    skip_score: float = 0.0,
) -> Detections:
    """Weighted boxes fusion; ``image_size`` (width, height) normalises the coordinates. One
    expert's detections are its own (nothing to fuse)."""
    dets = [
        Detections(_output(p, "boxes"), _output(p, "scores"), _output(p, "class_ids"), tuple(class_names))
        for p in parts
    ]
    if len(dets) == 1:
        return dets[0]
    weighted_boxes_fusion = _weighted_boxes_fusion()
    w = _normalised(parts)
    if all(len(d) == 0 for d in dets):
        return Detections.empty(class_names)
    if image_size is None:
        extent = max(float(d.boxes.max()) for d in dets if len(d)) or 1.0
        width = height = extent
    else:
        width, height = float(image_size[0]), float(image_size[1])
    scale = np.array([width, height, width, height], np.float32)
    boxes = [np.clip(d.boxes / scale, 0.0, 1.0) for d in dets]
    scores = [np.clip(d.scores, 0.0, 1.0) for d in dets]
    labels = [d.class_ids.astype(np.float64) for d in dets]
    fb, fs, fl = weighted_boxes_fusion(
        boxes, scores, labels, weights=list(w), iou_thr=iou, skip_box_thr=skip_score, conf_type="avg"
    )
    if len(fb) == 0:
        return Detections.empty(class_names)
    return Detections(
        np.asarray(fb) * scale, np.asarray(fs), np.asarray(fl).round().astype(np.int64), tuple(class_names)
    )


def _weighted_boxes_fusion() -> Any:
    """ensemble-boxes' fusion function, imported on first use (it brings pandas and numba)."""
    try:
        from ensemble_boxes import weighted_boxes_fusion
    except ImportError:
        raise MissingExtraError("ensemble-boxes", "coordinator") from None
    return weighted_boxes_fusion


def warm_up() -> None:
    """Import and run the fusion libraries once, so no request pays for it (ensemble-boxes
    imports pandas and compiles with numba: ~0.3 s)."""
    box = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
    part: dict[str, np.ndarray] = {
        "boxes": box,
        "scores": np.ones(1, np.float32),
        "class_ids": np.zeros(1, np.int64),
    }
    fuse_detections([ExpertOutput("a", 0.5, part), ExpertOutput("b", 0.5, part)], image_size=(20, 20))


def fuse(
    task: str,
    parts: Sequence[ExpertOutput],
    *,
    image_size: tuple[int, int] | None = None,
    class_names: Sequence[str] = (),
) -> Fused:
    """Fuse the outputs of the experts that ran (weights are renormalised over ``parts``)."""
    if not parts:
        raise ValueError("fusion: no expert outputs to fuse")
    if task == "detection":
        return Fused(detections=fuse_detections(parts, image_size=image_size, class_names=class_names))
    if task == "bev_segmentation":
        probs = _weighted_mean(parts, "probs")
        if probs.ndim != 3:
            raise ValueError(f"probs: expected [C, H, W], got {list(probs.shape)}")
        classes = probs.argmax(axis=0).astype(np.uint8)
        return Fused(grid=("classes", classes), extras={"probs": probs})
    if task == "bev_reconstruction":
        return Fused(grid=("bev", _weighted_mean(parts, "bev")))
    if task == "classification":
        return Fused(grid=("probs", _weighted_mean(parts, "probs")))
    if task == "vlm":
        w = _normalised(parts)
        best = parts[int(np.argmax(w))]
        text = _output(best, "text").reshape(-1)
        value = text[0] if text.size else b""
        return Fused(text=value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    raise ValueError(f"task {task!r}: the coordinator fuses only {list(FUSED_TASKS)}")
