"""Load a YOLO detector from a local path and run it on RGB images.

:func:`load_detector` accepts

- a model folder (``model.yaml`` with ``processor: {type: yolo}`` and its engine),
- an ultralytics checkpoint ``.pt`` (run by ultralytics' own predictor, offline),
- an exported ``.onnx`` (ONNX Runtime through the engine registry, numpy pre/post-processing),
- a TensorRT ``.engine`` (ultralytics' export, with its JSON metadata header) or ``.plan``
  (the TensorRT engine of ``moesaic.runtime.tensorrt_engine``, numpy pre/post-processing).

>>> detector = load_detector(Path("models/yolo-n"))            # doctest: +SKIP
>>> detector.detect(rgb_image).to_json()[:1]                   # doctest: +SKIP
[{'xyxy': [...], 'score': 0.91, 'class_id': 0, 'class_name': 'vehicle'}]
"""

from __future__ import annotations

import ast
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moesaic.models.detector.serving import YoloProcessor, check_image
from moesaic.runtime.detections import Detections
from moesaic.runtime.engine import Engine, MissingExtraError, create_engine

__all__ = [
    "Detector",
    "EngineDetector",
    "UltralyticsDetector",
    "load_detector",
    "model_folder_spec",
    "onnx_metadata",
]


class Detector(ABC):
    """A loaded detector: :meth:`detect` an RGB uint8 ``[H, W, 3]`` image, then :meth:`close`."""

    class_names: tuple[str, ...]

    @abstractmethod
    def detect(self, image: np.ndarray, *, conf: float | None = None, iou: float | None = None) -> Detections:
        """Detections in ``image`` pixels."""

    @abstractmethod
    def close(self) -> None:
        """Release the model."""

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineDetector(Detector):
    """Any engine whose graph is a YOLO head, wrapped by the ``yolo`` processor."""

    def __init__(self, engine: Engine, processor: YoloProcessor) -> None:
        self.engine = engine
        self.processor = processor
        if not engine.ready:
            engine.load()
        processor.inputs(engine.describe().inputs)
        self.class_names = tuple(processor.class_names())

    def detect(self, image: np.ndarray, *, conf: float | None = None, iou: float | None = None) -> Detections:
        params = {k: v for k, v in (("conf", conf), ("iou", iou)) if v is not None}
        tensors, context = self.processor.preprocess({"image": image}, params)
        outputs = self.processor.postprocess(self.engine.infer(tensors), context)
        return self.processor.to_detections(outputs)

    def close(self) -> None:
        self.engine.close()


class UltralyticsDetector(Detector):
    """An ultralytics ``.pt`` checkpoint run by ultralytics' predictor (offline)."""

    def __init__(
        self, weights: Path, *, imgsz: int = 640, conf: float = 0.25, iou: float = 0.7, device: str = "cpu"
    ) -> None:
        from moesaic.models.detector.offline import import_ultralytics

        ultralytics = import_ultralytics()
        if not weights.is_file():
            raise ValueError(f"model: no such checkpoint {weights} (names are never downloaded)")
        self.model: Any = ultralytics.YOLO(str(weights), task="detect")
        self.imgsz, self.conf, self.iou, self.device = imgsz, conf, iou, device
        names = self.model.names
        self.class_names = tuple(names[i] for i in sorted(names))

    def detect(self, image: np.ndarray, *, conf: float | None = None, iou: float | None = None) -> Detections:
        rgb = check_image(image)
        result = self.model.predict(
            np.ascontiguousarray(rgb[..., ::-1]),  # ultralytics takes numpy images as BGR
            imgsz=self.imgsz,
            conf=self.conf if conf is None else conf,
            iou=self.iou if iou is None else iou,
            device=self.device,
            verbose=False,
        )[0]
        b = result.boxes
        return Detections(
            b.xyxy.cpu().numpy(), b.conf.cpu().numpy(), b.cls.cpu().numpy().astype(np.int64), self.class_names
        )

    def close(self) -> None:
        self.model = None


