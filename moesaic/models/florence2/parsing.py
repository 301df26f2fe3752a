"""Florence-2 output text -> :class:`Detections` (``<loc_*>`` tokens, 1000 bins per axis).

Florence-2 writes a box as four location tokens after its label, each a bin index in
0..999 of the image width or height; several boxes of one label follow each other::

    car<loc_52><loc_333><loc_932><loc_774>person<loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><loc_70><loc_80>

A bin maps back to its centre, ``(bin + 0.5) * size / 1000``, as transformers'
``Florence2PostProcessor.dequantize`` does.

>>> d = parse_detections("car<loc_0><loc_0><loc_499><loc_999>", width=200, height=100)
>>> d.boxes.tolist(), d.labels
([[0.1, 0.05, 99.9, 99.95]], ('car',))
"""

from __future__ import annotations

import re

import numpy as np

from moesaic.runtime.detections import Detections

__all__ = ["LOC_BINS", "SPECIAL_TOKENS", "TASKS", "clean_text", "dequantize", "parse_detections", "quantize"]

LOC_BINS = 1000
TASKS = ("<OD>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OPEN_VOCABULARY_DETECTION>")
DETECTION_TASKS = ("<OD>", "<OPEN_VOCABULARY_DETECTION>")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>", "<mask>")

_LOC = re.compile(r"<loc_(\d+)>")
_GROUP = re.compile(r"([^<]*(?:<(?!loc_)[^>]*>[^<]*)*)((?:<loc_\d+>)+)")


def clean_text(text: str) -> str:
    """Generated text without BOS/EOS/padding tokens, stripped."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text.strip()


def dequantize(bins: np.ndarray, width: float, height: float) -> np.ndarray:
    """``[N, 4]`` bin indices -> xyxy pixel boxes (bin centres)."""
    b = np.asarray(bins, np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height]) / LOC_BINS
    return ((b + 0.5) * scale).astype(np.float32)


def quantize(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """xyxy pixel boxes -> ``[N, 4]`` bin indices in 0..999 (the inverse of :func:`dequantize`)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height]) / LOC_BINS
    return np.clip(np.floor(b / scale), 0, LOC_BINS - 1).astype(np.int64)


def parse_detections(text: str, *, width: int, height: int, class_names: tuple[str, ...] = ()) -> Detections:
    """Boxes and labels from generated text.

    ``class_ids`` index ``class_names`` extended by every new label in order of appearance.
    Scores are 1.0: generation gives no calibrated per-box score. Trailing location tokens
    that do not fill a whole box, and boxes with x2 < x1 or y2 < y1, are dropped.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size: expected positive width and height, got {width}x{height}")
    text = clean_text(text)
    labels: list[str] = []
    bins: list[list[int]] = []
    for label_raw, locs in _GROUP.findall(text):
        label = re.sub(r"<[^>]*>", "", label_raw).strip()
        values = [min(int(v), LOC_BINS - 1) for v in _LOC.findall(locs)]
        for k in range(0, len(values) - 3, 4):
            box = values[k : k + 4]
            if box[2] >= box[0] and box[3] >= box[1]:
                bins.append(box)
                labels.append(label)
    if not bins:
        return Detections.empty(class_names)
    names = list(class_names)
    for label in labels:
        if label not in names:
            names.append(label)
    index = {n: i for i, n in enumerate(names)}
    class_ids = np.array([index[lbl] for lbl in labels], np.int64)
    boxes = dequantize(np.array(bins), width, height)
    return Detections(boxes, np.ones(len(boxes), np.float32), class_ids, tuple(names), tuple(labels))
