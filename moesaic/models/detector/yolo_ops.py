"""YOLO pre- and post-processing at library speed, matching ultralytics' predictor.

Used by the ONNX and TensorRT paths, where ultralytics is not installed (Jetson, node hosts):

- :func:`letterbox`: resize keeping the aspect ratio (OpenCV's bilinear ``INTER_LINEAR``,
  written straight into the padded frame) and pad to the model's square input with grey 114,
  centred, with ultralytics' rounding of the padding;
- :func:`to_tensor`: HWC uint8 RGB -> NCHW float32 in [0, 1];
- :func:`decode`: ``[1, 4 + nc, A]`` raw head output (xywh + class scores) -> confidence
  filter, best class, class-aware NMS (IoU > ``iou`` suppressed; OpenCV's batched NMS, no
  Python loop over boxes), at most ``max_det`` boxes;
- :func:`scale_boxes`: letterbox pixels back to original pixels, clipped.

OpenCV comes with the node runtimes (``moesaic[cpu]`` or ``moesaic[gpu]``). The numpy
versions, :func:`resize_bilinear` (bit-exact with OpenCV), :func:`letterbox_reference` and
:func:`nms` (greedy, equal to torchvision's), are kept as the test oracles.

>>> img = np.zeros((100, 200, 3), np.uint8)
>>> padded, info = letterbox(img, 64)
>>> padded.shape, info.pad_y
((64, 64, 3), 16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LetterboxInfo",
    "batched_nms",
    "decode",
    "letterbox",
    "letterbox_reference",
    "nms",
    "resize_bilinear",
    "scale_boxes",
    "to_tensor",
]

PAD_VALUE = 114


@dataclass(frozen=True)
class LetterboxInfo:
    """How an image was letterboxed: original (h, w), per-axis gain and left/top padding."""

    orig_shape: tuple[int, int]
    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int


_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: 11-bit fixed-point weights


def _axis(src: int, dst: int, *, vertical: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights of one axis, as OpenCV computes them.

    Horizontally OpenCV zeroes the weight of taps outside the image; vertically it keeps
    the weights and clamps the row indices (the two taps then read the same row).
    """
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    if not vertical:
        frac[i0 < 0] = 0.0
        frac[i0 >= src - 1] = 0.0
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_COEF_SCALE)).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, _COEF_SCALE - w0


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of an HWC uint8 image, bit-exact with ``cv2.resize(..., INTER_LINEAR)``.

    OpenCV samples at pixel centres with 11-bit integer weights: a horizontal pass into
    int32, then a vertical pass computed as ``((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16)``
    rounded by ``(+ 2) >> 2`` (its SIMD kernel); this reproduces that arithmetic.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image.copy()
    x0, x1, a0, a1 = _axis(w, width, vertical=False)
    y0, y1, b0, b1 = _axis(h, height, vertical=True)
    src = image.astype(np.int64)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # [h, width, C]
    top = ((rows[y0] >> 4) * b0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * b1[:, None, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        from moesaic.runtime.engine import MissingExtraError

        raise MissingExtraError("opencv-python-headless", "cpu", "gpu") from None
    return cv2


def _geometry(shape: tuple[int, ...], imgsz: int | tuple[int, int]) -> tuple[int, int, int, int, int, int]:
    """(new_h, new_w, unpad_h, unpad_w, top, left) of ultralytics' letterbox."""
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"image: expected [H, W, 3], got shape {list(shape)}")
    new_h, new_w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    h, w = shape[:2]
    r = min(new_h / h, new_w / w)
    unpad_w, unpad_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (new_w - unpad_w) / 2, (new_h - unpad_h) / 2
    return new_h, new_w, unpad_h, unpad_w, round(dh - 0.1), round(dw - 0.1)


def letterbox(image: np.ndarray, imgsz: int | tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize ``image`` (HWC) to fit ``imgsz`` keeping its aspect ratio, pad centred with 114.

    OpenCV resizes straight into the padded frame (about 0.2 ms for a 1242 x 375 KITTI frame
    to 320 px on the 2-core VM); the result is bit-exact with :func:`letterbox_reference`.
    """
    new_h, new_w, unpad_h, unpad_w, top, left = _geometry(image.shape, imgsz)
    cv2 = _cv2()
    h, w = image.shape[:2]
    out = np.full((new_h, new_w, 3), PAD_VALUE, np.uint8)
    inner = out[top : top + unpad_h, left : left + unpad_w]
    if (h, w) == (unpad_h, unpad_w):
        inner[...] = image
    else:
        src = image if image.flags.c_contiguous else np.ascontiguousarray(image)
        resized = cv2.resize(src, (unpad_w, unpad_h), dst=inner, interpolation=cv2.INTER_LINEAR)
        if not np.shares_memory(resized, out):  # OpenCV chose a buffer of its own
            inner[...] = resized
    return out, LetterboxInfo((h, w), unpad_w / w, unpad_h / h, left, top)


def letterbox_reference(image: np.ndarray, imgsz: int | tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """:func:`letterbox` in numpy alone (:func:`resize_bilinear`): the test oracle, ~100x slower."""
    new_h, new_w, unpad_h, unpad_w, top, left = _geometry(image.shape, imgsz)
    h, w = image.shape[:2]
    out = np.full((new_h, new_w, 3), PAD_VALUE, np.uint8)
    out[top : top + unpad_h, left : left + unpad_w] = resize_bilinear(image, unpad_w, unpad_h)
    return out, LetterboxInfo((h, w), unpad_w / w, unpad_h / h, left, top)


def to_tensor(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> ``[1, 3, H, W]`` float32 in [0, 1], contiguous."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS (highest score first; IoU > ``iou`` suppressed).

    The numpy oracle of :func:`batched_nms` (one Python iteration per kept box)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, k].astype(np.float64) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray | None, iou: float, *, max_det: int = 0
) -> np.ndarray:
    """Indices kept by NMS within each class (``class_ids`` None: across classes), best first.

    OpenCV's ``NMSBoxesBatched`` / ``NMSBoxes`` in C++: no Python loop over boxes. Same
    boxes as :func:`nms` on class-offset boxes (ties broken by the lower index). A host
    without OpenCV (a coordinator installed without a node runtime) runs :func:`nms` on
    class-offset boxes instead."""
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64)
    conf = np.ascontiguousarray(scores, np.float32)
    cv2: Any  # OpenCV's stubs want Sequences; it takes numpy arrays
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not conf.min() > 0:  # OpenCV drops scores <= its threshold, which is >= 0
        offset = 0.0 if class_ids is None else class_ids[:, None] * (float(np.abs(boxes).max()) * 2 + 1)
        kept_numpy = nms(boxes + offset, scores, iou)
        return kept_numpy[:max_det] if max_det > 0 else kept_numpy
    xywh = np.empty((n, 4), np.float64)  # Rect2d: OpenCV computes the overlaps in double
    xywh[:, :2] = boxes[:, :2]
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    if class_ids is None:
        kept = cv2.dnn.NMSBoxes(xywh, conf, 0.0, float(iou), top_k=max_det)
    else:
        ids = np.ascontiguousarray(class_ids, np.int32)
        kept = cv2.dnn.NMSBoxesBatched(xywh, conf, ids, 0.0, float(iou), top_k=max_det)
    return np.asarray(kept, np.int64).reshape(-1)


def decode(
    prediction: np.ndarray,
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    max_nms: int = 30000,
    agnostic: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (xyxy, letterbox pixels), scores and class ids from one ``[1, 4+nc, A]`` output."""
    pred = np.asarray(prediction, dtype=np.float32)
    if pred.ndim == 3:
        if pred.shape[0] != 1:
            raise ValueError(f"prediction: expected batch 1, got shape {list(pred.shape)}")
        pred = pred[0]
    if pred.ndim != 2 or pred.shape[0] < 5:
        raise ValueError(
            f"prediction: expected [1, 4 + classes, anchors], got shape {list(prediction.shape)}"
        )
    best = pred[4:].max(axis=0)  # reduce along the contiguous anchor axis
    x = pred[:, best > conf].T  # [kept anchors, 4 + nc]
    if not len(x):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    cls_scores = x[:, 4:]
    class_ids = cls_scores.argmax(axis=1)
    scores = cls_scores[np.arange(len(x)), class_ids]
    cx, cy, w, h = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    if len(boxes) > max_nms:
        top = np.argsort(-scores, kind="stable")[:max_nms]
        boxes, scores, class_ids = boxes[top], scores[top], class_ids[top]
    keep = batched_nms(boxes, scores, None if agnostic else class_ids, iou, max_det=max_det)[:max_det]
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32), class_ids[keep].astype(np.int64)


def scale_boxes(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map xyxy boxes from letterbox pixels to original image pixels, clipped to the image."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - info.pad_x) / info.gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - info.pad_y) / info.gain_y
    h, w = info.orig_shape
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out
