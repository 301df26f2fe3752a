"""`moesaic import-model`: a user's ONNX detector (or ultralytics .pt) becomes a versioned model
folder with a model.yaml scaffold and a profile, a node serves it, the coordinator selects it,
and importing again while a node watches swaps the new version in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from moesaic.cli import main
from moesaic.nodes.importing import read_onnx_facts
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc
from tests.helpers.nodes import REPO_ROOT, running_node
from tests.integration.test_coordinator_perceive import coordinator, fleet

SHIPPED = REPO_ROOT / "models" / "yolo-n" / "model.onnx"  # an ultralytics export, as a user has one


def _describe(address: str) -> moesaic_pb2.NodeDescription:
    with grpc.insecure_channel(address) as channel:
        return moesaic_pb2_grpc.NodeStub(channel).Describe(moesaic_pb2.DescribeRequest(), timeout=10)


async def test_an_imported_onnx_detector_is_served_and_selected_then_swapped(tmp_path: Path) -> None:
    user = tmp_path / "runs" / "best.onnx"
    user.parent.mkdir()
    shutil.copyfile(SHIPPED, user)
    repo = tmp_path / "repo"
    repo.mkdir()
    assert main(["import-model", str(user), "--repo", str(repo), "--name", "my-det", "--runs", "5"]) == 0
    assert sorted(p.name for p in (repo / "my-det").iterdir()) == ["1", "model.yaml"]
    assert sorted(p.name for p in (repo / "my-det" / "1").iterdir()) == ["model.onnx", "profile.json"]
    spec = yaml.safe_load((repo / "my-det" / "model.yaml").read_text())
    assert spec["task"] == "detection" and spec["synthetic"] is False
    assert spec["processor"] == {
        "type": "yolo",
        "imgsz": 320,
        "conf": 0.25,
        "iou": 0.7,
        "class_names": ["vehicle", "pedestrian"],
    }
    (profile,) = json.loads((repo / "my-det" / "1" / "profile.json").read_text())
    assert profile["model"] == "my-det" and profile["latency_ms"]["p50"] > 0

    with running_node(repo, watch=True, watch_interval_s=0.2) as node:
        (model,) = _describe(node.address).models
        assert (model.name, model.version, model.task) == ("my-det", "1", "detection")
        assert list(model.class_names) == ["vehicle", "pedestrian"]
        assert model.profiles[0].latency_ms.p50 == pytest.approx(profile["latency_ms"]["p50"])
        image = np.full((128, 192, 3), 114, np.uint8)
        request = moesaic_pb2.PerceiveRequest(
            task="detection",
            image=moesaic_pb2.Image(data=image.tobytes(), encoding="rgb8", width=192, height=128),
        )
        async with coordinator(fleet([{"address": node.address, "name": "n0"}])) as (stub, _):
            reply = await stub.Perceive(request, timeout=30)
            assert [(e.expert_id, e.status) for e in reply.experts] == [("my-det", "ok")]
            assert reply.WhichOneof("output") == "detections"

            # New weights (here: the same file) as version 2, while the node watches.
            assert (
                main(["import-model", str(user), "--repo", str(repo), "--name", "my-det", "--runs", "0"]) == 0
            )
            deadline = time.monotonic() + 30
            while _describe(node.address).models[0].version != "2":
                assert time.monotonic() < deadline, "the watching node did not load version 2"
                time.sleep(0.1)
            reply = await stub.Perceive(request, timeout=30)
            assert [(e.expert_id, e.status) for e in reply.experts] == [("my-det", "ok")]
    assert not (repo / "my-det" / "2" / "model.yaml").exists()  # nothing differs from the shared one


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.onnx", "missing.onnx: no such file"),
        (lambda d: _write(d / "weights.bin", b"x"), "expected an .onnx file or an ultralytics .pt"),
        (lambda d: _write(d / "broken.onnx", b"\x08\x07 not onnx"), "broken.onnx: not a valid ONNX model"),
    ],
    ids=["missing", "suffix", "corrupt"],
)
def test_bad_sources_fail_in_one_line_and_leave_nothing(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    repo.mkdir()
    source = make(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "moesaic", "import-model", str(source), "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(repo.iterdir()) == []


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_second_version_with_other_classes_gets_its_own_model_yaml(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert main(["import-model", str(SHIPPED), "--repo", str(repo), "--name", "det", "--runs", "0"]) == 0
    assert (
        main(
            [
                "import-model",
                str(SHIPPED),
                "--repo",
                str(repo),
                "--name",
                "det",
                "--runs",
                "0",
                "--class-names",
                "car,person",
            ]
        )
        == 0
    )
    override = yaml.safe_load((repo / "det" / "2" / "model.yaml").read_text())
    assert override["processor"]["class_names"] == ["car", "person"]
    assert main(["import-model", str(SHIPPED), "--repo", str(repo), "--name", "det", "--version", "1"]) == 2


def test_an_ultralytics_checkpoint_is_exported_offline_with_its_class_names(tmp_path: Path) -> None:
    """A two-class YOLOv8n built from its YAML (random weights, nothing downloaded), saved as a
    user's .pt, exported to ONNX at 64 px by import-model."""
    script = tmp_path / "make_pt.py"
    script.write_text(
        "import sys, yaml\n"
        "from pathlib import Path\n"
        "from moesaic.models.detector.offline import import_ultralytics\n"
        "u = import_ultralytics()\n"
        "from ultralytics.utils import ROOT\n"
        "cfg = yaml.safe_load((ROOT / 'cfg/models/v8/yolov8.yaml').read_text())\n"
        "cfg['nc'] = 2\n"
        "path = Path(sys.argv[1]) / 'yolov8n.yaml'\n"
        "path.write_text(yaml.safe_dump(cfg))\n"
        "model = u.YOLO(str(path), task='detect')\n"
        "model.model.names = {0: 'cone', 1: 'truck'}\n"
        "model.save(str(Path(sys.argv[1]) / 'best.pt'))\n"
    )
    env_cmd = [sys.executable, str(script), str(tmp_path)]
    made = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    repo = tmp_path / "repo"
    repo.mkdir()
    assert (
        main(["import-model", str(tmp_path / "best.pt"), "--repo", str(repo), "--imgsz", "64", "--runs", "2"])
        == 0
    )
    spec = yaml.safe_load((repo / "my-best" / "model.yaml").read_text())
    assert spec["processor"]["class_names"] == ["cone", "truck"] and spec["processor"]["imgsz"] == 64
    facts = read_onnx_facts(repo / "my-best" / "1" / "model.onnx")
    assert (facts.task, facts.class_names, facts.imgsz) == ("detection", ["cone", "truck"], 64)
    assert not (tmp_path / "best.onnx").exists()  # the export was made aside, not beside the user's file
