"""Tiny real ONNX experts with the node-boundary tensors of the demo's tasks (CONTRIBUTING.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_models import write_model, write_toy_detector

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


def write_demo_experts(root: Path) -> Path:
    """A repository with a segmentation, a reconstruction and a detection expert."""
    _grid_expert(root, "tiny-seg", "bev_segmentation", "probs", 5, 32, seed=0)
    _grid_expert(root, "tiny-rec", "bev_reconstruction", "bev", 1, 32, seed=1)
    write_toy_detector(root, "tiny-det")
    return root
