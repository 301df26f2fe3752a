"""The ``yolo`` processor and the ONNX loader around a real ONNX graph with a known head."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from moesaic.models.detector.detector import EngineDetector, load_detector
from moesaic.models.detector.serving import YoloProcessor
from moesaic.runtime.processing import create_processor, processor_types


@pytest.fixture
def head_model(tmp_path: Path, yolo_head: Any) -> Path:
    # Letterbox of a 128 x 64 (w x h) image to 64: gain 0.5, pad_y 16. Anchor 0 is a vehicle
    # at (32, 32) 16 x 8 in model pixels -> (64, 32) 32 x 16 in the original image.
    pred = yolo_head.prediction(
        [(32, 32, 16, 8), (10, 20, 4, 4), (33, 32, 16, 8)], [[0.9, 0.0], [0.1, 0.6], [0.3, 0.0]]
    )
    return yolo_head.write(tmp_path / "head", pred, imgsz=64)


def test_onnx_loader_decodes_and_rescales(head_model: Path) -> None:
    with load_detector(head_model) as det:
        assert isinstance(det, EngineDetector)
        assert det.class_names == ("vehicle", "pedestrian")
        d = det.detect(np.zeros((64, 128, 3), np.uint8))
    assert d.class_ids.tolist() == [0, 1]
    np.testing.assert_allclose(d.boxes[0], [48, 24, 80, 40], atol=1e-4)
    np.testing.assert_allclose(d.boxes[1], [16, 4, 24, 12], atol=1e-4)
    assert d.to_json()[1]["class_name"] == "pedestrian"


def test_thresholds_from_arguments_and_request_parameters(head_model: Path) -> None:
    with load_detector(head_model, conf=0.7) as det:
        assert len(det.detect(np.zeros((64, 64, 3), np.uint8))) == 1
        assert len(det.detect(np.zeros((64, 64, 3), np.uint8), conf=0.05)) == 2


def test_model_folder(tmp_path: Path, head_model: Path) -> None:
    spec = {"task": "detection", "engine": {"type": "onnxruntime"},
            "processor": {"type": "yolo", "imgsz": 64, "class_names": ["car", "person"]}}  # fmt: skip
    (head_model.parent / "model.yaml").write_text(yaml.safe_dump(spec))
    with load_detector(head_model.parent) as det:
        assert det.class_names == ("car", "person")
        assert len(det.detect(np.zeros((10, 10, 3), np.uint8))) == 2


def test_processor_registered_and_validates(tmp_path: Path) -> None:
    assert "yolo" in processor_types()
    proc = create_processor({"type": "yolo", "imgsz": 64}, tmp_path)
    assert isinstance(proc, YoloProcessor)
    with pytest.raises(ValueError, match="image: expected UINT8"):
        proc.preprocess({"image": np.zeros((8, 8, 3), np.float32)}, {})
    with pytest.raises(ValueError, match=r"image: expected shape \[H, W, 3\]"):
        proc.preprocess({"image": np.zeros((8, 8, 4), np.uint8)}, {})
    with pytest.raises(ValueError, match="missing input 'image'"):
        proc.preprocess({"img": np.zeros((8, 8, 3), np.uint8)}, {})
    with pytest.raises(ValueError, match="parameter 'conf'"):
        proc.preprocess({"image": np.zeros((8, 8, 3), np.uint8)}, {"conf": "high"})
    with pytest.raises(ValueError, match="processor \\(yolo\\)"):
        create_processor({"type": "yolo", "imgsz": 64, "bogus": 1}, tmp_path)


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_detector(tmp_path / "yolov8n.pt")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_detector(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match=r"without model\.yaml"):
        load_detector(tmp_path)


def test_ultralytics_engine_serves_a_checkpoint(tmp_path: Path) -> None:
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics not installed")
    from moesaic.models.detector.offline import import_ultralytics
    from moesaic.runtime.engine import EngineError, create_engine

    ultralytics = import_ultralytics()
    ultralytics.YOLO("yolov8n.yaml", task="detect").save(str(tmp_path / "model.pt"))
    engine = create_engine({"type": "ultralytics", "imgsz": 64}, tmp_path)
    with engine:
        assert [s.name for s in engine.describe().outputs] == ["boxes", "scores", "class_ids"]
        out = engine.infer({"image": np.zeros((48, 80, 3), np.uint8)})
        assert out["boxes"].shape[1] == 4 and out["class_ids"].dtype == np.int64
        with pytest.raises(ValueError, match="image"):
            engine.infer({"image": np.zeros((48, 80), np.uint8)})
    with pytest.raises(EngineError, match="no such checkpoint"):
        create_engine({"type": "ultralytics", "file": "missing.pt"}, tmp_path).load()


def test_ultralytics_engine_file_header_is_split_into_a_plan(tmp_path: Path) -> None:
    import json

    from moesaic.models.detector.detector import _strip_engine_header

    meta = json.dumps({"names": {0: "vehicle", 1: "pedestrian"}, "imgsz": [640, 640]}).encode()
    engine = tmp_path / "yolo.engine"
    engine.write_bytes(len(meta).to_bytes(4, "little") + meta + b"PLANBYTES")
    plan, parsed = _strip_engine_header(engine)
    assert plan == tmp_path / "yolo.plan" and plan.read_bytes() == b"PLANBYTES"
    assert parsed["names"] == {"0": "vehicle", "1": "pedestrian"}
    raw = tmp_path / "raw.engine"
    raw.write_bytes(b"\x00\x01\x02\x03not a header")
    assert _strip_engine_header(raw) == (raw, {})


def test_class_names_from_json_metadata_keep_id_order() -> None:
    from moesaic.models.detector.detector import _names_list

    assert _names_list({str(i): f"c{i}" for i in range(12)})[10] == "c10"
    assert _names_list(["a", "b"]) == ["a", "b"]
