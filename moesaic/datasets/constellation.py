"""Reader for datasets in the Constellation / YOLO layout.

The Constellation intersection dataset (arXiv 2404.16944; classes ``vehicle`` and
``pedestrian``) ships as::

    root/
      data.yaml                  # path, train, val, names
      images/{train,val}/*.jpg
      labels/{train,val}/*.txt   # one line per box: class cx cy w h (normalised)

which is also what :func:`moesaic.datasets.intersection.generate_dataset` writes, so the
same code trains and evaluates on either. Point it at the real dataset with::

    ds = YoloDataset.open(Path("/data/constellation/data.yaml"))
    for sample in ds.samples("val"):
        sample.image_path, sample.load_detections()
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from moesaic.runtime.detections import Detections

__all__ = ["IMAGE_SUFFIXES", "Sample", "YoloDataset", "read_yolo_labels"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_yolo_labels(path: Path, width: int, height: int, class_names: tuple[str, ...] = ()) -> Detections:
    """Boxes of a YOLO label file in pixels (a missing file means no objects)."""
    if not path.is_file():
        return Detections.empty(class_names)
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            raise ValueError(f"{path}:{lineno}: expected 'class cx cy w h', got {line!r}")
        try:
            cid = int(parts[0])
            cx, cy, w, h = (float(v) for v in parts[1:5])
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: expected an integer class and four numbers, got {line!r}"
            ) from None
        if class_names and not 0 <= cid < len(class_names):
            raise ValueError(f"{path}:{lineno}: class {cid} is not one of {len(class_names)} classes")
        if w < 0 or h < 0:
            raise ValueError(f"{path}:{lineno}: negative box size in {line!r}")
        rows.append(
            (cid, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        )
    if not rows:
        return Detections.empty(class_names)
    arr = np.array(rows, np.float64)
    return Detections(arr[:, 1:5], np.ones(len(arr), np.float32), arr[:, 0].astype(np.int64), class_names)


@dataclass(frozen=True)
class Sample:
    """One image of a split and where its labels are."""

    image_path: Path
    label_path: Path
    class_names: tuple[str, ...]

    def size(self) -> tuple[int, int]:
        """(width, height) read from the image header."""
        with Image.open(self.image_path) as im:
            return im.size

    def load_image(self) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]``."""
        with Image.open(self.image_path) as im:
            return np.asarray(im.convert("RGB"))

    def load_detections(self) -> Detections:
        w, h = self.size()
        return read_yolo_labels(self.label_path, w, h, self.class_names)


def _names(raw: Any, source: Path) -> tuple[str, ...]:
    if isinstance(raw, dict):
        keys = sorted(int(k) for k in raw)
        if keys != list(range(len(keys))):
            raise ValueError(f"{source}: names: expected ids 0..{len(keys) - 1}, got {keys}")
        return tuple(str(raw[k] if k in raw else raw[str(k)]) for k in keys)
    if isinstance(raw, list) and raw:
        return tuple(str(n) for n in raw)
    raise ValueError(f"{source}: names: expected a list or an id -> name mapping")


@dataclass(frozen=True)
class YoloDataset:
    """A YOLO-layout dataset: its root, class names and split -> image folder."""

    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, Path]

    @classmethod
    def open(cls, path: Path) -> YoloDataset:
        """Open from a data YAML, or from a root folder holding ``data.yaml`` (or ``*.yaml``)."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "data.yaml", *sorted(path.glob("*.yaml"))]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ValueError(f"dataset: {path} has no data YAML")
            path = found
        if not path.is_file():
            raise ValueError(f"dataset: no such data YAML {path}")
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: expected a mapping with path, train, val, names")
        root = Path(spec.get("path") or path.parent)
        if not root.is_absolute():
            root = (path.parent / root).resolve()
        names = _names(spec.get("names"), path)
        splits: dict[str, Path] = {}
        for split in ("train", "val", "test"):
            if spec.get(split):
                folder = Path(spec[split])
                splits[split] = folder if folder.is_absolute() else root / folder
        if not splits:
            raise ValueError(f"{path}: no train/val/test split listed")
        return cls(root, names, splits)

    def samples(self, split: str) -> Iterator[Sample]:
        """Images of ``split`` in name order, each with its label file (``images`` -> ``labels``)."""
        if split not in self.splits:
            raise LookupError(f"split {split!r} not in dataset; has {sorted(self.splits)}")
        folder = self.splits[split]
        if not folder.is_dir():
            raise ValueError(f"split {split!r}: no image folder {folder}")
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            parts = list(image.parts)
            idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
            if idx is None:
                label = image.with_suffix(".txt")
            else:
                parts[idx] = "labels"
                label = Path(*parts).with_suffix(".txt")
            yield Sample(image, label, self.class_names)
