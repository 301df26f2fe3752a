"""Build Florence-2 checkpoints with random weights, offline: tiny ones for tests and demos,
base-sized configs for latency benchmarks.

The tokenizer is trained from scratch with the ``tokenizers`` library (byte-level BPE, as
BART's) on a few sentences, then gets Florence-2's extra tokens: ``<image>``, the 1000
location tokens ``<loc_0>`` .. ``<loc_999>`` and the task tags. Nothing is downloaded.

>>> folder = build_tiny_florence2(Path("/tmp/florence2-tiny"))   # doctest: +SKIP
>>> Florence2Expert(folder).load()                               # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moesaic.models.florence2.parsing import LOC_BINS

__all__ = ["TASK_TAGS", "base_config", "build_tiny_florence2", "build_tokenizer"]

TASK_TAGS = (
    "<od>", "</od>", "<ocr>", "</ocr>", "<cap>", "</cap>", "<dcap>", "</dcap>", "<ncap>", "</ncap>",
    "<poly>", "</poly>", "<sep>", "<proposal>", "</proposal>", "<grounding>", "</grounding>", "<and>",
)  # fmt: skip

_CORPUS = (
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate vehicle in the image. Locate pedestrian in the image.",
    "A top-down view of an intersection with cars, a truck, a bus and pedestrians on the crossings.",
    "vehicle pedestrian car person bicycle road crosswalk sidewalk shadow",
)


def build_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer with Florence-2's special, location and task tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BartTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = BartTokenizer(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_tokens([f"<loc_{i}>" for i in range(LOC_BINS)] + list(TASK_TAGS))
    return fast


def _text_config(tokenizer: Any, **dims: Any) -> Any:
    from transformers import BartConfig

    return BartConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        **dims,
    )


def base_config(vocab_size: int = 51289, image_token_id: int = 51288) -> Any:
    """A ``Florence2Config`` with Florence-2-base's dimensions (DaViT + BART-base, 768 px)."""
    from transformers import BartConfig, Florence2Config
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    vision = Florence2VisionConfig(
        depths=[1, 1, 9, 1],
        embed_dim=[128, 256, 512, 1024],
        num_heads=[4, 8, 16, 32],
        num_groups=[4, 8, 16, 32],
        window_size=12,
        projection_dim=768,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=image_token_id)


def build_tiny_florence2(out: Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """Save a tiny random Florence-2 (model + processor) to ``out``; returns ``out``.

    ``image_size`` must be a multiple of 32 (the vision tower's total stride).
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    if image_size % 32:
        raise ValueError(f"image_size: expected a multiple of 32, got {image_size}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[16, 32, 32, 32],
        num_heads=[1, 2, 2, 2],
        num_groups=[1, 2, 2, 2],
        window_size=2,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    text = _text_config(
        tokenizer,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
    )
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    model = Florence2ForConditionalGeneration(config).eval()
    side = image_size // 32
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=side * side + 1,
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out
