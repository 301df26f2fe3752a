"""Small ONNX models built with ``onnx.helper`` into model folders, for tests and benchmarks.

>>> folder = write_identity_model(tmp_path / "models", "echo", [("x", "FP32", (-1, 4))])  # doctest: +SKIP

Each input ``NAME`` gets an output ``NAME_out`` (Identity), so a test can check that every
datatype travels both ways unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "ONNX_TYPES",
    "write_add_model",
    "write_batch_probe_model",
    "write_gather_model",
    "write_identity_model",
    "write_matmul_model",
    "write_model",
]

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

Spec = tuple[str, str, Sequence[int]]  # name, KServe datatype, shape (-1 = dynamic)


def _dims(shape: Sequence[int]) -> list[int | str]:
    return [d if d >= 0 else f"d{i}" for i, d in enumerate(shape)]


def write_model(folder: Path, graph: onnx.GraphProto, *, model_yaml: str | None = None) -> Path:
    """Write ``graph`` as ``folder/model.onnx`` (opset 17, IR 8) and optional ``model.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    if model_yaml is not None:
        (folder / "model.yaml").write_text(model_yaml)
    return folder


def write_identity_model(
    root: Path, name: str, inputs: Sequence[Spec], *, model_yaml: str | None = None
) -> Path:
    """Folder ``root/name`` whose model returns each input ``X`` unchanged as ``X_out``."""
    nodes, ins, outs = [], [], []
    for tensor, datatype, shape in inputs:
        ins.append(helper.make_tensor_value_info(tensor, ONNX_TYPES[datatype], _dims(shape)))
        outs.append(helper.make_tensor_value_info(f"{tensor}_out", ONNX_TYPES[datatype], _dims(shape)))
        nodes.append(helper.make_node("Identity", [tensor], [f"{tensor}_out"]))
    return write_model(root / name, helper.make_graph(nodes, name, ins, outs), model_yaml=model_yaml)


def write_add_model(
    root: Path, name: str, shape: Sequence[int] = (-1, 4), *, model_yaml: str | None = None
) -> Path:
    """Folder ``root/name``: FP32 ``y = x + 1`` and ``total = ReduceSum(x)`` (two outputs)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "one"], ["y"]),
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, _dims(shape))],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, _dims(shape)),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        ],
        initializer=[one],
    )
    return write_model(root / name, graph, model_yaml=model_yaml)


def write_matmul_model(
    root: Path,
    name: str,
    *,
    width: int = 256,
    layers: int = 4,
    relu: bool = False,
    model_yaml: str | None = None,
) -> Path:
    """Folder ``root/name``: FP32 ``x [N, width]`` through ``layers`` fixed matrices (each followed
    by a Relu with ``relu``) -> ``y``.

    A model whose run time is mostly compute (a few ms for 64 rows on one core), for energy
    and queueing tests where the request path's own overhead must not dominate.
    """
    rng = np.random.default_rng(0)
    weights, nodes, previous = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        if relu:
            nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        else:
            nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        initializer=weights,
    )
    return write_model(root / name, graph, model_yaml=model_yaml)


def write_batch_probe_model(root: Path, name: str, *, model_yaml: str | None = None) -> Path:
    """Folder ``root/name``: FP32 ``x [N, F]`` -> ``y = 2x + 1`` and INT64 ``rows [N]``.

    Every element of ``rows`` is N, the first dimension the engine was called with, so a
    reply reveals how many rows its request was batched with.
    """
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "one"], ["y"]),
            helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
            helper.make_node("Expand", ["n", "n"], ["rows"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "f"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "f"]),
            helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"]),
        ],
        initializer=[two, one],
    )
    return write_model(root / name, graph, model_yaml=model_yaml)


def write_gather_model(root: Path, name: str, *, model_yaml: str | None = None) -> Path:
    """Folder ``root/name``: INT64 ``idx [N]`` -> FP32 ``row [N, 2]`` = rows 0..3 of a table.

    An index outside 0..3 makes ONNX Runtime fail the call, whatever else is in the batch.
    """
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], [0, 1, 10, 11, 20, 21, 30, 31])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0)],
        name,
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["n", 2])],
        initializer=[table],
    )
    return write_model(root / name, graph, model_yaml=model_yaml)


def write_toy_detector(root: Path, name: str) -> None:
    """image UINT8 [H, W, 3] -> boxes [[0, 0, 10, 10]], scores [mean/255], class_ids [0]."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f"], ["m"], keepdims=0),
            helper.make_node("Div", ["m", "k255"], ["s"]),
            helper.make_node("Reshape", ["s", "one_shape"], ["scores"]),
            helper.make_node("Identity", ["box"], ["boxes"]),
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
            numpy_helper.from_array(np.array(255.0, np.float32), "k255"),
            numpy_helper.from_array(np.array([1], np.int64), "one_shape"),
            numpy_helper.from_array(np.array([[0, 0, 10, 10]], np.float32), "box"),
            numpy_helper.from_array(np.array([0], np.int64), "cls"),
        ],
    )
    write_model(root / name, graph, model_yaml="task: detection\nclass_names: [thing]\n")


def write_offset_model(folder: Path, offset: float, *, model_yaml: str | None = None) -> Path:
    """``folder/model.onnx``: FP32 ``y = x + offset`` over ``x`` [-1, 4] (a model version whose
    replies tell which version answered)."""
    constant = helper.make_tensor("offset", TensorProto.FLOAT, [], [offset])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offset"], ["y"])],
        "offset",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[constant],
    )
    return write_model(folder, graph, model_yaml=model_yaml)
