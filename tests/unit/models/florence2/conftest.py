"""Florence-2 fixtures: a tiny random checkpoint built offline, and one taught a single answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ANSWER = "vehicle<loc_100><loc_200><loc_300><loc_400>pedestrian<loc_500><loc_500><loc_520><loc_560>"


def sample_image() -> np.ndarray:
    return (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_florence2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moesaic.models.florence2.tiny import build_tiny_florence2

    torch.set_num_threads(1)
    return build_tiny_florence2(tmp_path_factory.mktemp("florence2") / "tiny")


@pytest.fixture(scope="session")
def taught_florence2(tiny_florence2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model fully fine-tuned until greedy decoding of ``<OD>`` gives ``ANSWER``."""
    from moesaic.models.florence2.finetune import TrainingExample, finetune

    out = tmp_path_factory.mktemp("florence2") / "taught"
    finetune(
        tiny_florence2, [TrainingExample(sample_image(), "<OD>", ANSWER)], out, steps=80, lr=3e-3, lora=False
    )
    return out


@pytest.fixture
def image() -> np.ndarray:
    return sample_image()


@pytest.fixture
def answer() -> str:
    return ANSWER
