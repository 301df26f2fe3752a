"""The ``yolo`` processor: RGB image in, detections out, around any YOLO engine.

A model folder such as ``models/yolo-n/model.yaml``::

    task: detection
    engine: {type: onnxruntime}          # or tensorrt
    processor: {type: yolo, imgsz: 416, conf: 0.25, iou: 0.7, class_names: [vehicle, pedestrian]}

The node then advertises ``image`` UINT8 ``[H, W, 3]`` (RGB) and returns ``boxes`` FP32
``[N, 4]`` (xyxy, input pixels), ``scores`` FP32 ``[N]`` and ``class_ids`` INT64 ``[N]``.
Request parameters ``conf`` and ``iou`` override the folder's thresholds per request.
``image`` may also come as ``BYTES [1]``: one JPEG or PNG, decoded on the node (OpenCV), so a
camera frame crosses the wire compressed; its header is read first and images over
``max_pixels`` are refused before decoding.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moesaic.models.detector.yolo_ops import LetterboxInfo, decode, letterbox, scale_boxes, to_tensor
from moesaic.runtime.detections import Detections
from moesaic.runtime.engine import TensorSpec
from moesaic.runtime.processing import Processor, register_processor

__all__ = ["YoloOptions", "YoloProcessor", "check_image", "decode_image"]


class YoloOptions(BaseModel):
    """``processor:`` options of a YOLO model folder."""

    model_config = ConfigDict(extra="forbid")
    imgsz: int = Field(640, ge=32, description="square model input size; taken from the engine when fixed")
    conf: float = Field(0.25, ge=0.0, le=1.0, description="minimum class score")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="NMS IoU threshold")
    max_det: int = Field(300, ge=1, description="most boxes per image")
    agnostic_nms: bool = Field(False, description="suppress across classes")
    class_names: list[str] = Field(default_factory=list, description="class names, index = class id")
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="largest encoded image (width x height) decoded; larger ones are refused",
    )


def check_image(image: np.ndarray) -> np.ndarray:
    """The ``image`` tensor as a contiguous uint8 ``[H, W, 3]`` array, or ``ValueError``."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image: expected UINT8, got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image: expected shape [H, W, 3] (RGB), got {list(arr.shape)}")
    return arr


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """An encoded JPEG or PNG as RGB uint8 ``[H, W, 3]``; ``ValueError`` when it is not one or
    is larger than ``max_pixels`` (checked from its header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, (width, height) = header.format, header.size
    except (UnidentifiedImageError, OSError, ValueError, ImportError):
        # ImportError: once ultralytics is imported, its patched Image.open tries pi_heif on
        # bytes PIL cannot identify.
        raise ValueError(f"image: BYTES input is not a JPEG or PNG ({len(data)} bytes)") from None
    if fmt not in ("JPEG", "PNG"):
        raise ValueError(f"image: BYTES input is {fmt}; expected JPEG or PNG")
    if width * height > max_pixels:
        raise ValueError(f"image: {width} x {height} exceeds max_pixels={max_pixels}")
    from moesaic.models.detector.yolo_ops import _cv2

    cv2 = _cv2()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3:
        raise ValueError(f"image: the {fmt} could not be decoded")
    return np.ascontiguousarray(bgr[..., ::-1])


def _float_param(parameters: Mapping[str, Any], name: str, default: float) -> float:
    if name not in parameters:
        return default
    try:
        value = float(parameters[name])
    except (TypeError, ValueError):
        raise ValueError(
            f"parameter {name!r}: expected a number in [0, 1], got {parameters[name]!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"parameter {name!r}: expected a number in [0, 1], got {value}")
    return value


class YoloProcessor(Processor):
    """Letterbox + normalise before the engine; decode + NMS + rescale after it."""

    def __init__(self, options: Mapping[str, Any], model_dir: Path) -> None:
        super().__init__(options, model_dir)
        try:
            self.config = YoloOptions.model_validate(dict(options))
        except ValidationError as exc:
            raise ValueError(f"processor (yolo) in {model_dir}: {exc}") from None
        self.input_name = "images"
        self.imgsz = self.config.imgsz

    def inputs(self, engine_inputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        if len(engine_inputs) != 1:
            raise ValueError(f"yolo processor: expected an engine with one input, got {len(engine_inputs)}")
        spec = engine_inputs[0]
        self.input_name = spec.name
        if len(spec.shape) == 4 and spec.shape[2] > 0 and spec.shape[2] == spec.shape[3]:
            self.imgsz = spec.shape[2]
        return (TensorSpec("image", "UINT8", (-1, -1, 3), encoded=True),)

    def input_format(self) -> str:
        """What Describe says the model takes."""
        return "image: UINT8 [H, W, 3] RGB, or BYTES [1] holding one JPEG or PNG"

    def sample_inputs(self) -> dict[str, np.ndarray]:
        """A mid-grey KITTI-sized frame (1242 x 375), what a road camera sends."""
        return {"image": np.full((375, 1242, 3), 114, np.uint8)}

    def outputs(self, engine_outputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("boxes", "FP32", (-1, 4)),
            TensorSpec("scores", "FP32", (-1,)),
            TensorSpec("class_ids", "INT64", (-1,)),
        )

    def preprocess(
        self, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], Any]:
        if "image" not in inputs:
            raise ValueError(f"missing input 'image'; got {sorted(inputs)}")
        image = inputs["image"]
        if image.dtype == object:  # BYTES [1]: one encoded image
            raw = image.reshape(-1)[0]
            image = decode_image(raw if isinstance(raw, bytes) else bytes(raw), self.config.max_pixels)
        image = check_image(image)
        padded, info = letterbox(image, self.imgsz)
        conf = _float_param(parameters, "conf", self.config.conf)
        iou = _float_param(parameters, "iou", self.config.iou)
        return {self.input_name: to_tensor(padded)}, (info, conf, iou)

    def postprocess(self, outputs: Mapping[str, np.ndarray], context: Any) -> dict[str, np.ndarray]:
        info, conf, iou = context
        assert isinstance(info, LetterboxInfo)
        if len(outputs) != 1:
            raise ValueError(f"yolo processor: expected one engine output, got {sorted(outputs)}")
        (pred,) = outputs.values()
        boxes, scores, class_ids = decode(
            pred, conf=conf, iou=iou, max_det=self.config.max_det, agnostic=self.config.agnostic_nms
        )
        return {"boxes": scale_boxes(boxes, info), "scores": scores, "class_ids": class_ids}

    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def to_detections(self, outputs: Mapping[str, np.ndarray]) -> Detections:
        """The processor's outputs as :class:`Detections` with this model's class names."""
        return Detections(
            outputs["boxes"], outputs["scores"], outputs["class_ids"], tuple(self.config.class_names)
        )


register_processor("yolo", YoloProcessor)
