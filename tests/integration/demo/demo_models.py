"""Tiny real ONNX experts with the node-boundary tensors of the demo's tasks (CONTRIBUTING.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_models import write_model

__all__ = ["write_demo_experts"]


def _grid_expert(root: Path, name: str, task: str, output: str, channels: int, side: int, seed: int) -> None:
    """points FP32 [N, 4] -> mean point -> linear map -> ``output`` [channels, side, side]."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(4, channels * side * side)).astype(np.float32) * 0.1
    final = "Softmax" if output == "probs" else "Sigmoid"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["points"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("MatMul", ["mean", "w"], ["flat"]),
            helper.make_node("Reshape", ["flat", "shape"], ["grid"]),
            helper.make_node(final, ["grid"], [output], **({"axis": 0} if final == "Softmax" else {})),
        ],
        name,
        [helper.make_tensor_value_info("points", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [channels, side, side])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array([channels, side, side], np.int64), "shape"),
        ],
    )
    write_model(root / name, graph, model_yaml=f"task: {task}\n")


def _detector(root: Path, name: str) -> None:
    """image UINT8 [H, W, 3] -> one box whose score follows the mean brightness."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "zero"], ["z"]),
            helper.make_node("Add", ["box", "z"], ["boxes"]),
            helper.make_node("Div", ["m", "scale"], ["s"]),
            helper.make_node("Unsqueeze", ["s", "axis0"], ["s1"]),
            helper.make_node("Sigmoid", ["s1"], ["scores"]),
            helper.make_node("Identity", ["cls"], ["class_ids"]),
        ],
        name,
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["h", "w", 3])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("class_ids", TensorProto.INT64, [1]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
            numpy_helper.from_array(np.array([[8.0, 8.0, 40.0, 30.0]], np.float32), "box"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([2], np.int64), "cls"),
        ],
    )
    write_model(root / name, graph, model_yaml="task: detection\nclass_names: [person, bicycle, vehicle]\n")


def write_demo_experts(root: Path) -> Path:
    """A repository with a segmentation, a reconstruction and a detection expert."""
    _grid_expert(root, "tiny-seg", "bev_segmentation", "probs", 5, 32, seed=0)
    _grid_expert(root, "tiny-rec", "bev_reconstruction", "bev", 1, 32, seed=1)
    _detector(root, "tiny-det")
    return root
