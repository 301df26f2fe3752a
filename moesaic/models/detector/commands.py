"""CLI: ``moesaic detect``, ``moesaic generate-images`` and ``moesaic train detector``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "register_train"]


def _read_rgb(path: Path) -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"image: no such file {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, ImportError):  # ImportError: ultralytics' patched open
        raise ValueError(f"image: {path} is not an image file") from None


SYNTHETIC_NOTE = (
    "note: {name} was trained on generated (synthetic) images only; expect poor accuracy on real "
    "camera frames. Bring your own weights: moesaic import-model best.pt --repo models --name my-yolo"
)


def _model_facts(path: Path) -> tuple[str, bool]:
    """Name and ``synthetic`` flag of a model folder (files: their name, False)."""
    if not path.is_dir():
        return path.stem, False
    from moesaic.models.detector.detector import model_folder_spec

    try:
        spec, _ = model_folder_spec(path)
    except (OSError, ValueError):
        return path.name, False
    return str(spec.get("name") or path.name), bool(spec.get("synthetic"))


def _detect(args: argparse.Namespace) -> int:
    from moesaic.models.detector.detector import load_detector
    from moesaic.models.detector.slicing import sliced_detect

    try:
        image = _read_rgb(Path(args.image))
        detector = load_detector(Path(args.model), imgsz=args.imgsz, conf=args.conf, iou=args.iou)
    except ValueError as exc:
        print(f"moesaic detect: {exc}", file=sys.stderr)
        return 2
    name, synthetic = _model_facts(Path(args.model))
    with detector:
        if args.slice:
            dets = sliced_detect(
                detector.detect, image, args.slice, overlap=args.overlap, method=args.merge, full_frame=True
            )
        else:
            dets = detector.detect(image)
    note = SYNTHETIC_NOTE.format(name=name) if synthetic else ""
    if args.out:
        try:
            written = _write_result(Path(args.out), Path(args.image), image, dets, name, note)
        except OSError as exc:
            print(f"moesaic detect: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(dets.to_json()))
    else:
        print(f"{len(dets)} detections in {args.image} ({image.shape[1]}x{image.shape[0]}) by {name}")
        for d in dets.to_json():
            x1, y1, x2, y2 = d["xyxy"]
            print(f"  {d['class_name']:<12} {d['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    if args.out:
        print(f"wrote {written[0]} and {written[1]}", file=sys.stderr if args.json else sys.stdout)
    if note:
        print(note, file=sys.stderr)
    return 0


def _write_result(out: Path, source: Path, image: Any, dets: Any, model: str, note: str) -> tuple[Path, Path]:
    """``out/<image stem>.jpg`` (annotated) and ``out/<image stem>.json``; ``out`` is created."""
    from moesaic.models.annotate import annotate

    out.mkdir(parents=True, exist_ok=True)
    picture, record = out / f"{source.stem}.jpg", out / f"{source.stem}.json"
    annotate(image, dets).save(picture, format="JPEG", quality=90)
    body = {
        "image": str(source),
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "model": model,
        "synthetic": bool(note),
        "detections": dets.to_json(),
    }
    if note:
        body["note"] = note
    record.write_text(json.dumps(body, indent=2) + "\n")
    return picture, record


def _generate(args: argparse.Namespace) -> int:
    from moesaic.datasets.intersection import generate_dataset

    try:
        data = generate_dataset(
            Path(args.out),
            count=args.count,
            size=args.size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            object_scale=args.object_scale,
        )
    except ValueError as exc:
        print(f"moesaic generate-images: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.count} images; data YAML: {data}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from moesaic.datasets.intersection import CLASS_NAMES
    from moesaic.models.detector.training import export_model_folder, train_detector

    data = Path(args.data)
    if data.is_dir():
        data = data / "data.yaml"
    from moesaic.runtime.progress import TrainingProgress

    try:
        with TrainingProgress("train detector", total=1) as bar:

            def progress(done: int, total: int, note: str) -> None:
                bar.total = total
                bar.advance(done - bar.done, note=note)

            weights = train_detector(
                data,
                model=args.model,
                imgsz=args.imgsz,
                epochs=args.epochs,
                batch=args.batch,
                device=args.device,
                out=Path(args.runs),
                seed=args.seed,
                on_progress=progress,
            )
    except ValueError as exc:
        print(f"moesaic train detector: {exc}", file=sys.stderr)
        return 2
    print(f"best weights: {weights}")
    if args.export:
        names = tuple(args.class_names.split(",")) if args.class_names else CLASS_NAMES
        folder = export_model_folder(weights, Path(args.export), imgsz=args.imgsz, class_names=names)
        print(f"model folder: {folder}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``detect`` and ``generate-images``."""
    p = subparsers.add_parser(
        "detect", help="detect objects in an image with a YOLO model (.pt/.onnx/.engine/folder)"
    )
    p.add_argument("--model", required=True, help="model folder, .pt, .onnx, .engine or .plan")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--imgsz", type=int, default=None, help="model input size (default: the model's)")
    p.add_argument("--conf", type=float, default=None, help="minimum score (default: the model's, else 0.25)")
    p.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (default 0.7)")
    p.add_argument(
        "--slice", type=int, default=0, metavar="TILE", help="sliced inference with TILE-pixel tiles"
    )
    p.add_argument("--overlap", type=float, default=0.2, help="tile overlap fraction (default 0.2)")
    p.add_argument(
        "--merge", choices=("nms", "wbf"), default="nms", help="how tiles are merged (default nms)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of detections")
    p.add_argument(
        "--out", help="folder to write <image>.jpg (boxes drawn) and <image>.json (detections) into"
    )
    p.set_defaults(func=_detect)

    g = subparsers.add_parser(
        "generate-images", help="write synthetic intersection images with YOLO + COCO labels"
    )
    g.add_argument("--out", required=True, help="output folder (images/, labels/, annotations/, data.yaml)")
    g.add_argument("--count", type=int, default=200, help="number of images (default 200)")
    g.add_argument("--size", type=int, default=640, help="image size in pixels (default 640)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of images in the val split")
    g.add_argument("--object-scale", type=float, default=1.0, help="object size multiplier (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)


def register_train(train_subparsers: Any) -> None:
    """Add ``train detector``."""
    t = train_subparsers.add_parser(
        "detector", help="train a YOLO detector from its yaml (no pretrained weights)"
    )
    t.add_argument("--data", required=True, help="dataset folder or data YAML (YOLO / Constellation layout)")
    t.add_argument(
        "--model", default="yolov8n.yaml", help="architecture yaml, e.g. yolov8n.yaml or yolov8s.yaml"
    )
    t.add_argument("--imgsz", type=int, default=416)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--device", default="cpu", help="cpu, 0, 0,1 ... (default cpu)")
    t.add_argument("--runs", default="runs/detector", help="training output folder")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--export", default="", help="also export a model folder here (model.onnx + model.yaml)")
    t.add_argument("--class-names", default="", help="comma-separated class names for the model folder")
    t.set_defaults(func=_train)
