"""A small real fleet for the dashboard's browser tests, and the browser.

``small_fleet`` (module scope): mosquitto, two in-process nodes serving tiny real ONNX experts
(BEV segmentation and detection, each expert on both nodes), ``moesaic coordinator``,
``moesaic ingest`` and ``moesaic dashboard`` as processes, and a publisher thread replaying
LiDAR scans and camera frames with budgets (one of them too tight on purpose).

``chromium`` (module scope): Debian's headless chromium driven by playwright; the tests are
skipped, with the reason, where playwright or /usr/bin/chromium is missing. Playwright never
downloads a browser here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from moesaic.fleet import free_port
from moesaic.ingest.broker import MosquittoProcess, mosquitto_binary
from tests.helpers.nodes import REPO_ROOT, running_node
from tests.helpers.onnx_models import write_model, write_toy_detector

CHROMIUM = Path("/usr/bin/chromium")
LIDAR_SENSOR = "roof-lidar"
CAMERA_SENSOR = "front-camera"
NODES = ("edge-a", "edge-b")
TASKS = ("bev_segmentation", "detection")


def write_segmentation_expert(root: Path, name: str, *, seed: int, classes: int = 5, side: int = 32) -> None:
    """points FP32 [N, 4] -> mean point -> linear map -> softmax class scores [classes, side, side]:
    scans with different means give different class maps (so the BEV image changes)."""
    weights = np.random.default_rng(seed).normal(size=(4, classes * side * side)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["points"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("MatMul", ["mean", "w"], ["flat"]),
            helper.make_node("Reshape", ["flat", "shape"], ["grid"]),
            helper.make_node("Softmax", ["grid"], ["probs"], axis=0),
        ],
        name,
        [helper.make_tensor_value_info("points", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [classes, side, side])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array([classes, side, side], np.int64), "shape"),
        ],
    )
    write_model(root / name, graph, model_yaml="task: bev_segmentation\n")


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = np.full((120, 160, 3), 40 + 50 * (i % 4), np.uint8)
    pixels[20:80, 30:110] = rng.integers(0, 255, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _wait_http(url: str, process: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout} s")


def _wait_health(address: str, process: subprocess.Popen[Any], timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{address} not serving after {timeout} s")


class Publisher(threading.Thread):
    """Replays LiDAR scans (4 Hz) and camera frames (2 Hz), each in a SensorFrame with a budget."""

    def __init__(self, port: int) -> None:
        super().__init__(name="sensor-publisher", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        import aiomqtt

        from moesaic.proto import moesaic_pb2

        # (latency ms, energy mJ): the tight one cannot be met, so misses and their reason show
        budgets = [(2000.0, 0.0), (2000.0, 0.0), (0.5, 0.0)]
        async with aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                latency, energy = budgets[i % len(budgets)]
                budget = moesaic_pb2.Budget(latency_ms=latency, energy_mj=energy)
                offset = np.float32(i % 7) * 3.0
                scan = np.random.default_rng(i).uniform(-20, 20, (800, 4)).astype("<f4") + offset
                frame = moesaic_pb2.SensorFrame(
                    timestamp=time.time(),
                    frame_id=i,
                    encoding="kitti-f32x4",
                    data=scan.tobytes(),
                    budget=budget,
                )
                topic = f"moesaic/v1/sensors/{LIDAR_SENSOR}/lidar"
                await client.publish(topic, frame.SerializeToString(), qos=1)
                if i % 2 == 0:
                    image = moesaic_pb2.SensorFrame(
                        timestamp=time.time(),
                        frame_id=i // 2,
                        encoding="jpeg",
                        data=_jpeg(i // 2),
                        budget=budget,
                    )
                    topic = f"moesaic/v1/sensors/{CAMERA_SENSOR}/camera"
                    await client.publish(topic, image.SerializeToString(), qos=1)
                self.sent += 1
                await asyncio.sleep(0.25)


@dataclass
class SmallFleet:
    url: str
    """The dashboard's origin, e.g. ``http://127.0.0.1:PORT/``."""
    broker: str
    coordinator: str
    nodes: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def _spawn(name: str, args: list[str], logs: Path) -> subprocess.Popen[Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = (logs / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "moesaic", *args], stdout=log, stderr=subprocess.STDOUT, env=env
    )


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallFleet]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    root = tmp_path_factory.mktemp("fleet")
    logs = root / "logs"
    logs.mkdir()
    models = root / "models"
    write_segmentation_expert(models, "tiny-seg", seed=0)
    write_toy_detector(models, "tiny-det")
    broker = MosquittoProcess(root / "mosquitto")
    broker.start()
    processes: dict[str, subprocess.Popen[Any]] = {}
    publisher = Publisher(broker.port)
    with contextlib.ExitStack() as stack:
        try:
            nodes = {}
            node_metrics = {}
            for name in NODES:
                metrics_port = free_port()
                node = stack.enter_context(running_node(models, node_id=name, metrics_port=metrics_port))
                nodes[name] = node.address
                node_metrics[name] = f"http://127.0.0.1:{metrics_port}/metrics"
            coordinator, coordinator_metrics, ingest_metrics = (
                f"127.0.0.1:{free_port()}",
                free_port(),
                free_port(),
            )
            fleet_yaml = root / "fleet.yaml"
            fleet_yaml.write_text(
                yaml.safe_dump(
                    {
                        "coordinator": {"metrics_port": coordinator_metrics},
                        "nodes": [{"address": a, "name": n} for n, a in nodes.items()],
                    }
                )
            )
            processes["coordinator"] = _spawn(
                "coordinator", ["coordinator", "--config", str(fleet_yaml), "--listen", coordinator], logs
            )
            ingest_yaml = root / "ingest.yaml"
            ingest_yaml.write_text(
                yaml.safe_dump(
                    {
                        "metrics_port": ingest_metrics,
                        "request_timeout_s": 5.0,
                        "defaults": {
                            "lidar": {"tasks": ["bev_segmentation"]},
                            "camera": {"tasks": ["detection"]},
                        },
                    }
                )
            )
            dashboard_port = free_port()
            processes["dashboard"] = _spawn(
                "dashboard",
                [
                    *("dashboard", "--broker", broker.url, "--coordinator", coordinator),
                    *("--fleet", str(fleet_yaml), "--listen", f"127.0.0.1:{dashboard_port}"),
                    *("--metrics", f"coordinator=127.0.0.1:{coordinator_metrics}"),
                    *("--metrics", f"ingest=127.0.0.1:{ingest_metrics}"),
                    *(arg for name, url in node_metrics.items() for arg in ("--metrics", f"{name}={url}")),
                ],
                logs,
            )
            _wait_health(coordinator, processes["coordinator"], timeout=60)
            processes["ingest"] = _spawn(
                "ingest",
                [
                    "ingest",
                    "--config",
                    str(ingest_yaml),
                    "--broker",
                    broker.url,
                    "--coordinator",
                    coordinator,
                ],
                logs,
            )
            url = f"http://127.0.0.1:{dashboard_port}/"
            _wait_http(url + "healthz", processes["dashboard"], timeout=30)
            _wait_http(f"http://127.0.0.1:{ingest_metrics}/metrics", processes["ingest"], timeout=30)
            publisher.start()
            yield SmallFleet(url, broker.url, coordinator, nodes, logs, processes)
        finally:
            publisher.stop.set()
            if publisher.is_alive():
                publisher.join(timeout=5)
            for process in processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
            broker.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's headless chromium through playwright (never a downloaded browser)."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (the dev extra)"
    )
    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "/nonexistent")
    if not executable.exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable),
            headless=True,
            args=["--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        try:
            yield browser
        finally:
            browser.close()
