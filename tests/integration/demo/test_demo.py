"""`moesaic demo` end to end with tiny real ONNX experts, a real mosquitto and real nodes:
gates trained on first start and reused after, summary.json, report, no process left behind."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from demo_models import write_demo_experts
from PIL import Image

from moesaic.ingest.broker import MosquittoProcess, mosquitto_binary

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

TASKS = ("bev_segmentation", "bev_reconstruction", "detection")
TASK_KEYS = {
    "frames",
    "results",
    "errors",
    "dropped",
    "feasible",
    "within_budget",
    "within_budget_of_feasible",
    "latency_ms",
    "energy_mj",
    "gate",
    "selections",
}


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


@dataclass(frozen=True)
class Inputs:
    models: Path
    camera: Path
    cache: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """Tiny experts, two camera frames, and a gate cache shared by the tests of this module."""
    root = tmp_path_factory.mktemp("demo")
    models = write_demo_experts(root / "models")
    camera = root / "camera"
    camera.mkdir()
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(np.full((96, 128, 3), 60 * (i + 1), np.uint8)).save(buffer, format="JPEG")
        (camera / f"{i:03d}.jpg").write_bytes(buffer.getvalue())
    return Inputs(models, camera, root / "cache")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    process = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def demo(inputs: Inputs, report: Path, tag: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MOESAIC_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
    args = ["demo", "--models", str(inputs.models), "--camera", str(inputs.camera), "--report", str(report)]
    args += ["--cache", str(inputs.cache), "--no-live", "--no-dashboard"]
    report.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "moesaic", *args, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=report.parent,
    )


@dataclass(frozen=True)
class Run:
    out: str
    report: Path
    tag: str


@pytest.fixture(scope="module")
def first_run(inputs: Inputs, broker: MosquittoProcess, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The module's first demo: it trains every gate into the (empty) cache."""
    tag = f"demo-{uuid.uuid4().hex}"
    report = tmp_path_factory.mktemp("first") / "report"
    proc = demo(inputs, report, tag, "--duration", "4", "--broker", broker.url)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    return Run(out, report, tag)


def gates_seconds(out: str) -> float:
    match = re.search(r"gates ready in ([0-9.]+) s \((\d+) trained, (\d+) from the cache", out)
    assert match, out
    return float(match.group(1))


def test_demo_trains_its_gates_and_writes_summary_and_report(first_run: Run) -> None:
    out, report = first_run.out, first_run.report
    for task in TASKS:
        assert f"gate of {task}: trained on 12 frames" in out, out
    assert "3 trained, 0 from the cache" in out
    assert "summary:" in out and "within budget" in out
    assert processes_tagged(first_run.tag) == []

    summary = json.loads((report / "summary.json").read_text())
    assert summary["duration_s"] >= 4
    assert set(summary["tasks"]) == set(TASKS)
    for task, t in summary["tasks"].items():
        assert set(t) >= TASK_KEYS, task
        assert t["frames"] > 0, task
        assert t["results"] + t["errors"] + t["dropped"] == t["frames"], (task, t)
        assert t["results"] > 0, (task, t)
        assert t["gate"] == "trained", task
        assert set(t["latency_ms"]) >= {"mean", "p50", "p99"}
        assert t["energy_mj"]["source"] in ("measured", "estimate", "mixed")
        assert 0 <= t["within_budget"] <= t["results"] and 0 <= t["feasible"] <= t["results"]
        ratio = t["within_budget_of_feasible"]
        assert ratio is None or 0.0 <= ratio <= 1.0
        assert sum(t["selections"].values()) >= t["results"]
        assert t["frames"] == 0 or str(t["frames"]) in out  # the printed table shows the same figures

    page = (report / "index.html").read_text()
    assert "bev_segmentation" in page and "edge-" in page and "summary.json" in page
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
    assert "moesaic_up" in metrics["ingest"]


def test_second_start_loads_the_gates_from_the_cache(
    first_run: Run, inputs: Inputs, broker: MosquittoProcess, tmp_path: Path
) -> None:
    cached = sorted(p.name for p in inputs.cache.iterdir())
    assert len(cached) == 3 and all((inputs.cache / c / "gate.json").is_file() for c in cached), cached
    tag = f"demo-{uuid.uuid4().hex}"
    proc = demo(inputs, tmp_path / "report", tag, "--duration", "1", "--broker", broker.url)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "0 trained, 3 from the cache" in out
    assert gates_seconds(out) < 0.5 * gates_seconds(first_run.out) and gates_seconds(out) < 3.0, out
    assert sorted(p.name for p in inputs.cache.iterdir()) == cached  # nothing trained again
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {t["gate"] for t in summary["tasks"].values()} == {"trained"}


def test_demo_stops_every_process_on_sigint(first_run: Run, inputs: Inputs, tmp_path: Path) -> None:
    tag = f"demo-{uuid.uuid4().hex}"
    proc = demo(inputs, tmp_path / "report", tag, "--duration", "60")  # the embedded broker
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
    first_run: Run, inputs: Inputs, broker: MosquittoProcess, tmp_path: Path
) -> None:
    tag = f"demo-{uuid.uuid4().hex}"
    proc = demo(inputs, tmp_path / "report", tag, "--duration", "8", "--broker", broker.url)
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
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    for task, t in summary["tasks"].items():  # frames the dead bridge took with it count as dropped
        assert t["results"] + t["errors"] + t["dropped"] == t["frames"], (task, t)
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
