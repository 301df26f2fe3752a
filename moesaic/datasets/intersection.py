"""Synthetic top-down intersection images with tiny vehicles and pedestrians.

A stand-in for high-mounted intersection cameras (the Constellation dataset): two crossing
roads with lane markings and crosswalks, sidewalks and grass, vehicles a few tens of pixels
long driving along the lanes and pedestrians a few pixels wide on sidewalks and crossings.
Each image varies lighting (brightness, gamma, colour tint), casts shadows (a sun direction
per image, plus building shadows), and may be blurred and noisy.

Labels are written in the Constellation/YOLO layout (``images/{train,val}``,
``labels/{train,val}`` with ``class cx cy w h`` normalised, a ``data.yaml``) and as COCO JSON
(``annotations/{split}.json``)::

    >>> import numpy as np
    >>> scene = render_scene(np.random.default_rng(0), size=256)
    >>> scene.image.shape, scene.detections.class_names
    ((256, 256, 3), ('vehicle', 'pedestrian'))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from moesaic.runtime.detections import Detections

__all__ = ["CLASS_NAMES", "IntersectionScene", "generate_dataset", "render_scene", "to_coco", "yolo_lines"]

CLASS_NAMES: tuple[str, str] = ("vehicle", "pedestrian")
VEHICLE, PEDESTRIAN = 0, 1

_CAR_COLOURS = np.array(
    [
        [200, 30, 30],
        [30, 60, 170],
        [230, 230, 230],
        [20, 20, 20],
        [120, 120, 130],
        [210, 180, 40],
        [40, 120, 60],
    ]
)


@dataclass(frozen=True)
class IntersectionScene:
    """One rendered image (RGB uint8 ``[H, W, 3]``) and its ground-truth boxes."""

    image: np.ndarray
    detections: Detections


def _background(rng: np.random.Generator, size: int, road: int, cx: int, cy: int) -> Image.Image:
    grass = np.array([70, 110, 50]) + rng.integers(-20, 20, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in grass))
    draw = ImageDraw.Draw(img)
    walk = road // 4
    pave = tuple(int(v) for v in np.array([165, 160, 150]) + rng.integers(-15, 15, 3))
    asphalt = tuple(int(v) for v in np.array([75, 75, 78]) + rng.integers(-15, 15, 3))
    # Sidewalks, then roads on top.
    draw.rectangle([cx - road // 2 - walk, 0, cx + road // 2 + walk, size], fill=pave)
    draw.rectangle([0, cy - road // 2 - walk, size, cy + road // 2 + walk], fill=pave)
    draw.rectangle([cx - road // 2, 0, cx + road // 2, size], fill=asphalt)
    draw.rectangle([0, cy - road // 2, size, cy + road // 2], fill=asphalt)
    # Centre lines (dashed) outside the junction, stop lines and zebra crossings.
    line = (230, 230, 210)
    for t in range(0, size, 24):
        if abs(t - cy) > road // 2 + walk:
            draw.line([cx, t, cx, t + 12], fill=(220, 190, 40), width=2)
        if abs(t - cx) > road // 2 + walk:
            draw.line([t, cy, t + 12, cy], fill=(220, 190, 40), width=2)
    stripe = max(2, road // 16)
    for k in range(-road // 2 + stripe, road // 2 - stripe, 2 * stripe):
        for sy in (cy - road // 2 - walk, cy + road // 2 + 2):
            draw.rectangle([cx + k, sy, cx + k + stripe - 1, sy + max(walk - 3, 1)], fill=line)
        for sx in (cx - road // 2 - walk, cx + road // 2 + 2):
            draw.rectangle([sx, cy + k, sx + max(walk - 3, 1), cy + k + stripe - 1], fill=line)
    # Texture: a little per-pixel noise and some darker patches (oil, repairs).
    for _ in range(int(rng.integers(3, 10))):
        x, y, r = (
            int(v) for v in (rng.integers(0, size), rng.integers(0, size), rng.integers(4, road // 2 + 5))
        )
        shade = tuple(int(c * 0.85) for c in asphalt)
        draw.ellipse([x - r, y - r // 2, x + r, y + r // 2], fill=shade)
    return img


def _vehicle_box(
    rng: np.random.Generator, size: int, road: int, cx: int, cy: int, scale: float
) -> tuple[float, float, float, float]:
    length = rng.uniform(14, 30) * scale
    width = length * rng.uniform(0.42, 0.55)
    lane = road / 4
    if rng.random() < 0.5:  # on the vertical road
        x = cx + (lane if rng.random() < 0.5 else -lane) - width / 2
        y = rng.uniform(0, size - length)
        return x, y, x + width, y + length
    y = cy + (lane if rng.random() < 0.5 else -lane) - width / 2
    x = rng.uniform(0, size - length)
    return x, y, x + length, y + width


def _pedestrian_box(
    rng: np.random.Generator, size: int, road: int, cx: int, cy: int, scale: float
) -> tuple[float, float, float, float]:
    d = rng.uniform(4, 8) * scale
    walk = road // 4
    edge = road / 2 + walk / 2
    choice = rng.integers(0, 3)
    if choice == 0:  # along a vertical sidewalk
        x = cx + (edge if rng.random() < 0.5 else -edge) + rng.uniform(-walk / 3, walk / 3)
        y = rng.uniform(d, size - d)
    elif choice == 1:  # along a horizontal sidewalk
        y = cy + (edge if rng.random() < 0.5 else -edge) + rng.uniform(-walk / 3, walk / 3)
        x = rng.uniform(d, size - d)
    else:  # on a crossing
        x = cx + rng.uniform(-road / 2, road / 2)
        y = cy + (edge if rng.random() < 0.5 else -edge)
        if rng.random() < 0.5:
            x, y = cx + (y - cy), cy + (x - cx)
    return x - d / 2, y - d / 2, x + d / 2, y + d / 2


def _overlaps(box: tuple[float, ...], boxes: Sequence[tuple[float, ...]]) -> bool:
    x1, y1, x2, y2 = box
    return any(not (x2 < b[0] or b[2] < x1 or y2 < b[1] or b[3] < y1) for b in boxes)


def render_scene(
    rng: np.random.Generator,
    *,
    size: int = 640,
    vehicles: tuple[int, int] = (4, 14),
    pedestrians: tuple[int, int] = (4, 16),
    object_scale: float = 1.0,
) -> IntersectionScene:
    """Render one intersection of ``size`` x ``size`` pixels with random objects and conditions.

    ``object_scale`` multiplies object sizes (1.0: vehicles 14-30 px long, pedestrians 4-8 px).
    """
    if size < 64:
        raise ValueError(f"size: expected >= 64 pixels, got {size}")
    road = int(size * rng.uniform(0.16, 0.24))
    cx = int(size * rng.uniform(0.35, 0.65))
    cy = int(size * rng.uniform(0.35, 0.65))
    img = _background(rng, size, road, cx, cy)
    draw = ImageDraw.Draw(img, "RGBA")
    sun = rng.uniform(0, 2 * np.pi)
    shadow_len = rng.uniform(1.0, 5.0) * object_scale
    sdx, sdy = np.cos(sun) * shadow_len, np.sin(sun) * shadow_len
    # Building shadows across the scene corners.
    for _ in range(int(rng.integers(0, 3))):
        x0, y0 = rng.uniform(0, size, 2)
        w, h = rng.uniform(size * 0.1, size * 0.4, 2)
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=(0, 0, 20, int(rng.integers(50, 110))))

    boxes: list[tuple[float, float, float, float]] = []
    classes: list[int] = []
    n_veh = int(rng.integers(vehicles[0], vehicles[1] + 1))
    n_ped = int(rng.integers(pedestrians[0], pedestrians[1] + 1))
    for cls, count in ((VEHICLE, n_veh), (PEDESTRIAN, n_ped)):
        for _ in range(count * 3):
            if sum(c == cls for c in classes) >= count:
                break
            box = (_vehicle_box if cls == VEHICLE else _pedestrian_box)(rng, size, road, cx, cy, object_scale)
            if _overlaps(box, boxes) or box[0] < 0 or box[1] < 0 or box[2] > size or box[3] > size:
                continue
            x1, y1, x2, y2 = box
            draw.rectangle([x1 + sdx, y1 + sdy, x2 + sdx, y2 + sdy], fill=(0, 0, 0, 90))
            if cls == VEHICLE:
                colour = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))] + rng.integers(-20, 20, 3)
                draw.rounded_rectangle(
                    [x1, y1, x2, y2], radius=2, fill=tuple(int(c) for c in colour.clip(0, 255))
                )
                # Windscreen: a dark band across the front third.
                if x2 - x1 > y2 - y1:
                    fx = x1 + (x2 - x1) * 0.2 if rng.random() < 0.5 else x2 - (x2 - x1) * 0.35
                    draw.rectangle([fx, y1 + 1, fx + (x2 - x1) * 0.15, y2 - 1], fill=(30, 40, 55))
                else:
                    fy = y1 + (y2 - y1) * 0.2 if rng.random() < 0.5 else y2 - (y2 - y1) * 0.35
                    draw.rectangle([x1 + 1, fy, x2 - 1, fy + (y2 - y1) * 0.15], fill=(30, 40, 55))
            else:
                coat = tuple(int(c) for c in rng.integers(20, 240, 3))
                draw.ellipse([x1, y1, x2, y2], fill=coat)
                r = (x2 - x1) * 0.22
                mx, my = (x1 + x2) / 2, (y1 + y2) / 2
                draw.ellipse([mx - r, my - r, mx + r, my + r], fill=(60, 40, 30))
            boxes.append(box)
            classes.append(cls)

    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    gamma = rng.uniform(0.7, 1.5)
    gain = rng.uniform(0.55, 1.25)
    tint = 1.0 + rng.uniform(-0.08, 0.08, 3)
    arr = gain * np.power(arr, gamma) * tint
    arr += rng.normal(0.0, rng.uniform(0.0, 0.03), arr.shape)
    image = (arr.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    dets = Detections(
        np.array(boxes, np.float32).reshape(-1, 4),
        np.ones(len(boxes), np.float32),
        np.array(classes, np.int64),
        CLASS_NAMES,
    )
    return IntersectionScene(image, dets)


def yolo_lines(dets: Detections, width: int, height: int) -> list[str]:
    """YOLO label lines ``class cx cy w h`` (normalised to the image size)."""
    out = []
    for (x1, y1, x2, y2), c in zip(dets.boxes, dets.class_ids, strict=True):
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        out.append(f"{int(c)} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return out


def to_coco(
    items: list[tuple[str, int, int, Detections]], class_names: tuple[str, ...] = CLASS_NAMES
) -> dict[str, Any]:
    """COCO detection JSON for ``(file_name, width, height, detections)`` items (ids from 1)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (name, w, h, dets) in enumerate(items, start=1):
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for (x1, y1, x2, y2), c in zip(dets.boxes.tolist(), dets.class_ids.tolist(), strict=True):
            bw, bh = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(c) + 1,
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def generate_dataset(
    out: Path,
    *,
    count: int,
    size: int = 640,
    val_fraction: float = 0.2,
    seed: int = 0,
    object_scale: float = 1.0,
) -> Path:
    """Write ``count`` images in the Constellation/YOLO layout plus COCO JSON; returns ``data.yaml``."""
    if count < 1:
        raise ValueError(f"count: expected >= 1, got {count}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    n_val = round(count * val_fraction)
    splits = {"train": count - n_val, "val": n_val}
    out = Path(out)
    for split, n in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        items: list[tuple[str, int, int, Detections]] = []
        for i in range(n):
            scene = render_scene(rng, size=size, object_scale=object_scale)
            name = f"{split}_{i:05d}.png"
            Image.fromarray(scene.image).save(out / "images" / split / name)
            lines = yolo_lines(scene.detections, size, size)
            (out / "labels" / split / f"{split}_{i:05d}.txt").write_text(
                "\n".join(lines) + ("\n" if lines else "")
            )
            items.append((name, size, size, scene.detections))
        (out / "annotations" / f"{split}.json").write_text(json.dumps(to_coco(items)))
    data_yaml = out / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
    data_yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data_yaml
