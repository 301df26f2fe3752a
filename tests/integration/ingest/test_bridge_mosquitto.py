"""The MQTT bridge against a real mosquitto and a real gRPC coordinator on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator

import aiomqtt
import numpy as np
import pytest
from PIL import Image

from moesaic.ingest.bridge import Bridge
from moesaic.ingest.broker import MosquittoProcess
from moesaic.ingest.config import IngestConfig, load_config
from moesaic.proto import moesaic_pb2
from tests.helpers.images import png_bomb
from tests.helpers.real_data import REAL_DATA

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(60)]

KITTI_SCAN = REAL_DATA / "kitti_000008.bin"


KITTI_TOPIC = "moesaic/v1/sensors/{sensor}/lidar/kitti-f32x4"
"""Raw float32 x, y, z, intensity records declare their format in the topic."""


def scan_bytes(n: int = 1000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.uniform(-20, 20, size=(n, 4)).astype("<f4").tobytes()


def jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("mqtt://").split(":")
    return host, int(port)


@contextlib.asynccontextmanager
async def running_bridge(config: IngestConfig) -> AsyncIterator[Bridge]:
    async with Bridge(config) as bridge:
        task = asyncio.create_task(bridge.run())
        try:
            await asyncio.wait_for(bridge.connected.wait(), timeout=10)
            yield bridge
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Collector:
    """Subscribes to topic filters and keeps every message, for assertions."""

    def __init__(self, url: str, *filters: str) -> None:
        self.host, self.port = host_port(url)
        self.filters = filters
        self.messages: list[aiomqtt.Message] = []
        self._new = asyncio.Event()

    async def run(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(self.host, self.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            for f in self.filters:
                await client.subscribe(f, qos=1)
            ready.set()
            async for message in client.messages:
                self.messages.append(message)
                self._new.set()

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.matches(topic)]

    async def wait_for(self, topic: str, count: int = 1, timeout: float = 10.0) -> list[aiomqtt.Message]:
        async with asyncio.timeout(timeout):
            while len(self.on(topic)) < count:
                self._new.clear()
                await self._new.wait()
        return self.on(topic)


@contextlib.asynccontextmanager
async def collecting(url: str, *filters: str) -> AsyncIterator[Collector]:
    collector = Collector(url, *filters)
    ready = asyncio.Event()
    task = asyncio.create_task(collector.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), timeout=10)
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


async def publish(url: str, *messages: tuple[str, bytes], gap_s: float = 0.0) -> None:
    host, port = host_port(url)
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)
            if gap_s:
                await asyncio.sleep(gap_s)


def config_for(broker: MosquittoProcess, coordinator: str, **overrides: object) -> IngestConfig:
    return load_config(broker=broker.url, coordinator=coordinator, reconnect_min_s=0.05, **overrides)


async def test_mosquitto_pub_kitti_scan_gives_json_result(mosquitto, echo_coordinator, tmp_path):
    if not shutil.which("mosquitto_pub"):
        pytest.skip("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
    scan = KITTI_SCAN if KITTI_SCAN.exists() else tmp_path / "scan.bin"
    if not scan.exists():
        scan.write_bytes(scan_bytes(5000))
    async with (
        echo_coordinator() as (servicer, address),
        running_bridge(config_for(mosquitto, address)),
        collecting(mosquitto.url, "moesaic/v1/results/#") as results,
    ):
        subprocess.run(
            [
                "mosquitto_pub",
                "-p",
                str(mosquitto.port),
                "-t",
                KITTI_TOPIC.format(sensor="s0"),
                "-f",
                str(scan),
            ],
            check=True,
            timeout=10,
        )
        [message] = await results.wait_for("moesaic/v1/results/s0/bev_segmentation")
        [image] = await results.wait_for("moesaic/v1/results/s0/bev_segmentation/png")
    body = json.loads(message.payload)  # type: ignore[arg-type]
    assert body["sensor"] == "s0" and body["task"] == "bev_segmentation" and body["kind"] == "lidar"
    assert body["output"] == {"type": "segmentation", "shape": [8, 8], "class_pixels": {"0": 32, "1": 32}}
    assert body["experts"][0]["id"] == "echo/model" and body["experts"][0]["weight"] == 1.0
    assert body["budget_met"] is True and body["energy_source"] == "estimate"
    assert body["budget"] == {"latency_ms": 500.0, "energy_mj": 0.0}
    assert message.qos == 1
    assert Image.open(io.BytesIO(image.payload)).size == (8, 8)  # type: ignore[arg-type]
    [request] = servicer.requests
    assert request.points.data == scan.read_bytes() and request.points.fields == 4
    assert request.sensor_id == "s0"


async def test_a_raw_nuscenes_scan_on_its_declared_topic_keeps_five_floats(mosquitto, echo_coordinator):
    scan = np.random.default_rng(1).uniform(-20, 20, (300, 5)).astype("<f4").tobytes()
    async with (
        echo_coordinator() as (servicer, address),
        running_bridge(config_for(mosquitto, address)),
        collecting(mosquitto.url, "moesaic/v1/results/#") as results,
    ):
        await publish(mosquitto.url, ("moesaic/v1/sensors/roof/lidar/nuscenes-f32x5", scan))
        await results.wait_for("moesaic/v1/results/roof/bev_segmentation")
    request = servicer.requests[0]
    assert request.points.fields == 5 and request.points.data == scan


async def test_camera_jpeg_and_sensor_frames_carry_budget_and_ids(mosquitto, echo_coordinator):
    frame = moesaic_pb2.SensorFrame(
        timestamp=1700000000.5,
        frame_id=42,
        encoding="nuscenes-f32x5",
        data=np.zeros((10, 5), "<f4").tobytes(),
        budget=moesaic_pb2.Budget(latency_ms=50, energy_mj=100),
    )
    async with (
        echo_coordinator() as (servicer, address),
        running_bridge(config_for(mosquitto, address, queue_depth=4)),
        collecting(mosquitto.url, "moesaic/v1/results/+/+") as results,
    ):
        await publish(
            mosquitto.url,
            ("moesaic/v1/sensors/cam1/camera", jpeg_bytes()),
            ("moesaic/v1/sensors/top/lidar", frame.SerializeToString()),
        )
        [detection] = await results.wait_for("moesaic/v1/results/cam1/detection")
        [segmentation] = await results.wait_for("moesaic/v1/results/top/bev_segmentation")
    det = json.loads(detection.payload)  # type: ignore[arg-type]
    assert det["output"]["items"] == [
        {"xyxy": [0, 0, 64, 48], "score": 0.9, "class_id": 0, "class_name": "vehicle"}
    ]
    seg = json.loads(segmentation.payload)  # type: ignore[arg-type]
    assert seg["frame_id"] == 42 and seg["timestamp"] == 1700000000.5
    assert seg["budget"] == {"latency_ms": 50.0, "energy_mj": 100.0}
    by_task = {r.task: r for r in servicer.requests}
    assert by_task["detection"].image.encoding == "jpeg" and by_task["detection"].image.width == 64
    assert (
        by_task["bev_segmentation"].points.fields == 5 and by_task["bev_segmentation"].budget.latency_ms == 50
    )


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("moesaic/v1/sensors/bad/lidar", b"", "empty"),
        ("moesaic/v1/sensors/bad/lidar/kitti-f32x4", b"\x00" * 15, "bad_points"),
        (
            "moesaic/v1/sensors/bad/lidar/kitti-f32x4",
            np.array([np.nan, 0, 0, 0], "<f4").tobytes(),
            "bad_points",
        ),
        ("moesaic/v1/sensors/bad/lidar", scan_bytes(), "format_undeclared"),  # raw, format not declared
        ("moesaic/v1/sensors/bad/camera", b"this is not an image", "bad_image"),
        ("moesaic/v1/sensors/bad/camera", b"\xff\xd8\xff" + b"\x00" * 64, "bad_image"),
        ("moesaic/v1/sensors/bad/camera", png_bomb(), "too_many_pixels"),
        (
            "moesaic/v1/sensors/bad/camera",
            moesaic_pb2.SensorFrame(encoding="kitti-f32x4", data=b"\x00" * 16).SerializeToString(),
            "wrong_encoding",
        ),
    ],
)
async def test_garbage_payload_goes_to_error_topic_and_counter(
    mosquitto, echo_coordinator, topic, payload, reason
):
    async with (
        echo_coordinator() as (servicer, address),
        running_bridge(config_for(mosquitto, address)) as bridge,
        collecting(mosquitto.url, "moesaic/v1/errors/#", "moesaic/v1/results/#") as out,
    ):
        await publish(mosquitto.url, (topic, payload), (topic, payload))
        errors = await out.wait_for("moesaic/v1/errors/bad", count=2)
        # the bridge is still serving: a good frame after the garbage gets its result
        await publish(mosquitto.url, (KITTI_TOPIC.format(sensor="good"), scan_bytes()))
        await out.wait_for("moesaic/v1/results/good/bev_segmentation")
    bodies = [json.loads(m.payload) for m in errors]  # type: ignore[arg-type]
    assert [b["reason"] for b in bodies] == [reason, reason]
    assert [b["count"] for b in bodies] == [1, 2]
    assert all(b["sensor"] == "bad" and b["detail"] for b in bodies)
    assert (
        bridge.metrics.registry.get_sample_value(
            "moesaic_mqtt_errors_total", {"sensor": "bad", "reason": reason}
        )
        == 2.0
    )
    assert len(servicer.requests) == 1


async def test_coordinator_error_is_reported_not_raised(mosquitto, echo_coordinator):
    async with (
        echo_coordinator(fail_tasks=("detection",)) as (_, address),
        running_bridge(config_for(mosquitto, address)),
        collecting(mosquitto.url, "moesaic/v1/errors/#") as out,
    ):
        await publish(mosquitto.url, ("moesaic/v1/sensors/c0/camera", jpeg_bytes()))
        [error] = await out.wait_for("moesaic/v1/errors/c0")
    body = json.loads(error.payload)  # type: ignore[arg-type]
    assert body["reason"] == "coordinator_invalid_argument" and body["task"] == "detection"
    assert "refused by the test" in body["detail"]


async def test_coordinator_down_is_reported(mosquitto):
    config = config_for(mosquitto, "127.0.0.1:1", request_timeout_s=2.0)
    async with running_bridge(config), collecting(mosquitto.url, "moesaic/v1/errors/#") as out:
        await publish(mosquitto.url, (KITTI_TOPIC.format(sensor="s0"), scan_bytes()))
        [error] = await out.wait_for("moesaic/v1/errors/s0")
    assert json.loads(error.payload)["reason"] == "coordinator_unavailable"  # type: ignore[arg-type]


async def test_slow_coordinator_drops_oldest_frames_and_counts_them(mosquitto, echo_coordinator):
    frames = [
        (
            "moesaic/v1/sensors/fast/lidar",
            moesaic_pb2.SensorFrame(
                frame_id=i, encoding="kitti-f32x4", data=scan_bytes(10, i)
            ).SerializeToString(),
        )
        for i in range(12)
    ]
    async with (
        echo_coordinator(delay_s=0.25) as (servicer, address),
        running_bridge(config_for(mosquitto, address)) as bridge,
        collecting(mosquitto.url, "moesaic/v1/results/#") as out,
    ):
        await publish(mosquitto.url, *frames)
        async with asyncio.timeout(10):
            while bridge.stats.received < 12 or bridge.stats.processed + bridge.stats.dropped < 12:
                await asyncio.sleep(0.05)
        await out.wait_for("moesaic/v1/results/fast/bev_segmentation", count=bridge.stats.processed)
    ids = [r.frame_id for r in servicer.requests]
    assert bridge.stats.dropped > 0 and len(ids) == bridge.stats.processed < 12
    assert ids == sorted(ids) and ids[-1] == 11  # the newest frame is never the one dropped
    assert bridge.metrics.registry.get_sample_value(
        "moesaic_mqtt_frames_dropped_total", {"sensor": "fast", "reason": "queue_full"}
    ) == float(bridge.stats.dropped)


async def test_bridge_reconnects_after_broker_restart(mosquitto, echo_coordinator):
    async with (
        echo_coordinator() as (servicer, address),
        running_bridge(config_for(mosquitto, address)) as bridge,
    ):
        async with collecting(mosquitto.url, "moesaic/v1/results/#") as out:
            await publish(mosquitto.url, (KITTI_TOPIC.format(sensor="s0"), scan_bytes()))
            await out.wait_for("moesaic/v1/results/s0/bev_segmentation")
        mosquitto.kill()
        await asyncio.sleep(0.5)
        assert not bridge.connected.is_set()
        mosquitto.start()
        await asyncio.wait_for(bridge.connected.wait(), timeout=15)
        async with collecting(mosquitto.url, "moesaic/v1/results/#", "moesaic/v1/status/#") as out:
            await publish(mosquitto.url, (KITTI_TOPIC.format(sensor="s0"), scan_bytes()))
            await out.wait_for("moesaic/v1/results/s0/bev_segmentation")
            [status] = await out.wait_for("moesaic/v1/status/ingest")
    assert bridge.stats.connects == 2
    assert status.payload == b"online" and status.retain
    assert len(servicer.requests) == 2


async def test_two_bridges_in_one_group_process_each_frame_once(mosquitto, echo_coordinator):
    n = 30
    frames = [
        (
            f"moesaic/v1/sensors/s{i % 3}/lidar",
            moesaic_pb2.SensorFrame(
                frame_id=i, encoding="kitti-f32x4", data=scan_bytes(10, i)
            ).SerializeToString(),
        )
        for i in range(n)
    ]
    async with echo_coordinator() as (servicer, address):
        config = config_for(mosquitto, address, group="g1", queue_depth=n, protocol="5")
        async with (
            running_bridge(config) as first,
            running_bridge(config.model_copy(update={"component": "ingest-2"})) as second,
            collecting(mosquitto.url, "moesaic/v1/results/#") as out,
        ):
            await publish(mosquitto.url, *frames)
            await out.wait_for("moesaic/v1/results/+/bev_segmentation", count=n)
            await asyncio.sleep(0.3)  # a duplicate would arrive now
            results = out.on("moesaic/v1/results/+/bev_segmentation")
    ids = sorted(json.loads(m.payload)["frame_id"] for m in results)  # type: ignore[arg-type]
    assert ids == list(range(n))
    assert sorted(r.frame_id for r in servicer.requests) == list(range(n))
    assert first.stats.processed > 0 and second.stats.processed > 0
    assert first.stats.processed + second.stats.processed == n


async def _stream(url: str, n: int, hz: float, published: list[int], sent_at: dict[int, float]) -> None:
    """Publish frames 1..n at ``hz`` (QoS 1), reconnecting when the broker goes away; a frame
    counts as published only once the broker acknowledged it."""
    host, port = host_port(url)
    frame, period, start = 1, 1.0 / hz, time.monotonic()
    while frame <= n:
        try:
            async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5, timeout=1) as client:
                while frame <= n:
                    await asyncio.sleep(max(0.0, start + frame * period - time.monotonic()))
                    payload = moesaic_pb2.SensorFrame(
                        frame_id=frame, encoding="kitti-f32x4", data=scan_bytes(10)
                    )
                    try:
                        await client.publish(
                            "moesaic/v1/sensors/s0/lidar", payload.SerializeToString(), qos=1, timeout=1
                        )
                        published.append(frame)
                        sent_at[frame] = time.monotonic()
                    finally:
                        frame += 1
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


async def test_every_frame_across_a_broker_restart_is_answered_or_counted(tmp_path, echo_coordinator):
    """Broker restart mid-stream at 10 frames/s: the bridge's persistent session keeps the frames
    queued for it, results come back within 5 s, and sent = answered + errors + dropped + missing
    (a frame the publisher could not hand to the stopping broker shows as a gap: missing)."""
    broker = MosquittoProcess(tmp_path / "mq", persistent=True)
    broker.start()
    published: list[int] = []
    sent_at: dict[int, float] = {}
    try:
        async with (
            echo_coordinator() as (servicer, address),
            running_bridge(config_for(broker, address, queue_depth=200)) as bridge,
        ):
            stream = asyncio.create_task(_stream(broker.url, 80, 10.0, published, sent_at))
            await asyncio.sleep(2.5)
            broker.stop()  # a restart: SIGTERM, the broker saves its store
            await asyncio.sleep(1.0)
            broker.start()
            restarted = time.monotonic()
            await stream
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                answered = {r.frame_id for r in servicer.requests}
                accounted = len(answered) + bridge.stats.errors + bridge.stats.dropped + bridge.stats.missing
                if accounted >= 80:  # every frame sent: answered, or counted as an error, drop or gap
                    break
                await asyncio.sleep(0.1)
            first_after = min(f for f in published if sent_at[f] >= restarted)
            answered_at = {r.frame_id: t for r, t in zip(servicer.requests, servicer.times, strict=True)}
    finally:
        broker.stop()
    answered = {r.frame_id for r in servicer.requests}
    # Every frame the broker acknowledged was answered (the session kept those sent while the
    # bridge was away); every frame the sensor sent is answered or counted somewhere.
    assert published and set(published) <= answered
    stats = bridge.stats
    assert len(answered) + stats.errors + stats.dropped + stats.missing == 80
    assert answered_at[first_after] - restarted < 5.0
    assert bridge.stats.connects == 2


async def test_a_bridge_ending_abnormally_leaves_its_status_offline(mosquitto, echo_coordinator):
    """Fault injection: the serving loop itself fails (not a payload: those have their own error
    boundary). The retained status must not stay `online` behind a clean disconnect."""
    async with echo_coordinator() as (_, address), Bridge(config_for(mosquitto, address)) as bridge:

        def broken(message: aiomqtt.Message) -> None:
            raise RuntimeError("injected fault in the serving loop")

        bridge._on_message = broken  # type: ignore[method-assign]
        task = asyncio.create_task(bridge.run())
        await asyncio.wait_for(bridge.connected.wait(), timeout=10)
        await publish(mosquitto.url, (KITTI_TOPIC.format(sensor="s0"), scan_bytes()))
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(task, timeout=10)
    async with collecting(mosquitto.url, "moesaic/v1/status/#") as out:
        [status] = await out.wait_for("moesaic/v1/status/ingest")
    assert status.payload == b"offline" and status.retain
