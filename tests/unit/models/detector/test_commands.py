"""``moesaic detect`` and ``moesaic generate-images`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from moesaic.cli import main


def test_detect_json_in_original_pixels(
    tmp_path: Path, yolo_head: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = yolo_head.write(tmp_path / "m", yolo_head.prediction([(32, 32, 16, 8)], [[0.9, 0.0]]), imgsz=64)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "frame.png")
    assert main(["detect", "--model", str(model), "--image", str(tmp_path / "frame.png"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == [{"xyxy": [48.0, 24.0, 80.0, 40.0], "score": 0.9, "class_id": 0, "class_name": "vehicle"}]
    assert (
        main(["detect", "--model", str(model), "--image", str(tmp_path / "frame.png"), "--slice", "64"]) == 0
    )
    assert "detections in" in capsys.readouterr().out


def test_detect_errors_exit_2(tmp_path: Path, yolo_head: Any, capsys: pytest.CaptureFixture[str]) -> None:
    model = yolo_head.write(tmp_path / "m", yolo_head.prediction([(32, 32, 16, 8)], [[0.9, 0.0]]), imgsz=64)
    assert main(["detect", "--model", str(model), "--image", str(tmp_path / "none.png")]) == 2
    assert "image: no such file" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    assert main(["detect", "--model", str(model), "--image", str(tmp_path / "text.png")]) == 2
    assert "is not an image" in capsys.readouterr().err


def test_generate_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate-images", "--out", str(tmp_path / "d"), "--count", "3", "--size", "96"]) == 0
    assert (tmp_path / "d" / "data.yaml").is_file()
    assert len(list((tmp_path / "d" / "images" / "train").glob("*.png"))) == 2
    assert main(["generate-images", "--out", str(tmp_path / "e"), "--count", "0"]) == 2


def test_detect_out_writes_an_annotated_image_and_json(
    tmp_path: Path, yolo_head: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = yolo_head.write(tmp_path / "m", yolo_head.prediction([(32, 32, 16, 8)], [[0.9, 0.0]]), imgsz=64)
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "frame.png")
    out = tmp_path / "result"
    assert (
        main(["detect", "--model", str(model), "--image", str(tmp_path / "frame.png"), "--out", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["frame.jpg", "frame.json"]
    record = json.loads((out / "frame.json").read_text())
    assert record["detections"][0]["xyxy"] == [48.0, 24.0, 80.0, 40.0]
    assert (record["width"], record["height"], record["synthetic"]) == (128, 64, False)
    with Image.open(out / "frame.jpg") as drawn:
        pixels = np.asarray(drawn.convert("RGB")).astype(int)
    assert drawn.size == (128, 64)
    assert pixels[32, 48].sum() > 200 and pixels[32, 20].sum() < 30  # the box's edge drawn, not elsewhere
    assert "note:" not in capsys.readouterr().err


def test_detect_says_when_a_model_was_trained_on_synthetic_data(
    tmp_path: Path, yolo_head: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_file = yolo_head.write(
        tmp_path / "m", yolo_head.prediction([(32, 32, 16, 8)], [[0.9, 0.0]]), imgsz=64
    )
    model = onnx_file.parent  # a model folder, as shipped: model.yaml says synthetic
    (model / "model.yaml").write_text(
        "name: toy\nsynthetic: true\nprocessor: {type: yolo, imgsz: 64, class_names: [vehicle, pedestrian]}\n"
    )
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "frame.png")
    assert main(["detect", "--model", str(model), "--image", str(tmp_path / "frame.png"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["class_name"] == "vehicle"  # stdout stays JSON
    assert "trained on generated (synthetic) images only" in captured.err
    assert "moesaic import-model" in captured.err


def test_the_shipped_models_say_they_are_synthetic() -> None:
    import yaml

    root = Path(__file__).resolve().parents[4] / "models"
    for spec_file in sorted(root.glob("*/model.yaml")):
        assert yaml.safe_load(spec_file.read_text()).get("synthetic") is True, spec_file
