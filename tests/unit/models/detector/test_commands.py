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
