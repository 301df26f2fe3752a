"""Detector test fixtures: a YOLO-shaped ONNX graph with a known head output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def write_yolo_head_model(
    folder: Path,
    prediction: np.ndarray,
    *,
    imgsz: int = 64,
    names: tuple[str, ...] = ("vehicle", "pedestrian"),
) -> Path:
    """``folder/model.onnx`` mapping ``images`` [1, 3, imgsz, imgsz] to ``output0`` = ``prediction``
    (+ 0 x the mean pixel, so the graph really reads its input), with ultralytics-style metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    const = numpy_helper.from_array(prediction.astype(np.float32), "head")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["head", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo_head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(prediction.shape))],
        initializer=[const, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = model.metadata_props.add()
    meta.key, meta.value = "names", repr(dict(enumerate(names)))
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def head_prediction(
    boxes_xywh: list[tuple[float, float, float, float]], scores: list[list[float]]
) -> np.ndarray:
    """``[1, 4 + nc, A]`` raw head output from per-anchor xywh and per-class scores."""
    xywh = np.array(boxes_xywh, np.float32)
    cls = np.array(scores, np.float32)
    return np.concatenate([xywh, cls], axis=1).T[None]


class YoloHead:
    """Namespace handed to tests by the ``yolo_head`` fixture."""

    write = staticmethod(write_yolo_head_model)
    prediction = staticmethod(head_prediction)


@pytest.fixture
def yolo_head() -> type[YoloHead]:
    return YoloHead
