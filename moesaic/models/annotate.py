"""Draw detections on an image: a box and a ``class score`` label per detection.

>>> image = np.zeros((64, 96, 3), np.uint8)
>>> dets = Detections(np.array([[8, 8, 40, 30]], np.float32), np.array([0.9], np.float32),
...                   np.array([0]), class_names=("vehicle",))
>>> annotate(image, dets).size
(96, 64)
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np

from moesaic.runtime.detections import Detections

__all__ = ["annotate"]

_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 96, 255), (0, 220, 220))


def annotate(image: np.ndarray, detections: Detections) -> Any:
    """A PIL image of ``image`` (RGB uint8 ``[H, W, 3]``) with ``detections`` drawn on it,
    one colour per class, labels in the bundled DejaVu Sans (no font is downloaded)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(11, min(canvas.width, canvas.height) // 40)
    font_file = resources.files("moesaic").joinpath("assets", "fonts", "DejaVuSans.ttf")
    with resources.as_file(font_file) as path:
        font: Any = ImageFont.truetype(str(path), size)
    width = max(2, min(canvas.width, canvas.height) // 300)
    for i in range(len(detections)):
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
        colour = _COLOURS[int(detections.class_ids[i]) % len(_COLOURS)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        label = f"{detections.name_of(i)} {float(detections.scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        top_y = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, top_y, x1 + (right - left) + 4, top_y + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 2, top_y - (top - y1)), label, fill=(0, 0, 0), font=font)
    return canvas
