"""Run a local Florence-2 checkpoint with transformers' native classes.

``Florence2ForConditionalGeneration`` and ``Florence2Processor`` ship with transformers
(>= 4.56), so no ``trust_remote_code`` is needed; the checkpoint is read from a local folder
only (``local_files_only=True``), never from the hub::

    expert = Florence2Expert(Path("models/florence2-base/weights"))
    expert.load()
    result = expert.run(rgb_image, "<OD>")
    result.text, result.detections.to_json()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.errors import InvalidInput
from moesaic.models.florence2.parsing import DETECTION_TASKS, TASKS, clean_text, parse_detections
from moesaic.runtime.detections import Detections
from moesaic.runtime.engine import EngineError, MissingExtraError

__all__ = ["Florence2Expert", "Florence2Result", "check_prompt"]


@dataclass(frozen=True)
class Florence2Result:
    """Generated text (special tokens removed) and the boxes it names (empty for captions)."""

    task: str
    text: str
    detections: Detections


def check_prompt(prompt: str) -> tuple[str, str]:
    """Split ``prompt`` into (task token, free text); ``ValueError`` for unsupported tasks."""
    prompt = prompt.strip()
    for task in TASKS:
        if prompt.startswith(task):
            rest = prompt[len(task) :].strip()
            if task == "<OPEN_VOCABULARY_DETECTION>" and not rest:
                raise InvalidInput(
                    "prompt: <OPEN_VOCABULARY_DETECTION> needs the object to find, "
                    "e.g. '<OPEN_VOCABULARY_DETECTION>car'"
                )
            if task != "<OPEN_VOCABULARY_DETECTION>" and rest:
                raise InvalidInput(f"prompt: {task} takes no text after the task token, got {rest!r}")
            return task, rest
    raise InvalidInput(
        f"prompt: expected one of {', '.join(TASKS)} (optionally followed by text), got {prompt[:60]!r}"
    )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "vlm") from None
    if not hasattr(transformers, "Florence2ForConditionalGeneration"):
        raise MissingExtraError("transformers>=4.56 (native Florence-2)", "vlm")
    return transformers


class Florence2Expert:
    """One Florence-2 checkpoint on one device (``cpu``, ``cuda``, ``cuda:1``)."""

    def __init__(
        self,
        weights: Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 256,
        num_beams: int = 1,
        threads: int = 0,
    ) -> None:
        self.weights = Path(weights)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.threads = threads
        self.model: Any = None
        self.processor: Any = None
        self._torch: Any = None

    @property
    def ready(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Load the processor and model from the local folder and warm up with one ``<OD>``."""
        transformers = _transformers()
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if not (self.weights / "config.json").is_file():
            raise EngineError(f"{self.weights}: not a Florence-2 checkpoint folder (no config.json)")
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise EngineError(f"dtype: unknown torch dtype {self.dtype!r}")
        self._torch = torch
        self.processor = transformers.Florence2Processor.from_pretrained(
            str(self.weights), local_files_only=True
        )
        model = transformers.Florence2ForConditionalGeneration.from_pretrained(
            str(self.weights), local_files_only=True, dtype=dtype
        )
        self.model = model.to(self.device).eval()
        self.run(np.zeros((32, 32, 3), np.uint8), "<OD>")

    def close(self) -> None:
        self.model = None
        self.processor = None

    def run(self, image: np.ndarray, prompt: str, *, class_names: tuple[str, ...] = ()) -> Florence2Result:
        """Generate for one RGB uint8 ``[H, W, 3]`` image and a task prompt."""
        if self.model is None:
            raise EngineError("Florence-2 expert is not loaded")
        task, _ = check_prompt(prompt)
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise InvalidInput(f"image: expected UINT8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
        torch = self._torch
        inputs = self.processor(text=prompt.strip(), images=arr, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        raw = self.processor.batch_decode(ids, skip_special_tokens=False)[0]
        h, w = arr.shape[:2]
        if task in DETECTION_TASKS:
            dets = parse_detections(raw, width=w, height=h, class_names=class_names)
        else:
            dets = Detections.empty(class_names)
        return Florence2Result(task, clean_text(raw), dets)
