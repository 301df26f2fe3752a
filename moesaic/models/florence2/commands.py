"""CLI: ``moesaic florence2 run|build-tiny`` and ``moesaic train florence2-lora``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "register_train"]


def _weights(path: Path) -> Path:
    """A model folder's checkpoint (``weights/``) or the checkpoint folder itself."""
    return path / "weights" if (path / "weights" / "config.json").is_file() else path


def _run(args: argparse.Namespace) -> int:
    from moesaic.models.detector.commands import _read_rgb
    from moesaic.models.florence2.model import Florence2Expert, check_prompt

    try:
        check_prompt(args.prompt)
        image = _read_rgb(Path(args.image))
        expert = Florence2Expert(
            _weights(Path(args.model)), device=args.device, max_new_tokens=args.max_new_tokens
        )
        expert.load()
        result = expert.run(image, args.prompt)
    except ValueError as exc:
        print(f"moesaic florence2 run: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"task": result.task, "text": result.text, "detections": result.detections.to_json()}))
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    import yaml

    from moesaic.models.florence2.tiny import build_tiny_florence2

    folder = Path(args.out)
    build_tiny_florence2(folder / "weights", seed=args.seed, image_size=args.image_size)
    spec = {
        "name": folder.name,
        "task": "vlm",
        "description": "tiny random-weight Florence-2 (tests and demos; not a trained model)",
        "engine": {"type": "florence2", "weights": "weights", "max_new_tokens": 32},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"model folder: {folder}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from moesaic.models.florence2.finetune import examples_from_dataset, finetune

    try:
        examples = examples_from_dataset(Path(args.data), split=args.split, limit=args.limit)
        result = finetune(
            _weights(Path(args.model)),
            examples,
            Path(args.out),
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch,
            lora=not args.full,
            rank=args.rank,
        )
    except ValueError as exc:
        print(f"moesaic train florence2-lora: {exc}", file=sys.stderr)
        return 2
    loss = f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
    print(f"{loss} in {result.steps} steps; saved {result.folder}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``florence2 run`` and ``florence2 build-tiny``."""
    p = subparsers.add_parser("florence2", help="run or build Florence-2 vision-language models")
    sub = p.add_subparsers(dest="florence2_command", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="run one task prompt on one image")
    r.add_argument("--model", required=True, help="model folder (with weights/) or checkpoint folder")
    r.add_argument("--image", required=True)
    r.add_argument(
        "--prompt", default="<OD>", help="<OD>, <CAPTION>, <DETAILED_CAPTION>, <OPEN_VOCABULARY_DETECTION>car"
    )
    r.add_argument("--device", default="cpu")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.set_defaults(func=_run)
    b = sub.add_parser("build-tiny", help="write a tiny random-weight Florence-2 model folder (offline)")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--image-size", type=int, default=64)
    b.set_defaults(func=_build_tiny)


def register_train(train_subparsers: Any) -> None:
    """Add ``train florence2-lora``."""
    t = train_subparsers.add_parser(
        "florence2-lora", help="fine-tune Florence-2 <OD> on a YOLO dataset (peft LoRA)"
    )
    t.add_argument("--model", required=True, help="model folder (with weights/) or checkpoint folder")
    t.add_argument("--data", required=True, help="YOLO/Constellation dataset folder or data YAML")
    t.add_argument("--out", required=True, help="output checkpoint folder (adapters merged)")
    t.add_argument("--split", default="train")
    t.add_argument("--limit", type=int, default=0, help="use at most this many images (0 = all)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--rank", type=int, default=8, help="LoRA rank")
    t.add_argument("--full", action="store_true", help="train all weights instead of LoRA adapters")
    t.set_defaults(func=_train)
