"""The one detections type every detector, VLM and fusion step returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Detections"]


@dataclass(frozen=True)
class Detections:
    """Boxes (xyxy, pixels of the image they refer to), scores and class ids, validated.

    >>> d = Detections(np.array([[0, 0, 10, 10]], np.float32), np.array([0.9], np.float32),
    ...                np.array([1]), class_names=("vehicle", "pedestrian"))
    >>> d.to_json()[0]["class_name"]
    'pedestrian'
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: tuple[str, ...] = field(default=())
    labels: tuple[str, ...] = field(default=())
    """Free-text labels per box (open-vocabulary detectors); empty when class ids suffice."""

    def __post_init__(self) -> None:
        boxes = (
            np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
            if np.size(self.boxes)
            else np.zeros((0, 4), np.float32)
        )
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        n = len(boxes)
        if len(scores) != n or len(class_ids) != n:
            raise ValueError(f"detections: {n} boxes but {len(scores)} scores and {len(class_ids)} class ids")
        if self.labels and len(self.labels) != n:
            raise ValueError(f"detections: {n} boxes but {len(self.labels)} labels")
        if n and not np.all(np.isfinite(boxes)):
            raise ValueError("detections: boxes must be finite")
        if n and np.any(boxes[:, 2:] < boxes[:, :2]):
            raise ValueError("detections: boxes must be xyxy with x2 >= x1 and y2 >= y1")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "class_ids", class_ids)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "labels", tuple(self.labels))

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, class_names: Sequence[str] = ()) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), tuple(class_names)
        )

    def name_of(self, i: int) -> str:
        """Label of detection ``i``: its free-text label, else its class name, else its id."""
        if self.labels:
            return self.labels[i]
        cid = int(self.class_ids[i])
        return self.class_names[cid] if 0 <= cid < len(self.class_names) else str(cid)

    def select(self, mask: np.ndarray) -> Detections:
        """The detections where ``mask`` (bool or index array) selects."""
        idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask, dtype=np.int64)
        labels = tuple(self.labels[i] for i in idx) if self.labels else ()
        return Detections(self.boxes[idx], self.scores[idx], self.class_ids[idx], self.class_names, labels)

    def to_json(self) -> list[dict[str, Any]]:
        """``[{"xyxy": [...], "score": s, "class_id": c, "class_name": name}]``."""
        return [
            {
                "xyxy": [round(float(v), 2) for v in self.boxes[i]],
                "score": round(float(self.scores[i]), 4),
                "class_id": int(self.class_ids[i]),
                "class_name": self.name_of(i),
            }
            for i in range(len(self))
        ]
