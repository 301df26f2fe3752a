"""The synthetic intersection generator: images, YOLO labels and COCO JSON agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moesaic.datasets.constellation import YoloDataset
from moesaic.datasets.intersection import CLASS_NAMES, generate_dataset, render_scene


def test_scene_has_tiny_objects_of_both_classes_inside_the_image() -> None:
    scene = render_scene(np.random.default_rng(3), size=320)
    d = scene.detections
    assert scene.image.shape == (320, 320, 3) and scene.image.dtype == np.uint8
    assert d.class_names == CLASS_NAMES and set(d.class_ids.tolist()) == {0, 1}
    assert (d.boxes >= 0).all() and (d.boxes <= 320).all()
    sizes = np.maximum(d.boxes[:, 2] - d.boxes[:, 0], d.boxes[:, 3] - d.boxes[:, 1])
    assert sizes[d.class_ids == 1].max() <= 8.5  # pedestrians a few pixels wide
    assert sizes[d.class_ids == 0].min() >= 14 and sizes[d.class_ids == 0].max() <= 30.5


def test_conditions_vary_between_images() -> None:
    rng = np.random.default_rng(0)
    means = [render_scene(rng, size=128).image.mean() for _ in range(8)]
    assert max(means) - min(means) > 15  # lighting varies
    assert (
        render_scene(np.random.default_rng(5), size=128).image.tolist()
        == render_scene(np.random.default_rng(5), size=128).image.tolist()
    )  # and is reproducible from the seed


def test_dataset_layout_labels_and_coco_agree(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "ds", count=5, size=128, val_fraction=0.4, seed=1)
    ds = YoloDataset.open(data)
    assert ds.class_names == CLASS_NAMES
    train, val = list(ds.samples("train")), list(ds.samples("val"))
    assert (len(train), len(val)) == (3, 2)
    coco = json.loads((tmp_path / "ds" / "annotations" / "train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    for image_info, sample in zip(coco["images"], train, strict=True):
        assert image_info["file_name"] == sample.image_path.name
        with Image.open(sample.image_path) as im:
            assert im.size == (128, 128)
        yolo = sample.load_detections()
        anns = [a for a in coco["annotations"] if a["image_id"] == image_info["id"]]
        assert len(anns) == len(yolo)
        xywh = np.array([a["bbox"] for a in anns])
        np.testing.assert_allclose(xywh[:, :2], yolo.boxes[:, :2], atol=1e-3)
        np.testing.assert_allclose(xywh[:, 2:], yolo.boxes[:, 2:] - yolo.boxes[:, :2], atol=1e-3)
        assert [a["category_id"] - 1 for a in anns] == yolo.class_ids.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"count": 0}, "count"), ({"count": 2, "val_fraction": 1.0}, "val_fraction")]
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path, **kwargs)  # type: ignore[arg-type]
