"""Train a YOLO detector from its architecture yaml (no pretrained weights) and ship it.

``moesaic train detector`` calls :func:`train_detector` then :func:`export_model_folder`::

    weights = train_detector(Path("data/intersection/data.yaml"), model="yolov8n.yaml",
                             imgsz=416, epochs=12, out=Path("runs/yolo-n"))
    export_model_folder(weights, Path("models/yolo-n"), imgsz=416)

Everything stays offline: the model is built from the yaml that ships inside ultralytics
(``pretrained=False``, so nothing is downloaded), AMP is off on CPU (ultralytics' AMP check
downloads a checkpoint), plots are off (they need a font), and ONNX export uses the
pre-installed ``onnxslim`` with auto-install disabled.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from moesaic.models.detector.offline import import_ultralytics

__all__ = ["export_model_folder", "train_detector"]


def _check_arch(model: str) -> None:
    if not model.endswith((".yaml", ".yml")):
        raise ValueError(
            f"model: expected an architecture yaml such as yolov8n.yaml (training never starts from a "
            f"downloadable checkpoint name), got {model!r}"
        )


def train_detector(
    data: Path,
    *,
    model: str = "yolov8n.yaml",
    imgsz: int = 416,
    epochs: int = 10,
    batch: int = 16,
    device: str = "cpu",
    out: Path = Path("runs/detector"),
    workers: int = 0,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Train from scratch on a YOLO ``data.yaml``; returns the best weights (``best.pt``).

    ``on_progress(batches_done, batches_total, note)`` is called after every training batch
    (``note``: the epoch and its mean loss so far).
    """
    _check_arch(model)
    if not Path(data).is_file():
        raise ValueError(f"data: no data yaml at {data}")
    ultralytics = import_ultralytics()
    yolo = ultralytics.YOLO(model, task="detect")
    out = Path(out).resolve()
    args: dict[str, Any] = {
        "data": str(Path(data).resolve()),
        "imgsz": imgsz,
        "epochs": epochs,
        "batch": batch,
        "device": device,
        "workers": workers,
        "seed": seed,
        "pretrained": False,
        "amp": device != "cpu",
        "plots": False,
        "project": str(out.parent),
        "name": out.name,
        "exist_ok": True,
        "verbose": False,
    }
    args.update(extra or {})
    if on_progress is not None:
        yolo.add_callback("on_train_batch_end", _batch_reporter(on_progress))
    yolo.train(**args)
    best = out / "weights" / "best.pt"
    if not best.is_file():
        raise RuntimeError(f"training finished without {best}")
    return best


def _batch_reporter(on_progress: Callable[[int, int, str], None]) -> Callable[[Any], None]:
    """An ultralytics ``on_train_batch_end`` callback feeding ``on_progress``."""
    state = {"done": 0}

    def report(trainer: Any) -> None:
        state["done"] += 1
        batches = max(len(getattr(trainer, "train_loader", None) or ()), 1)
        total = max(int(trainer.epochs) * batches, state["done"])
        loss = getattr(trainer, "tloss", None)  # running mean per loss term (a dict, or a tensor)
        terms = loss.values() if isinstance(loss, dict) else [] if loss is None else [loss]
        try:
            mean = (
                sum(float(t.sum()) if hasattr(t, "sum") else float(t) for t in terms)
                if terms
                else float("nan")
            )
        except (TypeError, ValueError):
            mean = float("nan")
        on_progress(
            state["done"], total, f"epoch {int(trainer.epoch) + 1}/{int(trainer.epochs)} loss {mean:.3f}"
        )

    return report


def export_model_folder(
    weights: Path,
    folder: Path,
    *,
    imgsz: int,
    class_names: tuple[str, ...] | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
    description: str = "",
) -> Path:
    """Export ``weights`` to ONNX and write a model folder (``model.onnx`` + ``model.yaml``)."""
    ultralytics = import_ultralytics()
    yolo = ultralytics.YOLO(str(weights), task="detect")
    names = tuple(class_names or (yolo.names[i] for i in sorted(yolo.names)))
    onnx_path = Path(yolo.export(format="onnx", imgsz=imgsz, simplify=True, dynamic=False, opset=17))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "model.onnx")
    spec = {
        "name": folder.name,
        "task": "detection",
        "description": description or f"YOLO detector trained by moesaic ({Path(weights).name}, {imgsz} px)",
        "engine": {"type": "onnxruntime"},
        "processor": {"type": "yolo", "imgsz": imgsz, "conf": conf, "iou": iou, "class_names": list(names)},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder
