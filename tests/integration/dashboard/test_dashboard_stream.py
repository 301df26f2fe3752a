"""The dashboard against a real mosquitto, a real MQTT bridge, a loopback coordinator and a real
node: its server-sent event stream delivers every kind of update a page shows."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiomqtt
import numpy as np
import pytest
from PIL import Image

from moesaic.dashboard import Dashboard, fleet_dashboard
from moesaic.fleet import free_port
from moesaic.ingest.bridge import Bridge
from moesaic.ingest.broker import EmbeddedBroker
from moesaic.ingest.config import load_config
from moesaic.metrics import Metrics
from moesaic.proto import moesaic_pb2
from tests.helpers.nodes import REPO_ROOT

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(90)]


class Page:
    """What a page would know: the snapshot and every patch read from ``/events``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def read(self, response: aiohttp.ClientResponse) -> None:
        kind = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                self.events.append({"event": kind, **json.loads(line[6:])})
                self.changed.set()

    def items(self, section: str) -> list[dict[str, Any]]:
        return [item for event in self.events for item in event.get(section, [])]

    async def until(self, check: Callable[[Page], bool], timeout: float = 20.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not check(self):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"the page never saw it; it got: {self.summary()}") from None

    def summary(self) -> str:
        """Which sections each event carried, and the last item of each section."""
        sections = ("streams", "nodes", "components", "images", "cameras", "errors", "ignored")
        last = {s: self.items(s)[-1] for s in sections if s != "ignored" and self.items(s)}
        for item in last.get("streams", {}), last.get("cameras", {}):
            item.pop("samples", None)
        return json.dumps({"events": len(self.events), "last": last})[:4000]


@contextlib.asynccontextmanager
async def page_of(dashboard: Dashboard) -> AsyncIterator[tuple[Page, aiohttp.ClientResponse]]:
    page = Page()
    async with aiohttp.ClientSession() as session, session.get(dashboard.url + "events") as response:
        assert response.status == 200
        reader = asyncio.create_task(page.read(response))
        try:
            yield page, response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await reader


def jpeg(value: int, w: int = 96, h: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def coordinator_with_health() -> AsyncIterator[str]:
    """The echo coordinator of the integration tests, serving grpc.health.v1 as the real one does."""
    from grpc_health.v1 import health_pb2

    from moesaic.proto import moesaic_pb2_grpc
    from moesaic.rpc import add_health_and_reflection, create_server
    from tests.integration.conftest import EchoCoordinator

    server = create_server(aio=True)
    moesaic_pb2_grpc.add_CoordinatorServicer_to_server(EchoCoordinator(), server)
    health = add_health_and_reflection(server, ["moesaic.v1.Coordinator"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def test_the_event_stream_delivers_results_images_frames_statuses_and_nodes(mosquitto, node) -> None:
    metrics = Metrics(component="ingest")
    server = metrics.serve(0)
    metrics_url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    config = load_config(broker=mosquitto.url, coordinator="", reconnect_min_s=0.05)
    try:
        async with coordinator_with_health() as coordinator:
            config = config.model_copy(update={"coordinator": coordinator})
            dashboard = fleet_dashboard(
                "127.0.0.1:0",
                broker=mosquitto.url,
                coordinator=coordinator,
                nodes={"edge-a": node.address},
                metrics={"ingest": metrics_url},
                push_interval_s=0.2,
                poll_interval_s=0.5,
            )
            async with dashboard, page_of(dashboard) as (page, _):
                await asyncio.wait_for(dashboard.feed.connected.wait(), 10)
                assert page.events[0]["event"] == "snapshot"
                async with Bridge(config) as bridge:
                    run = asyncio.create_task(bridge.run())
                    await asyncio.wait_for(bridge.connected.wait(), 10)
                    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as sensor:
                        for i in range(1, 4):
                            scan = np.random.default_rng(i).uniform(-20, 20, (500, 4)).astype("<f4")
                            await sensor.publish(
                                "moesaic/v1/sensors/roof/lidar/kitti-f32x4", scan.tobytes(), qos=1
                            )
                            frame = moesaic_pb2.SensorFrame(
                                frame_id=i,
                                encoding="jpeg",
                                data=jpeg(40 * i),
                                budget=moesaic_pb2.Budget(latency_ms=100.0),
                            )
                            await sensor.publish(
                                "moesaic/v1/sensors/front/camera", frame.SerializeToString(), qos=1
                            )
                            await asyncio.sleep(0.2)
                    await page.until(
                        lambda p: (
                            {(s["sensor"], s["task"]) for s in p.items("streams")}
                            >= {("roof", "bev_segmentation"), ("front", "detection")}
                            and any(c["boxes"] for c in p.items("cameras"))
                            and any(i["sensor"] == "roof" for i in p.items("images"))
                            and any(c.get("status") == "online" for c in p.items("components"))
                        )
                    )
                    run.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run
                await page.until(lambda p: any(n["health"] == "serving" for n in p.items("nodes")))
                await page.until(
                    lambda p: (
                        any(
                            c["name"] == "coordinator" and c.get("health") == "serving"
                            for c in p.items("components")
                        )
                        and any(c["name"] == "ingest" and c.get("metrics_up") for c in p.items("components"))
                    )
                )
                # the bridge said offline when it stopped
                await page.until(
                    lambda p: (
                        [c for c in p.items("components") if c["name"] == "ingest" and "status" in c][-1][
                            "status"
                        ]
                        == "offline"
                    )
                )

                samples = [
                    s for st in page.items("streams") if st["task"] == "detection" for s in st["samples"]
                ]
                assert sorted({s[0] for s in samples}) == sorted(s[0] for s in samples)  # each sample once
                detection = [s for s in page.items("streams") if s["task"] == "detection"][-1]
                assert detection["latest"]["experts"][0]["id"] == "echo/model"
                assert detection["latest"]["budget"]["latency_ms"] == 100.0
                camera = [c for c in page.items("cameras") if c["boxes"]][-1]
                assert camera["boxes"][0]["label"] == "vehicle" and camera["width"] == 96
                [described] = [n for n in page.items("nodes") if n["health"] == "serving"][-1:]
                assert described["name"] == "edge-a" and {m["name"] for m in described["models"]} >= {"add"}
                image = [i for i in page.items("images") if i["sensor"] == "roof"][-1]
                async with aiohttp.ClientSession() as session:
                    async with session.get(dashboard.url + image["url"].lstrip("/")) as response:
                        assert response.status == 200 and response.content_type == "image/png"
                        assert Image.open(io.BytesIO(await response.read())).size == (8, 8)
                    async with session.get(dashboard.url + camera["url"].lstrip("/")) as response:
                        assert response.status == 200 and response.content_type == "image/jpeg"
    finally:
        server.shutdown()
        server.server_close()


async def test_a_broker_that_comes_later_is_picked_up(mosquitto) -> None:
    port = mosquitto.port
    mosquitto.stop()
    dashboard = fleet_dashboard("127.0.0.1:0", broker=f"mqtt://127.0.0.1:{port}", push_interval_s=0.2)
    async with dashboard, page_of(dashboard) as (page, _):
        await page.until(
            lambda p: any(c["name"] == "broker" and c.get("health") == "down" for c in p.items("components"))
        )
        mosquitto.start()
        await asyncio.wait_for(dashboard.feed.connected.wait(), 20)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish("moesaic/v1/status/ingest", b"online", qos=1, retain=True)
        await page.until(lambda p: any(c.get("status") == "online" for c in p.items("components")))


def test_the_command_serves_until_sigterm() -> None:
    """``moesaic dashboard`` prints its URL, serves the page with no broker up yet, and stops
    cleanly (status 0) on SIGTERM."""
    port, dead_broker = free_port(), free_port()
    command = [sys.executable, "-m", "moesaic", "dashboard", "--broker", f"mqtt://127.0.0.1:{dead_broker}"]
    process = subprocess.Popen(
        [*command, "--listen", f"127.0.0.1:{port}", "--node", "edge-a=127.0.0.1:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"dashboard: http://127.0.0.1:{port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5) as response:
            state = json.loads(response.read())
        assert state["type"] == "snapshot"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)


async def test_sources_added_while_running_with_the_demos_embedded_broker(node) -> None:
    """As the demo uses it: started on the embedded (MQTT 3.1.1) broker before the fleet, then
    told of the node, the coordinator and a metrics endpoint as they come up."""
    metrics = Metrics(component="coordinator")
    metrics.budget_violations.labels("detection", "no_feasible_set").inc(2)
    server = metrics.serve(0)
    try:
        async with EmbeddedBroker(port=0) as broker, coordinator_with_health() as coordinator:
            dashboard = fleet_dashboard(
                "127.0.0.1:0", broker=broker.url, push_interval_s=0.2, poll_interval_s=0.5
            )
            async with dashboard, page_of(dashboard) as (page, _):
                await asyncio.wait_for(dashboard.feed.connected.wait(), 10)  # MQTT 5 refused: 3.1.1
                dashboard.add_node(node.address, name="edge-a")
                dashboard.add_coordinator(coordinator)
                dashboard.add_metrics(
                    f"http://127.0.0.1:{server.server_address[1]}/metrics", name="coordinator"
                )
                await page.until(
                    lambda p: (
                        any(n["name"] == "edge-a" and n["health"] == "serving" for n in p.items("nodes"))
                        and any(
                            c["name"] == "coordinator"
                            and c.get("health") == "serving"
                            and c.get("violations") == {"detection no_feasible_set": 2.0}
                            for c in p.items("components")
                        )
                    )
                )
    finally:
        server.shutdown()
        server.server_close()
