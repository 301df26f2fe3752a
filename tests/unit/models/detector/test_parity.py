"""The numpy pre/post-processing of the ONNX path gives ultralytics' own boxes.

Same weights, same image: moesaic's ONNX path (numpy letterbox, ONNX Runtime, numpy decode
and NMS) against ultralytics' predictor, on the photos ultralytics ships (bus.jpg,
zidane.jpg), the KITTI and nuScenes camera frames in ``shared/data/real`` and a generated
intersection frame. Every clear detection (score >= conf + margin) of either side must have a
partner on the other side with IoU >= 0.99 and the same class. Boxes within ``margin`` of the
threshold may flip sides of it from a one-grey-level resize difference, so they need no partner.

The reference runs ultralytics on the shipped ``models/yolo-n/model.onnx``; set
``MOESAIC_PARITY_PT`` to the ``.pt`` it was exported from to compare with PyTorch weights too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moesaic.datasets.intersection import render_scene
from moesaic.models.detector.detector import load_detector
from moesaic.models.detector.offline import import_ultralytics
from moesaic.runtime.detections import Detections
from tests.helpers.real_data import REAL_DATA

# Not importorskip: importing ultralytics before import_ultralytics() configured it would
# let it probe DNS (its is_online check), which the offline test below would catch.
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[4]
MODEL = REPO / "models" / "yolo-n" / "model.onnx"
REAL = REAL_DATA
CONF, MARGIN = 0.05, 0.03


def _images() -> list[tuple[str, np.ndarray]]:
    ultralytics = import_ultralytics()
    assets = Path(ultralytics.__file__).parent / "assets"
    paths = [
        assets / "bus.jpg",
        assets / "zidane.jpg",
        REAL / "kitti_000008.png",
        REAL / "nuscenes_cam_front.jpg",
    ]
    out = [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in paths if p.is_file()]
    out.append(("generated", render_scene(np.random.default_rng(7), size=640).image))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def _unmatched(ours: Detections, ref: Detections) -> list[str]:
    problems = []
    for name, a, b in (("moesaic", ours, ref), ("ultralytics", ref, ours)):
        clear = np.flatnonzero(a.scores >= CONF + MARGIN)
        if not len(clear):
            continue
        if not len(b):
            problems.append(f"{name}: {len(clear)} clear boxes, other side none")
            continue
        iou = _iou(a.boxes[clear], b.boxes)
        for row, i in enumerate(clear):
            j = int(iou[row].argmax())
            if iou[row, j] < 0.99 or a.class_ids[i] != b.class_ids[j]:
                problems.append(
                    f"{name} box {a.boxes[i].round(1)} s={a.scores[i]:.3f}: best IoU {iou[row, j]:.4f}"
                )
    return problems


def _reference(model: object, image: np.ndarray, imgsz: int) -> Detections:
    r = model.predict(
        np.ascontiguousarray(image[..., ::-1]), imgsz=imgsz, conf=CONF, rect=False, verbose=False
    )[0]  # type: ignore[attr-defined]
    b = r.boxes
    return Detections(b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy().astype(np.int64))


@pytest.mark.skipif(not MODEL.is_file(), reason="models/yolo-n/model.onnx not present")
@pytest.mark.parametrize("reference", ["onnx", "pt"])
def test_onnx_path_matches_ultralytics_predictor(reference: str) -> None:
    ultralytics = import_ultralytics()
    if reference == "pt":
        pt = os.environ.get("MOESAIC_PARITY_PT", "")
        if not pt or not Path(pt).is_file():
            pytest.skip("set MOESAIC_PARITY_PT to the .pt the shipped ONNX came from")
        ref_model = ultralytics.YOLO(pt, task="detect")
    else:
        ref_model = ultralytics.YOLO(str(MODEL), task="detect")
    ours = load_detector(MODEL, conf=CONF)
    imgsz = ours.processor.imgsz  # type: ignore[attr-defined]
    clear, problems = 0, []
    for name, image in _images():
        mine = ours.detect(image)
        ref = _reference(ref_model, image, imgsz)
        clear += int((ref.scores >= CONF + MARGIN).sum())
        problems += [f"{name}: {p}" for p in _unmatched(mine, ref)]
    assert not problems, "\n".join(problems)
    assert clear >= 5, f"only {clear} clear detections: the comparison would say little"