def onnx_metadata(path: Path) -> dict[str, Any]:
    """ultralytics' export metadata (``names``, ``imgsz``, ...) stored in an ONNX file, if any."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "vision") from None

    model = onnx.load(str(path), load_external_data=False)
    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            meta[prop.key] = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            meta[prop.key] = prop.value
    return meta


def _names_list(names: Any) -> list[str]:
    if isinstance(names, dict):  # JSON metadata turns the integer ids into strings
        return [str(names[k]) for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 0)]
    return [str(n) for n in names or ()]


def _strip_engine_header(path: Path) -> tuple[Path, dict[str, Any]]:
    """Split an ultralytics ``.engine`` (4-byte length + JSON metadata + plan) into a plan file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:4], "little")
    meta: dict[str, Any] = {}
    if 0 < n < len(data) - 4:
        try:
            meta = json.loads(data[4 : 4 + n].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    if not meta:
        return path, {}
    plan = path.with_suffix(".plan")
    if not plan.is_file() or plan.stat().st_mtime < path.stat().st_mtime:
        plan.write_bytes(data[4 + n :])
    return plan, meta


def model_folder_spec(folder: Path) -> tuple[dict[str, Any], Path]:
    """A model folder's model.yaml and the folder holding the files of its highest version:
    the highest numbered sub-folder (its own model.yaml's keys on top), else the folder itself
    (the node's repository layout; ``moesaic.nodes.versions`` has the serving policies)."""
    spec = yaml.safe_load((folder / "model.yaml").read_text()) if (folder / "model.yaml").is_file() else {}
    spec = spec if isinstance(spec, dict) else {}
    numbered = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= 1]
    if not numbered:
        return spec, folder
    files = folder / str(max(numbered))
    own = yaml.safe_load((files / "model.yaml").read_text()) if (files / "model.yaml").is_file() else {}
    return {**spec, **(own if isinstance(own, dict) else {})}, files


def load_detector(
    path: Path,
    *,
    imgsz: int | None = None,
    conf: float | None = None,
    iou: float | None = None,
    class_names: list[str] | None = None,
    device: str = "cpu",
) -> Detector:
    """Load the detector at ``path`` (model folder, ``.pt``, ``.onnx``, ``.engine`` or ``.plan``)."""
    path = Path(path)
    overrides: dict[str, Any] = {
        k: v for k, v in (("imgsz", imgsz), ("conf", conf), ("iou", iou), ("class_names", class_names)) if v
    }
    if path.is_dir():
        spec_file = path / "model.yaml"
        if not spec_file.is_file():
            raise ValueError(f"model: {path} is a folder without model.yaml")
        spec, files = model_folder_spec(path)
        proc = dict(spec.get("processor") or {})
        if proc.pop("type", None) != "yolo":
            raise ValueError(f"model: {spec_file} does not declare processor type 'yolo'")
        engine = create_engine(spec.get("engine") or {"type": "onnxruntime"}, files)
        return EngineDetector(engine, YoloProcessor({**proc, **overrides}, files))
    if not path.is_file():
        raise ValueError(f"model: no such file or folder {path}")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return UltralyticsDetector(
            path,
            imgsz=imgsz or 640,
            conf=0.25 if conf is None else conf,
            iou=0.7 if iou is None else iou,
            device=device,
        )
    if suffix == ".onnx":
        meta = onnx_metadata(path)
        options = {"class_names": _names_list(meta.get("names")), **overrides}
        engine = create_engine({"type": "onnxruntime", "file": path.name}, path.parent)
        return EngineDetector(engine, YoloProcessor(options, path.parent))
    if suffix in (".engine", ".plan"):
        plan, meta = _strip_engine_header(path) if suffix == ".engine" else (path, {})
        options = {"class_names": _names_list(meta.get("names")), **overrides}
        engine = create_engine(
            {"type": "tensorrt", "plan": plan.name, "onnx": None, "build": "never"}, plan.parent
        )
        return EngineDetector(engine, YoloProcessor(options, plan.parent))
    raise ValueError(
        f"model: unsupported file type {suffix!r}; expected a folder, .pt, .onnx, .engine or .plan"
    )
