"""Reading the Constellation/YOLO layout, including its error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moesaic.datasets.constellation import YoloDataset, read_yolo_labels


def _write_dataset(root: Path, names: str = "names: {0: vehicle, 1: pedestrian}") -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "images" / "val" / "a.jpg")
    Image.new("RGB", (200, 100)).save(root / "images" / "val" / "b.png")
    (root / "labels" / "val" / "a.txt").write_text("0 0.5 0.5 0.1 0.2\n1 0.25 0.75 0.05 0.1\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\n{names}\n")
    return root


def test_reads_split_images_and_pixel_boxes(tmp_path: Path) -> None:
    ds = YoloDataset.open(_write_dataset(tmp_path / "constellation"))
    assert ds.class_names == ("vehicle", "pedestrian")
    samples = list(ds.samples("val"))
    assert [s.image_path.name for s in samples] == ["a.jpg", "b.png"]
    a = samples[0].load_detections()
    np.testing.assert_allclose(a.boxes, [[90, 40, 110, 60], [45, 70, 55, 80]], atol=1e-4)
    assert a.class_ids.tolist() == [0, 1]
    assert len(samples[1].load_detections()) == 0  # no label file: no objects
    assert samples[0].load_image().shape == (100, 200, 3)
    assert list(ds.samples("train")) == []


def test_names_as_list_and_open_by_yaml_path(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "d", names="names: [car, person]")
    assert YoloDataset.open(root / "data.yaml").class_names == ("car", "person")


def test_errors_name_the_problem(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "d")
    with pytest.raises(LookupError, match="split 'test'"):
        list(YoloDataset.open(root).samples("test"))
    with pytest.raises(ValueError, match="no data YAML"):
        YoloDataset.open(tmp_path / "d" / "images")
    bad = root / "labels" / "val" / "bad.txt"
    bad.write_text("0 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'class cx cy w h'"):
        read_yolo_labels(bad, 10, 10)
    bad.write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="class 7"):
        read_yolo_labels(bad, 10, 10, ("a", "b"))
    (root / "data.yaml").write_text("path: .\nnames: [a]\n")
    with pytest.raises(ValueError, match="no train/val/test split"):
        YoloDataset.open(root)
