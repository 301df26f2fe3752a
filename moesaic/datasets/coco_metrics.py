"""mAP50 and mAP50-95 of detections against ground truth, computed by pycocotools.

No hand-written matching: ground truth and predictions are converted to COCO dicts in
memory and scored by ``pycocotools.cocoeval.COCOeval`` (bbox), the reference
implementation behind the COCO leaderboard and ultralytics' own ``save_json`` validation.

>>> import numpy as np
>>> gt = Detections(np.array([[10, 10, 20, 30]]), np.ones(1), np.array([0]), ("vehicle",))
>>> evaluate([gt], [gt], ("vehicle",)).map50
1.0
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesaic.runtime.detections import Detections

__all__ = ["CocoMetrics", "evaluate"]


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box metrics (fractions in [0, 1]; -1 where a value is undefined, e.g. no ground truth)."""

    map50_95: float
    map50: float
    map75: float
    map_small: float
    recall50_95: float
    """Average recall at up to ``max_dets`` detections per image (COCO AR)."""
    recall50: float = -1.0
    """Recall at IoU 0.5 (COCOeval's matching), averaged over classes."""
    per_class_map50: dict[str, float] = field(default_factory=dict)
    per_class_recall50: dict[str, float] = field(default_factory=dict)
    images: int = 0
    ground_truth_boxes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mAP50-95": self.map50_95,
            "mAP50": self.map50,
            "mAP75": self.map75,
            "mAP_small": self.map_small,
            "AR": self.recall50_95,
            "recall50": self.recall50,
            "per_class_mAP50": self.per_class_map50,
            "per_class_recall50": self.per_class_recall50,
            "images": self.images,
            "gt_boxes": self.ground_truth_boxes,
        }


def _xywh(boxes: np.ndarray) -> list[list[float]]:
    b = boxes.astype(np.float64)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1).tolist()


def evaluate(
    ground_truth: Sequence[Detections],
    predictions: Sequence[Detections],
    class_names: Sequence[str],
    *,
    max_dets: int = 300,
) -> CocoMetrics:
    """Score ``predictions[i]`` against ``ground_truth[i]`` for every image ``i``."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        from moesaic.runtime.engine import MissingExtraError

        raise MissingExtraError("pycocotools", "vision") from None
    if len(ground_truth) != len(predictions):
        raise ValueError(
            f"predictions: expected {len(ground_truth)} images (one per ground truth), got {len(predictions)}"
        )
    n_classes = len(class_names)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for image_id, (gt, pred) in enumerate(zip(ground_truth, predictions, strict=True), start=1):
        for name, dets in (("ground_truth", gt), ("predictions", pred)):
            if len(dets) and (dets.class_ids.min() < 0 or dets.class_ids.max() >= n_classes):
                raise ValueError(
                    f"{name}[{image_id - 1}]: class ids must be in [0, {n_classes}), got {dets.class_ids}"
                )
        extent = np.concatenate([gt.boxes, pred.boxes]) if len(gt) or len(pred) else np.ones((1, 4))
        images.append(
            {"id": image_id, "width": float(extent[:, 2].max()) + 1, "height": float(extent[:, 3].max()) + 1}
        )
        for box, cid in zip(_xywh(gt.boxes), gt.class_ids.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cid + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        for box, cid, score in zip(
            _xywh(pred.boxes), pred.class_ids.tolist(), pred.scores.tolist(), strict=True
        ):
            results.append({"image_id": image_id, "category_id": cid + 1, "bbox": box, "score": score})
    gt_dict = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
    }
    if not annotations:
        return CocoMetrics(-1.0, -1.0, -1.0, -1.0, -1.0, images=len(images))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        if not results:
            zeros = dict.fromkeys(class_names, 0.0)
            return CocoMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, zeros, zeros, len(images), len(annotations))
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision[T, R, K, A, M]: IoU thresholds (0.5:0.95) x recall points x classes x areas
    # (all, small, medium, large) x maxDets; -1 marks undefined entries. Averaged the way
    # COCOeval.summarize does, at our max_dets (summarize hard-codes 100 for mAP50-95).
    precision = ev.eval["precision"]
    recall = ev.eval["recall"]

    def mean(a: np.ndarray) -> float:
        valid = a[a > -1]
        return float(valid.mean()) if valid.size else -1.0

    per_class = {name: mean(precision[0, :, k, 0, -1]) for k, name in enumerate(class_names)}
    return CocoMetrics(
        map50_95=mean(precision[:, :, :, 0, -1]),
        map50=mean(precision[0, :, :, 0, -1]),
        map75=mean(precision[5, :, :, 0, -1]),
        map_small=mean(precision[:, :, :, 1, -1]),
        recall50_95=mean(recall[:, :, 0, -1]),
        recall50=mean(recall[0, :, 0, -1]),
        per_class_map50=per_class,
        per_class_recall50={name: mean(recall[0, k, 0, -1]) for k, name in enumerate(class_names)},
        images=len(images),
        ground_truth_boxes=len(annotations),
    )
