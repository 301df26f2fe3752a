"""`moesaic demo` end to end with tiny real ONNX experts: summary, report, no process left behind."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from demo_models import write_demo_experts
from PIL import Image

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def processes_tagged(tag: str) -> list[int]:
    """Pids whose environment carries ``tag`` (the demo's children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def demo_inputs(tmp_path: Path) -> tuple[Path, Path]:
    models = write_demo_experts(tmp_path / "models")
    camera = tmp_path / "camera"
    camera.mkdir()
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(np.full((96, 128, 3), 60 * (i + 1), np.uint8)).save(buffer, format="JPEG")
        (camera / f"{i:03d}.jpg").write_bytes(buffer.getvalue())
    return models, camera


def demo(models: Path, camera: Path, report: Path, tag: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MOESAIC_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
    args = ["demo", "--models", str(models), "--camera", str(camera), "--report", str(report), "--no-live"]
    return subprocess.Popen(
        [sys.executable, "-m", "moesaic", *args, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=report.parent,
    )


def test_demo_runs_to_its_summary_and_report(tmp_path: Path, demo_inputs: tuple[Path, Path]) -> None:
    tag = f"demo-{uuid.uuid4().hex}"
    report = tmp_path / "report"
    proc = demo(*demo_inputs, report, tag, "--duration", "4")
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 0, out
    assert "summary:" in out and "within budget" in out
    for task in ("bev_segmentation", "bev_reconstruction", "detection"):
        assert task in out
    assert processes_tagged(tag) == []
    page = (report / "index.html").read_text()
    assert "bev_segmentation" in page and "edge-" in page
    images = sorted(p.name for p in (report / "images").iterdir())
    assert any(n.endswith("bev_segmentation.png") for n in images), images
    assert any(n.endswith("detection.jpg") for n in images), images
    # the Prometheus endpoints of every component, scraped at the end of the run
    metrics = {p.stem: p.read_text() for p in (report / "metrics").iterdir()}
    assert {"coordinator", "ingest", "edge-a", "edge-b"} <= set(metrics)
    for name in (
        "moesaic_expert_latency_seconds_count",
        "moesaic_energy_joules_total",
        "moesaic_selections_total",
    ):
        assert name in metrics["coordinator"], name
    assert "moesaic_expert_latency_seconds_count" in metrics["edge-a"]
    assert "\nmoesaic_model_energy_joules_total{" in metrics["edge-a"]  # attributed, as samples
    assert "moesaic_up" in metrics["ingest"]


def test_demo_stops_every_process_on_sigint(tmp_path: Path, demo_inputs: tuple[Path, Path]) -> None:
    tag = f"demo-{uuid.uuid4().hex}"
    proc = demo(*demo_inputs, tmp_path / "report", tag, "--duration", "60")
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line)
        if "replaying" in line or time.monotonic() > deadline:
            break
    assert any("replaying" in line for line in lines), "".join(lines)
    assert len(processes_tagged(tag)) >= 5  # broker, nodes, coordinator, bridge
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 130, out
    time.sleep(0.5)
    assert processes_tagged(tag) == []


def test_demo_restarts_a_component_that_dies_instead_of_stopping(
    tmp_path: Path, demo_inputs: tuple[Path, Path]
) -> None:
    tag = f"demo-{uuid.uuid4().hex}"
    proc = demo(*demo_inputs, tmp_path / "report", tag, "--duration", "8")
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "replaying" in line:
            break
    time.sleep(1.5)
    bridges = [
        p
        for p in processes_tagged(tag)
        if b" ingest " in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
    ]
    assert len(bridges) == 1, lines
    os.kill(bridges[0], signal.SIGKILL)  # as if it crashed
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 0, out
    assert "ingest exited with status -9 and was restarted (1/3)" in out
    assert "summary:" in out
    time.sleep(0.5)
    assert processes_tagged(tag) == []


def test_demo_without_experts_says_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "moesaic", "demo", "--models", str(empty)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no experts" in result.stdout and str(empty) in result.stdout
