"""``moesaic profile`` end to end on a real model repository (ONNX Runtime and torch models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moesaic.cli import main
from moesaic.runtime.commands import synthetic_inputs
from moesaic.runtime.engine import TensorSpec
from moesaic.runtime.profiler import load_profile_file
from tests.helpers.onnx_models import write_add_model
from tests.helpers.torch_models import write_torch_add_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("profile-models")
    write_add_model(root, "add")
    write_torch_add_model(root, "torch_add", "export", model_yaml="engine: {type: torch, device: cpu}\n")
    return root


def test_profile_writes_a_profile_file(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    args = ["profile", "--models", str(repo), "--batch", "1,2", "--runs", "5", "--device", "cpu"]
    assert main([*args, "--idle-seconds", "0.1", "--min-seconds", "0", "--out", str(out)]) == 0
    records = load_profile_file(out)
    assert sorted((r.model, r.engine, r.batch_size) for r in records) == [
        ("add", "onnxruntime", 1),
        ("add", "onnxruntime", 2),
        ("torch_add", "torch", 1),
        ("torch_add", "torch", 2),
    ]
    for r in records:
        assert r.device == "cpu" and r.energy_source in ("rapl", "estimate")
        assert 0 < r.latency_ms.p50 <= r.latency_ms.p95 <= r.latency_ms.p99
        assert r.throughput_per_s > 0 and r.energy_mj_per_inference > 0


def test_profile_one_model(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    args = ["profile", "--models", str(repo), "--model", "add", "--runs", "3", "--device", "cpu"]
    assert main([*args, "--idle-seconds", "0", "--min-seconds", "0", "--out", str(out)]) == 0
    assert [r.model for r in load_profile_file(out)] == ["add"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nope"], "nope"),
        (["--batch", "1,x"], "--batch"),
        (["--batch", "0"], "--batch"),
        (["--shape", "x=1by4"], "--shape"),
        (["--device", "tpu"], "device"),
    ],
)
def test_profile_bad_arguments(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["profile", "--models", str(repo), "--out", str(tmp_path / "p.json"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_synthetic_inputs() -> None:
    specs = (
        TensorSpec("img", "UINT8", (-1, 8, 8, 3)),
        TensorSpec("k", "INT64", (-1,)),
        TensorSpec("f", "FP16", (2, -1)),
    )
    assert synthetic_inputs(specs, 4) is None  # f has a fixed batch of 2
    inputs = synthetic_inputs(specs[:2], 4)
    assert inputs is not None
    assert inputs["img"].shape == (4, 8, 8, 3) and inputs["img"].dtype == np.uint8
    assert inputs["k"].shape == (4,) and inputs["k"].dtype == np.int64
    shaped = synthetic_inputs(specs[2:], 4, {"f": (2, 16)})
    assert shaped is not None and shaped["f"].shape == (2, 16) and shaped["f"].dtype == np.float16
