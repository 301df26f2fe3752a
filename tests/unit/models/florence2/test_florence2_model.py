"""The full Florence-2 path on a tiny checkpoint built offline: native classes, tasks, engine, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import transformers

from moesaic.models.florence2.engine import Florence2Engine, Florence2EngineConfig
from moesaic.models.florence2.finetune import TrainingExample, answer_text, finetune
from moesaic.models.florence2.model import Florence2Expert
from moesaic.models.florence2.parsing import parse_detections
from moesaic.runtime.engine import EngineError, create_engine, engine_types


def test_checkpoint_uses_native_classes(tiny_florence2: Path) -> None:
    config = json.loads((tiny_florence2 / "config.json").read_text())
    assert config["model_type"] == "florence2" and "auto_map" not in config  # no remote code
    processor = transformers.Florence2Processor.from_pretrained(str(tiny_florence2), local_files_only=True)
    assert processor.tokenizer.convert_tokens_to_ids("<loc_999>") != processor.tokenizer.unk_token_id


@pytest.mark.parametrize(
    "prompt", ["<OD>", "<CAPTION>", "<DETAILED_CAPTION>", "<OPEN_VOCABULARY_DETECTION>car"]
)
def test_every_task_runs(tiny_florence2: Path, prompt: str, image: np.ndarray) -> None:
    expert = Florence2Expert(tiny_florence2, max_new_tokens=8)
    expert.load()
    result = expert.run(image, prompt)
    assert result.task == prompt.split(">")[0] + ">"
    assert isinstance(result.text, str)
    if prompt in ("<CAPTION>", "<DETAILED_CAPTION>"):
        assert len(result.detections) == 0


def test_taught_model_boxes_come_back_in_pixels(
    taught_florence2: Path, image: np.ndarray, answer: str
) -> None:
    expert = Florence2Expert(taught_florence2, max_new_tokens=24)
    expert.load()
    result = expert.run(image, "<OD>")
    assert result.text == answer
    d = result.detections
    assert d.labels == ("vehicle", "pedestrian")
    np.testing.assert_allclose(
        d.boxes[0], [(100.5) * 0.08, 200.5 * 0.048, 300.5 * 0.08, 400.5 * 0.048], atol=1e-3
    )


def test_engine_tensors_and_errors(taught_florence2: Path, image: np.ndarray, answer: str) -> None:
    assert "florence2" in engine_types()
    engine = create_engine(
        {"type": "florence2", "weights": str(taught_florence2), "max_new_tokens": 24}, Path(".")
    )
    assert isinstance(engine, Florence2Engine)
    with engine:
        out = engine.infer({"image": image, "prompt": np.array([b"<OD>"], dtype=object)})
        assert out["text"][0].decode() == answer
        assert out["labels"].tolist() == [b"vehicle", b"pedestrian"]
        assert out["boxes"].shape == (2, 4) and out["class_ids"].dtype == np.int64
        with pytest.raises(ValueError, match="prompt: expected one of"):
            engine.infer({"image": image, "prompt": np.array([b"hello"], dtype=object)})
        with pytest.raises(ValueError, match="image: expected UINT8"):
            engine.infer({"image": image.astype(np.float32), "prompt": np.array([b"<OD>"], dtype=object)})
        with pytest.raises(ValueError, match="missing input"):
            engine.infer({"image": image})
    with pytest.raises(EngineError, match="not a Florence-2 checkpoint"):
        Florence2Engine(Florence2EngineConfig(weights="/nonexistent"), Path(".")).load()


def test_lora_finetune_lowers_loss_and_merges(
    tiny_florence2: Path, tmp_path: Path, image: np.ndarray, answer: str
) -> None:
    dets = parse_detections(answer, width=80, height=48)
    assert answer_text(dets, 80, 48) == answer  # ground truth -> answer text round trip
    result = finetune(
        tiny_florence2, [TrainingExample(image, "<OD>", answer)], tmp_path / "lora", steps=25, lr=1e-2
    )
    assert result.last_loss < result.first_loss
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["model_type"] == "florence2"  # adapters merged: loads as a plain checkpoint
    expert = Florence2Expert(tmp_path / "lora", max_new_tokens=4)
    expert.load()
