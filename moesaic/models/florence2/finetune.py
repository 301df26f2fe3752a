"""Fine-tune Florence-2 for ``<OD>`` on a YOLO/Constellation dataset, with LoRA (peft) or fully.

Each image's ground truth becomes Florence-2's answer text, ``label<loc_x1><loc_y1><loc_x2><loc_y2>...``
(boxes in 1000 bins), and the model learns it with teacher forcing::

    moesaic train florence2-lora --model models/florence2/weights --data data/intersection \\
        --out runs/florence2-lora --steps 200

With ``lora`` the adapters (attention and MLP projections of the language model) are merged
back into the weights at the end, so the saved folder loads with plain transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.models.florence2.parsing import quantize
from moesaic.runtime.detections import Detections

__all__ = ["FinetuneResult", "TrainingExample", "answer_text", "examples_from_dataset", "finetune"]

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class TrainingExample:
    """One image, its task prompt and the answer text the model should generate."""

    image: np.ndarray
    prompt: str
    answer: str


@dataclass(frozen=True)
class FinetuneResult:
    folder: Path
    first_loss: float
    last_loss: float
    steps: int


def answer_text(dets: Detections, width: int, height: int) -> str:
    """Florence-2's ``<OD>`` answer for ground-truth boxes, grouped by label in box order."""
    bins = quantize(dets.boxes, width, height)
    return "".join(dets.name_of(i) + "".join(f"<loc_{int(v)}>" for v in bins[i]) for i in range(len(dets)))


def examples_from_dataset(data: Path, *, split: str = "train", limit: int = 0) -> list[TrainingExample]:
    """``<OD>`` examples from a YOLO-layout dataset (data YAML or its folder)."""
    from moesaic.datasets.constellation import YoloDataset

    ds = YoloDataset.open(data)
    out = []
    for sample in ds.samples(split):
        image = sample.load_image()
        h, w = image.shape[:2]
        out.append(TrainingExample(image, "<OD>", answer_text(sample.load_detections(), w, h)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"data: split {split!r} of {data} has no images")
    return out


def _batch(processor: Any, examples: Sequence[TrainingExample]) -> dict[str, Any]:
    import torch

    inputs = processor(
        text=[e.prompt for e in examples],
        images=[e.image for e in examples],
        return_tensors="pt",
        padding=True,
    )
    tok = processor.tokenizer
    ids = [
        [tok.bos_token_id, *tok.encode(e.answer, add_special_tokens=False), tok.eos_token_id]
        for e in examples
    ]
    longest = max(len(i) for i in ids)
    labels = torch.full((len(ids), longest), -100, dtype=torch.long)
    for row, seq in enumerate(ids):
        labels[row, : len(seq)] = torch.tensor(seq)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"], "labels": labels}  # fmt: skip


def finetune(
    weights: Path,
    examples: Sequence[TrainingExample],
    out: Path,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 2,
    lora: bool = True,
    rank: int = 8,
    seed: int = 0,
) -> FinetuneResult:
    """Train on ``examples`` for ``steps`` AdamW steps and save a loadable checkpoint to ``out``."""
    import torch
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    if not examples:
        raise ValueError("examples: need at least one training example")
    torch.manual_seed(seed)
    processor = Florence2Processor.from_pretrained(str(weights), local_files_only=True)
    model: Any = Florence2ForConditionalGeneration.from_pretrained(str(weights), local_files_only=True)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = [n for n in LORA_TARGETS if any(name.endswith(n) for name, _ in model.named_modules())]
        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for step in range(steps):
        pick = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        loss = model(**_batch(processor, [examples[i] for i in pick])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            log.info("florence2 finetune step %d: loss %.4f", step, losses[-1])
    if lora:
        model = model.merge_and_unload()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return FinetuneResult(out, losses[0], float(np.mean(losses[-5:])), steps)
