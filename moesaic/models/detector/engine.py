"""The ``ultralytics`` engine: serve an ultralytics ``.pt`` checkpoint as a node model.

For hosts with PyTorch and ultralytics but no ONNX export at hand. model.yaml::

    task: detection
    engine: {type: ultralytics, file: best.pt, imgsz: 640, device: cpu}
    class_names: [vehicle, pedestrian]

Tensors are those of the ``yolo`` processor (``image`` UINT8 ``[H, W, 3]`` RGB in;
``boxes``, ``scores``, ``class_ids`` out), produced by ultralytics' own predictor, offline.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from moesaic.errors import InvalidInput
from moesaic.runtime.engine import (
    Engine,
    EngineConfig,
    EngineDescription,
    EngineError,
    TensorSpec,
    register_engine,
)

__all__ = ["UltralyticsEngine", "UltralyticsEngineConfig"]

_INPUTS = (TensorSpec("image", "UINT8", (-1, -1, 3)),)
_OUTPUTS = (
    TensorSpec("boxes", "FP32", (-1, 4)),
    TensorSpec("scores", "FP32", (-1,)),
    TensorSpec("class_ids", "INT64", (-1,)),
)


class UltralyticsEngineConfig(EngineConfig):
    """``engine:`` options for an ultralytics checkpoint."""

    type: Literal["ultralytics"] = "ultralytics"
    file: str = Field("model.pt", description="checkpoint, relative to the model folder")
    imgsz: int = Field(640, ge=32, description="inference size")
    conf: float = Field(0.25, ge=0.0, le=1.0, description="minimum score")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="NMS IoU threshold")
    device: str = Field("cpu", description="cpu, 0, cuda:0 ...")


class UltralyticsEngine(Engine):
    """An ultralytics YOLO checkpoint run by ultralytics' predictor."""

    backend = "ultralytics"

    def __init__(self, config: UltralyticsEngineConfig, model_dir: Path) -> None:
        self.config = config
        self.path = Path(model_dir) / config.file
        self._detector: object | None = None

    def load(self) -> None:
        from moesaic.models.detector.detector import UltralyticsDetector

        try:
            det = UltralyticsDetector(
                self.path,
                imgsz=self.config.imgsz,
                conf=self.config.conf,
                iou=self.config.iou,
                device=self.config.device,
            )
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        det.detect(np.zeros((64, 64, 3), np.uint8))  # warm-up
        self._detector = det

    @property
    def ready(self) -> bool:
        return self._detector is not None

    def describe(self) -> EngineDescription:
        names = ",".join(getattr(self._detector, "class_names", ()))
        return EngineDescription(self.backend, self.config.device, _INPUTS, _OUTPUTS, {"class_names": names})

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from moesaic.models.detector.detector import UltralyticsDetector

        det = self._detector
        if not isinstance(det, UltralyticsDetector):
            raise EngineError("ultralytics engine is not loaded")
        if "image" not in inputs:
            raise InvalidInput(f"missing input 'image'; got {sorted(inputs)}")
        dets = det.detect(inputs["image"])
        return {"boxes": dets.boxes, "scores": dets.scores, "class_ids": dets.class_ids}

    def close(self) -> None:
        self._detector = None


register_engine(UltralyticsEngineConfig, UltralyticsEngine)
