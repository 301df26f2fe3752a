"""mAP through pycocotools: perfect, shifted, missing and wrong-class predictions."""

from __future__ import annotations

import numpy as np
import pytest

from moesaic.datasets.coco_metrics import evaluate
from moesaic.runtime.detections import Detections

NAMES = ("vehicle", "pedestrian")


def _gt() -> list[Detections]:
    boxes = np.array([[10, 10, 40, 30], [100, 100, 108, 108], [50, 60, 80, 75]], np.float32)
    return [
        Detections(boxes, np.ones(3), np.array([0, 1, 0]), NAMES),
        Detections(boxes[:1] + 5, np.ones(1), [0], NAMES),
    ]


def test_perfect_predictions_score_one() -> None:
    m = evaluate(_gt(), _gt(), NAMES)
    assert m.map50 == pytest.approx(1.0) and m.map50_95 == pytest.approx(1.0)
    assert m.per_class_map50 == {"vehicle": pytest.approx(1.0), "pedestrian": pytest.approx(1.0)}
    assert (m.images, m.ground_truth_boxes) == (2, 4)


def test_shift_lowers_map50_95_before_map50() -> None:
    shifted = [Detections(g.boxes + 2, g.scores, g.class_ids, NAMES) for g in _gt()]
    m = evaluate(_gt(), shifted, NAMES)
    # IoU of the 8-pixel pedestrian shifted by 2: 36/92 < 0.5, so it is missed even at 0.5;
    # the vehicles keep IoU > 0.7 and count at 0.5 but not at the strict thresholds.
    assert m.per_class_map50["pedestrian"] == pytest.approx(0.0)
    assert m.per_class_map50["vehicle"] == pytest.approx(1.0)
    assert 0.0 < m.map50_95 < m.map50 < 1.0


def test_missing_and_wrong_class() -> None:
    gt = _gt()
    none = [Detections.empty(NAMES) for _ in gt]
    assert evaluate(gt, none, NAMES).map50 == 0.0
    wrong = [Detections(g.boxes, g.scores, 1 - g.class_ids, NAMES) for g in gt]
    assert evaluate(gt, wrong, NAMES).map50 == pytest.approx(0.0)


def test_input_checks() -> None:
    with pytest.raises(ValueError, match="expected 2 images"):
        evaluate(_gt(), _gt()[:1], NAMES)
    bad = [Detections(np.array([[0, 0, 1, 1]]), [1.0], [5], NAMES)] * 2
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 2\)"):
        evaluate(_gt(), bad, NAMES)


def test_recall_at_half_iou_per_class() -> None:
    gt = _gt()
    half = [Detections(g.boxes[:1], g.scores[:1], g.class_ids[:1], NAMES) for g in gt]  # first vehicle only
    m = evaluate(gt, half, NAMES)
    assert m.per_class_recall50 == {"vehicle": pytest.approx(2 / 3), "pedestrian": pytest.approx(0.0)}
    assert m.recall50 == pytest.approx(1 / 3)
