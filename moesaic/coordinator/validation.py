"""The validation table: what each expert gets right on labelled data, per task.

One ``.npz`` file per task holds

- ``task`` (str), ``input_kind`` (``points``/``image``/``tensor``), ``experts`` [N] ids;
- ``feature_names`` [F] and ``features`` [Fr, F]: the gate's request features, one row per frame;
- ``frame`` [R] int: the frame each scored row belongs to;
- ``q`` [R, N]: the probability expert n gives row r's label.

A row is one labelled unit: a frame (classification, reconstruction), a subsampled pixel
(segmentation: per-pixel label probability), or a ground-truth object (detection: the best
score of a same-class detection with IoU >= 0.5, :data:`MISS_PROBABILITY` when missed). The
gate of a frame weights all of that frame's rows. :func:`ValidationTable.problem` turns a table,
a gate and live profiles into the :class:`SelectionProblem` the MoE² solver minimises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.coordinator.selection import ExpertCost, SelectionProblem

__all__ = ["MISS_PROBABILITY", "ValidationTable", "score_rows"]

MISS_PROBABILITY = 0.01
"""Label probability of a ground-truth object that an expert did not detect."""
_SEG_PIXELS = 256


@dataclass(frozen=True)
class ValidationTable:
    task: str
    input_kind: str
    experts: tuple[str, ...]
    feature_names: tuple[str, ...]
    features: np.ndarray
    frame: np.ndarray
    q: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.experts)
        features = np.asarray(self.features, np.float64).reshape(len(self.features), -1)
        frame = np.asarray(self.frame, np.int64).reshape(-1)
        q = np.asarray(self.q, np.float64)
        if n == 0:
            raise ValueError("validation table: experts: at least one expert is needed")
        if features.shape[1] != len(self.feature_names):
            raise ValueError(
                f"validation table: features: {features.shape[1]} columns but {len(self.feature_names)} names"
            )
        if q.ndim != 2 or q.shape != (len(frame), n):
            raise ValueError(f"validation table: q: expected shape [{len(frame)}, {n}], got {list(q.shape)}")
        if len(frame) == 0:
            raise ValueError("validation table: no scored rows")
        if frame.min() < 0 or frame.max() >= len(features):
            raise ValueError(f"validation table: frame: indices must lie in [0, {len(features)})")
        if not (np.all(np.isfinite(q)) and q.min() >= 0 and q.max() <= 1):
            raise ValueError("validation table: q: label probabilities must lie in [0, 1]")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "frame", frame)
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "experts", tuple(self.experts))
        object.__setattr__(self, "feature_names", tuple(self.feature_names))

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            task=np.array(self.task),
            input_kind=np.array(self.input_kind),
            experts=np.array(self.experts),
            feature_names=np.array(self.feature_names),
            features=self.features,
            frame=self.frame,
            q=self.q,
        )

    @classmethod
    def load(cls, path: Path) -> ValidationTable:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    task=str(z["task"]),
                    input_kind=str(z["input_kind"]),
                    experts=tuple(str(e) for e in z["experts"]),
                    feature_names=tuple(str(f) for f in z["feature_names"]),
                    features=z["features"],
                    frame=z["frame"],
                    q=z["q"],
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a validation table: {exc}") from None

    def columns(self, experts: Sequence[str]) -> list[int]:
        """Column of each expert id; ``LookupError`` naming the first one not in the table."""
        index = {e: i for i, e in enumerate(self.experts)}
        missing = [e for e in experts if e not in index]
        if missing:
            raise LookupError(f"validation table of {self.task!r} has no expert {missing[0]!r}")
        return [index[e] for e in experts]

    def problem(
        self, gate_weights: np.ndarray, costs: Sequence[ExpertCost], *, overhead_ms: float = 0.0
    ) -> SelectionProblem:
        """The selection problem over ``costs`` (a subset of the table's experts, any order).

        ``gate_weights`` [Fr, N] are the gate's weights per frame over all N table experts; the
        chosen columns are used as they are (renormalisation over S happens in the loss).
        """
        cols = self.columns([c.id for c in costs])
        g = np.asarray(gate_weights, np.float64)[self.frame][:, cols]
        return SelectionProblem(tuple(costs), self.q[:, cols], g, overhead_ms)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.asarray(inter / np.maximum(area - inter, 1e-9))


def score_rows(
    task: str, outputs: Mapping[str, np.ndarray], label: Mapping[str, Any], *, seed: int = 0
) -> np.ndarray:
    """Label probabilities (one per row) of one expert's outputs for one labelled frame.

    ``label`` holds ``label`` (classification: class id; segmentation: [H, W] class grid),
    ``bev`` (reconstruction target [1, H, W] or [H, W]) or ``boxes`` + ``class_ids`` (detection).
    ``seed`` fixes the pixel subsample so every expert is scored on the same pixels.
    """
    if task == "classification":
        probs = np.asarray(outputs["probs"], np.float64).reshape(-1)
        return np.array([probs[int(np.asarray(label["label"]).reshape(-1)[0])]])
    if task == "bev_segmentation":
        probs = np.asarray(outputs["probs"], np.float64)
        grid = np.asarray(label["label"], np.int64)
        if probs.ndim != 3 or probs.shape[1:] != grid.shape:
            raise ValueError(
                f"probs: expected [C, {grid.shape[0]}, {grid.shape[1]}], got {list(probs.shape)}"
            )
        rng = np.random.default_rng(seed)
        flat = rng.choice(grid.size, size=min(_SEG_PIXELS, grid.size), replace=False)
        ys, xs = np.unravel_index(flat, grid.shape)
        return np.asarray(probs[grid[ys, xs], ys, xs])
    if task == "bev_reconstruction":
        pred = np.asarray(outputs["bev"], np.float64).reshape(-1)
        target = np.asarray(label["bev"], np.float64).reshape(-1)
        if pred.shape != target.shape:
            raise ValueError(f"bev: expected {target.size} values, got {pred.size}")
        return np.array([float(np.exp(-np.abs(pred - target).mean()))])
    if task == "detection":
        gt_boxes = np.asarray(label["boxes"], np.float64).reshape(-1, 4)
        gt_cls = np.asarray(label["class_ids"], np.int64).reshape(-1)
        boxes = np.asarray(outputs["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(outputs["scores"], np.float64).reshape(-1)
        cls = np.asarray(outputs["class_ids"], np.int64).reshape(-1)
        rows = np.full(len(gt_boxes), MISS_PROBABILITY)
        for i, (box, c) in enumerate(zip(gt_boxes, gt_cls, strict=True)):
            same = cls == c
            if same.any():
                hit = _iou(box, boxes[same]) >= 0.5
                if hit.any():
                    rows[i] = max(MISS_PROBABILITY, float(scores[same][hit].max()))
        return rows
    raise ValueError(
        f"task {task!r}: no validation scoring (classification, bev_segmentation, "
        "bev_reconstruction, detection)"
    )
