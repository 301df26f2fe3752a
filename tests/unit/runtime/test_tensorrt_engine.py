"""TensorRT backend: what runs without TensorRT (config, missing-package path, calibration
data, progress bookkeeping, build-engine CLI errors) and, marked ``tensorrt``, a real build."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from moesaic.cli import main
from moesaic.runtime.engine import MissingExtraError, create_engine, parse_engine_config
from moesaic.runtime.tensorrt_build import BuildProgress, build_plan, load_calibration_batches
from moesaic.runtime.tensorrt_engine import TensorRTEngineConfig
from tests.helpers.onnx_models import write_add_model

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_config_defaults_and_errors() -> None:
    config = parse_engine_config({"type": "tensorrt"})
    assert isinstance(config, TensorRTEngineConfig)
    assert (config.plan, config.onnx, config.build, config.workspace_mb) == (
        "model.plan",
        "model.onnx",
        "if-missing",
        1024,
    )
    with pytest.raises(ValueError, match="build"):
        parse_engine_config({"type": "tensorrt", "build": "sometimes"})
    with pytest.raises(ValueError, match="workspace_mb"):
        parse_engine_config({"type": "tensorrt", "workspace_mb": 0})


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed")
def test_missing_tensorrt_names_the_extra(tmp_path: Path) -> None:
    write_add_model(tmp_path, "add")
    engine = create_engine({"type": "tensorrt"}, tmp_path / "add")
    with pytest.raises(MissingExtraError) as info:
        engine.load()
    assert info.value.extra == "tensorrt" and "moesaic[tensorrt]" in str(info.value)
    assert not engine.ready and engine.state == "idle"


def test_missing_tensorrt_with_forced_import_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingExtraError, match="tensorrt"):
        build_plan(write_add_model(tmp_path, "add") / "model.onnx", tmp_path / "x.plan")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"int8": True}, "--int8 needs --calib"),
        ({"workspace_mb": 0}, "--workspace"),
    ],
)
def test_build_plan_argument_errors(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    onnx = write_add_model(tmp_path, "add") / "model.onnx"
    with pytest.raises(ValueError, match=message):
        build_plan(onnx, tmp_path / "x.plan", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not found"):
        build_plan(tmp_path / "none.onnx", tmp_path / "x.plan")


# ---------------------------------------------------------------- calibration data


def test_calibration_npy_batches_in_name_order(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        np.save(tmp_path / f"batch_{i}.npy", np.full((4, 3), i, np.float32))
    (tmp_path / "README.txt").write_text("ignored")
    batches = load_calibration_batches(tmp_path, ["images"])
    assert [float(b["images"][0, 0]) for b in batches] == [0.0, 1.0, 2.0]
    assert all(b["images"].flags.c_contiguous for b in batches)


def test_calibration_npz_for_several_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", points=np.zeros((2, 5), np.float32), mask=np.ones((2,), np.uint8))
    batches = load_calibration_batches(tmp_path, ["points", "mask"])
    assert batches[0]["mask"].dtype == np.uint8


@pytest.mark.parametrize(
    ("files", "names", "message"),
    [
        ({}, ["x"], "no .npy or .npz"),
        ({"a.npy": np.zeros((2, 3), np.float32)}, ["x", "y"], "a.npy.*use .npz"),
        ({"a.npz": {"x": np.zeros((2, 3), np.float32)}}, ["x", "y"], r"a.npz: missing arrays \['y'\]"),
        (
            {"a.npy": np.zeros((2, 3), np.float32), "b.npy": np.zeros((2, 4), np.float32)},
            ["x"],
            "b.npy.*shape",
        ),
        ({"a.npy": np.array(1.0)}, ["x"], "batch dim"),
    ],
)
def test_bad_calibration_data_names_the_file(
    tmp_path: Path, files: dict, names: list[str], message: str
) -> None:
    for name, value in files.items():
        if name.endswith(".npz"):
            np.savez(tmp_path / name, **value)
        else:
            np.save(tmp_path / name, value)
    with pytest.raises(ValueError, match=message):
        load_calibration_batches(tmp_path, names)


def test_calibration_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_calibration_batches(tmp_path / "nope", ["x"])


# ---------------------------------------------------------------- progress


def test_build_progress_lines_follow_nested_phases() -> None:
    lines: list[str] = []
    progress = BuildProgress(lines.append)
    progress.phase_start("Building engine", None, 2)
    progress.phase_start("Tactic selection", "Building engine", 3)
    assert progress.step_complete("Tactic selection", 0)
    progress.phase_finish("Tactic selection")
    progress.step_complete("Building engine", 0)
    progress.cancelled = True
    assert not progress.step_complete("Building engine", 1)  # False asks TensorRT to stop
    progress.phase_finish("Building engine")
    assert lines == [
        "Building engine: 0/2",
        "Building engine > Tactic selection: 0/3",
        "Building engine > Tactic selection: 1/3",
        "Building engine > Tactic selection: done",
        "Building engine: 1/2",
        "Building engine: 2/2",
        "Building engine: done",
    ]
    assert progress.line == "Building engine: done"


def test_build_progress_is_thread_safe() -> None:
    progress = BuildProgress()
    progress.phase_start("p", None, 4000)
    threads = [
        threading.Thread(target=lambda k=k: [progress.step_complete("p", k * 1000 + i) for i in range(1000)])
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.line.startswith("p: ")


# ---------------------------------------------------------------- CLI


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed")
def test_build_engine_command_without_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = write_add_model(tmp_path, "add") / "model.onnx"
    assert main(["build-engine", str(onnx), "--out", str(tmp_path / "m.plan"), "--fp16"]) == 3
    assert "moesaic[tensorrt]" in capsys.readouterr().err.replace("\n", "")


def test_build_engine_command_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = write_add_model(tmp_path, "add") / "model.onnx"
    assert main(["build-engine", str(onnx), "--out", str(tmp_path / "m.plan"), "--int8"]) == 2
    assert "--calib" in capsys.readouterr().err


# ---------------------------------------------------------------- real TensorRT


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TENSORRT and _cuda()), reason="needs tensorrt and a CUDA device")
def test_build_and_run_a_plan(tmp_path: Path) -> None:
    folder = write_add_model(tmp_path, "add")
    lines: list[str] = []
    build_plan(folder / "model.onnx", folder / "model.plan", fp16=False, progress=BuildProgress(lines.append))
    assert (folder / "model.plan").stat().st_size > 0 and lines
    with create_engine({"type": "tensorrt", "build": "never"}, folder) as engine:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        out = engine.infer({"x": x})
    np.testing.assert_allclose(out["y"], x + 1)
    assert float(out["total"]) == pytest.approx(float(x.sum()))
