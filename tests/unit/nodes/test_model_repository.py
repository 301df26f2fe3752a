"""Model repository: folders with model.onnx alone, model.yaml validation, load failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesaic.nodes.repository import scan_models
from moesaic.runtime.devices import discover_device
from moesaic.runtime.engine import TensorSpec
from tests.helpers.onnx_models import write_add_model, write_batch_probe_model, write_identity_model


def test_model_onnx_alone_needs_nothing_else(tmp_path: Path) -> None:
    write_identity_model(tmp_path, "plain", [("x", "UINT8", (-1, 2, 3))])
    (tmp_path / "not-a-model").mkdir()
    (models := scan_models(tmp_path))
    assert [m.name for m in models] == ["plain"]
    model = models[0]
    assert model.state == "loading"
    model.load(discover_device("cpu"))
    assert model.ready, model.error
    assert model.inputs == (TensorSpec("x", "UINT8", (-1, 2, 3)),)
    assert model.outputs == (TensorSpec("x_out", "UINT8", (-1, 2, 3)),)
    out = model.infer({"x": np.ones((1, 2, 3), np.uint8)}, {})
    np.testing.assert_array_equal(out["x_out"], np.ones((1, 2, 3), np.uint8))
    model.close()


def test_model_yaml_fields(tmp_path: Path) -> None:
    write_add_model(
        tmp_path,
        "folder",
        model_yaml="name: adder\ntask: detection\nmax_batch_size: 4\nclass_names: [a, b]\n"
        "engine: {type: onnxruntime, intra_op_threads: 1}\n",
    )
    (model,) = scan_models(tmp_path)
    assert (model.name, model.spec.task, model.spec.max_batch_size, model.class_names) == (
        "adder",
        "detection",
        4,
        ["a", "b"],
    )
    assert model.engine_config.intra_op_threads == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("taks: detection\n", r"model.yaml: taks: Extra inputs are not permitted"),
        ("max_batch_size: -1\n", r"model.yaml: max_batch_size: .*greater than or equal to 0"),
        ("engine: {type: nope}\n", r"model.yaml: engine.type: unknown engine 'nope'"),
        (
            "engine: {type: onnxruntime, threads: 2}\n",
            r"model.yaml: engine.threads: Extra inputs are not permitted",
        ),
        ("processor: {frames: 2}\n", r"model.yaml: processor: .*needs a 'type'"),
        ("name: a/b\n", r"model.yaml: name: .*without '/'"),
        ("[1, 2]\n", r"model.yaml: expected a mapping"),
        (
            "dynamic_batching: {max_batch_size: 4, delay: 5}\n",
            r"model.yaml: dynamic_batching.delay: Extra inputs are not permitted",
        ),
        (
            "dynamic_batching: {max_batch_size: 0}\n",
            r"model.yaml: dynamic_batching.max_batch_size: .*greater than or equal to 1",
        ),
        (
            "dynamic_batching: {max_batch_size: 4, preferred_batch_sizes: [8]}\n",
            r"model.yaml: dynamic_batching: .*preferred_batch_sizes: \[8\] outside 1..max_batch_size \(4\)",
        ),
    ],
)
def test_model_yaml_errors_name_file_and_field(tmp_path: Path, text: str, match: str) -> None:
    write_add_model(tmp_path, "m", model_yaml=text)
    with pytest.raises(ValueError, match=match):
        scan_models(tmp_path)


def test_duplicate_names_fail(tmp_path: Path) -> None:
    write_add_model(tmp_path, "a", model_yaml="name: same\n")
    write_add_model(tmp_path, "b", model_yaml="name: same\n")
    with pytest.raises(ValueError, match="name: 'same' is also used by"):
        scan_models(tmp_path)


def test_broken_onnx_marks_model_failed(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not onnx")
    (model,) = scan_models(tmp_path)
    model.load(discover_device("cpu"))
    assert model.state == "failed" and "EngineError" in model.error and not model.ready


def test_dynamic_batching_loads_a_batching_model(tmp_path: Path) -> None:
    write_batch_probe_model(
        tmp_path, "probe", model_yaml="dynamic_batching: {max_batch_size: 4, max_queue_delay_us: 0}\n"
    )
    (model,) = scan_models(tmp_path)
    model.load(discover_device("cpu"))
    try:
        assert model.ready, model.error
        assert model.batcher is not None and model.batcher.config.max_batch_size == 4
        share = model.batcher.submit({"x": np.ones((2, 3), np.float32)}, timeout=10)
        np.testing.assert_array_equal(share.outputs["y"], np.full((2, 3), 3, np.float32))
    finally:
        model.close()
    assert model.batcher is None


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((-1, 4), "engine output 'total' has shape []"),  # y batches, the scalar sum cannot
        ((2, 4), "engine input 'x' has shape [2, 4]"),  # fixed first dimension
    ],
    ids=["scalar-output", "fixed-batch"],
)
def test_dynamic_batching_rejects_a_model_that_cannot_batch(
    tmp_path: Path, shape: tuple[int, ...], message: str
) -> None:
    write_add_model(tmp_path, "add", shape, model_yaml="dynamic_batching: {max_batch_size: 4}\n")
    (model,) = scan_models(tmp_path)
    model.load(discover_device("cpu"))
    assert model.state == "failed" and model.batcher is None and model.engine is None
    assert f"{tmp_path / 'add' / 'model.yaml'}: dynamic_batching: {message}" in model.error
