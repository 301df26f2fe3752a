"""ONNX Runtime engine: graph-derived specs, warm-up, errors, string tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moesaic.runtime.engine import (
    EngineError,
    MissingExtraError,
    TensorSpec,
    create_engine,
    engine_types,
    parse_engine_config,
)
from moesaic.runtime.onnxruntime_engine import OnnxRuntimeConfig, OnnxRuntimeEngine
from tests.helpers.onnx_models import write_add_model, write_identity_model

CPU = {"type": "onnxruntime", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}


def test_registered_and_defaults() -> None:
    assert "onnxruntime" in engine_types()
    config = parse_engine_config({})
    assert isinstance(config, OnnxRuntimeConfig)
    assert config.file == "model.onnx" and config.providers is None and config.io_binding


def test_specs_from_graph_and_infer(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    engine = create_engine(CPU, folder)
    assert isinstance(engine, OnnxRuntimeEngine) and not engine.ready
    with engine:
        assert engine.ready
        desc = engine.describe()
        assert desc.backend == "onnxruntime" and desc.device == "cpu"
        assert desc.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
        assert desc.outputs == (TensorSpec("y", "FP32", (-1, 4)), TensorSpec("total", "FP32", ()))
        assert "CPUExecutionProvider" in desc.details["providers"]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        out = engine.infer({"x": x})
        np.testing.assert_array_equal(out["y"], x + 1)
        assert float(out["total"]) == 28.0
    assert not engine.ready


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES"])
def test_identity_datatypes(tmp_path: Path, datatype: str) -> None:
    folder = write_identity_model(tmp_path, "echo", [("x", datatype, (-1,))])
    with create_engine(CPU, folder) as engine:
        if datatype == "BYTES":
            out = engine.infer({"x": np.array([b"ab", b"c"], dtype=object)})
            assert list(out["x_out"]) == ["ab", "c"]
        else:
            x = np.array(
                [1, 0, 1],
                dtype=np.dtype(
                    {"FP32": "f4", "FP16": "f2", "INT64": "i8", "INT32": "i4", "UINT8": "u1", "BOOL": "?"}[
                        datatype
                    ]
                ),
            )
            np.testing.assert_array_equal(engine.infer({"x": x})["x_out"], x)


def test_reads_read_only_views_in_place(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add")
    data = np.ones((2, 4), np.float32).tobytes()
    x = np.frombuffer(data, np.float32).reshape(2, 4)
    with create_engine(CPU, folder) as engine:
        np.testing.assert_array_equal(engine.infer({"x": x})["y"], np.full((2, 4), 2, np.float32))


def test_bad_shape_is_value_error(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    with create_engine(CPU, folder) as engine, pytest.raises(ValueError, match="add"):
        engine.infer({"x": np.ones((2, 5), np.float32)})


def test_missing_file_and_provider(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no such ONNX file"):
        create_engine(CPU, tmp_path).load()
    folder = write_add_model(tmp_path, "add")
    with pytest.raises(EngineError, match="NopeExecutionProvider"):
        create_engine({"type": "onnxruntime", "providers": ["NopeExecutionProvider"]}, folder).load()


def test_unknown_option_fails() -> None:
    with pytest.raises(ValueError, match=r"engine\.thread: Extra inputs"):
        parse_engine_config({"type": "onnxruntime", "thread": 1})


def test_without_onnx_runtime_the_error_names_both_runtime_extras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_add_model(tmp_path, "add")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(MissingExtraError, match=r"moesaic\[cpu\]' or pip install 'moesaic\[gpu\]'"):
        create_engine(CPU, folder).load()


def test_cuda_graph_and_tensorrt_options_parse_and_cpu_ignores_them(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add", shape=(-1, 4))
    config = {**CPU, "cuda_graph": True, "tensorrt_fp16": False, "tensorrt_cache": str(tmp_path / "c")}
    with create_engine(config, folder) as engine:
        details = engine.describe().details
        assert details["io_binding"] == "false" and details["cuda_graph"] == "false"
        x = np.ones((3, 4), np.float32)
        np.testing.assert_array_equal(engine.infer({"x": x})["y"], x + 1)
