"""The ``florence2`` engine: a Florence-2 checkpoint served as one model of a node.

model.yaml::

    task: vlm
    engine: {type: florence2, weights: weights, device: cpu, max_new_tokens: 256}

Inputs ``image`` UINT8 ``[H, W, 3]`` (RGB) and ``prompt`` BYTES ``[1]`` (a task token such as
``<OD>``, ``<CAPTION>`` or ``<OPEN_VOCABULARY_DETECTION>car``); outputs ``text`` BYTES ``[1]``,
``boxes`` FP32 ``[N, 4]``, ``scores`` FP32 ``[N]``, ``class_ids`` INT64 ``[N]`` and ``labels``
BYTES ``[N]`` (N = 0 for captions).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from moesaic.errors import InvalidInput
from moesaic.models.florence2.model import Florence2Expert
from moesaic.runtime.engine import (
    Engine,
    EngineConfig,
    EngineDescription,
    EngineError,
    TensorSpec,
    register_engine,
)

__all__ = ["FLORENCE2_INPUTS", "FLORENCE2_OUTPUTS", "Florence2Engine", "Florence2EngineConfig", "prompt_of"]

FLORENCE2_INPUTS = (TensorSpec("image", "UINT8", (-1, -1, 3)), TensorSpec("prompt", "BYTES", (1,)))
FLORENCE2_OUTPUTS = (
    TensorSpec("text", "BYTES", (1,)),
    TensorSpec("boxes", "FP32", (-1, 4)),
    TensorSpec("scores", "FP32", (-1,)),
    TensorSpec("class_ids", "INT64", (-1,)),
    TensorSpec("labels", "BYTES", (-1,)),
)


class Florence2EngineConfig(EngineConfig):
    """``engine:`` options of a Florence-2 model folder."""

    type: Literal["florence2"] = "florence2"
    weights: str = Field(
        "weights", description="checkpoint folder (config.json, safetensors, processor files)"
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights dtype")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="generation length limit")
    num_beams: int = Field(1, ge=1, le=8, description="beam search width (1 = greedy)")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


def prompt_of(tensor: np.ndarray) -> str:
    """The one prompt string of a ``prompt`` BYTES tensor, or ``ValueError``."""
    arr = np.asarray(tensor)
    if arr.size != 1:
        raise InvalidInput(f"prompt: expected exactly one string, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("prompt: expected UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise InvalidInput(f"prompt: expected BYTES, got {arr.dtype}")


class Florence2Engine(Engine):
    """Florence-2 generation with ``<loc_*>`` parsing, one request at a time."""

    backend = "florence2"

    def __init__(self, config: Florence2EngineConfig, model_dir: Path) -> None:
        self.config = config
        weights = Path(config.weights)
        self.expert = Florence2Expert(
            weights if weights.is_absolute() else Path(model_dir) / weights,
            device=config.device,
            dtype=config.dtype,
            max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams,
            threads=config.threads,
        )

    def load(self) -> None:
        try:
            self.expert.load()
        except (OSError, ValueError) as exc:
            raise EngineError(f"florence2: cannot load {self.expert.weights}: {exc}") from exc

    @property
    def ready(self) -> bool:
        return self.expert.ready

    def describe(self) -> EngineDescription:
        return EngineDescription(
            backend=self.backend,
            device=self.config.device,
            inputs=FLORENCE2_INPUTS,
            outputs=FLORENCE2_OUTPUTS,
            details={"dtype": self.config.dtype, "weights": str(self.expert.weights)},
        )

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [s.name for s in FLORENCE2_INPUTS if s.name not in inputs]
        if missing:
            raise InvalidInput(f"missing input(s) {missing}; Florence-2 takes 'image' and 'prompt'")
        result = self.expert.run(np.asarray(inputs["image"]), prompt_of(inputs["prompt"]))
        dets = result.detections
        labels = np.array([dets.name_of(i).encode() for i in range(len(dets))], dtype=object)
        return {
            "text": np.array([result.text.encode()], dtype=object),
            "boxes": dets.boxes,
            "scores": dets.scores,
            "class_ids": dets.class_ids,
            "labels": labels.reshape(-1),
        }

    def close(self) -> None:
        self.expert.close()


register_engine(Florence2EngineConfig, Florence2Engine)
