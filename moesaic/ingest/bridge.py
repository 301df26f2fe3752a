"""The MQTT bridge: sensor frames in, coordinator calls, JSON results out.

::

    config = load_config(broker="mqtt://127.0.0.1:1883", coordinator="127.0.0.1:50070")
    async with Bridge(config) as bridge:
        await bridge.run()          # until cancelled; reconnects with backoff

Per sensor stream (sensor id + lidar/camera) a :class:`LatestQueue` keeps only the newest
unprocessed frames; one worker per stream sends each frame to the coordinator once per
configured task and publishes every reply. Malformed payloads and failed requests go to
``moesaic/v1/errors/{sensor}`` and the ``moesaic_mqtt_errors`` counter; nothing raises out
of the message loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from moesaic.errors import describe
from moesaic.runtime.engine import MissingExtraError

try:
    import aiomqtt
    from aiomqtt.exceptions import MqttConnectError
except ImportError:
    raise MissingExtraError("aiomqtt", "ingest") from None
from moesaic.ingest.config import IngestConfig
from moesaic.ingest.coordinator_client import CoordinatorClient
from moesaic.ingest.mqtt import connect_options
from moesaic.ingest.payloads import Frame, PayloadError, decode_payload
from moesaic.ingest.queue import LatestQueue
from moesaic.ingest.results import grid_png, result_json
from moesaic.ingest.topics import (
    OFFLINE,
    ONLINE,
    SensorKind,
    error_topic,
    lidar_format_of,
    parse_sensor_topic,
    result_image_topic,
    result_topic,
    sensor_subscriptions,
    status_topic,
)
from moesaic.metrics import Metrics
from moesaic.proto import moesaic_pb2

__all__ = ["Bridge", "BridgeStats"]

log = logging.getLogger(__name__)
_PUBLISH_TIMEOUT_S = 5.0


@dataclass
class BridgeStats:
    """Counters of one bridge since it started (the metrics hold the same, labelled)."""

    received: int = 0
    processed: int = 0
    results: int = 0
    dropped: int = 0
    missing: int = 0
    errors: int = 0
    connects: int = 0
    errors_by_sensor: dict[str, int] = field(default_factory=dict)


class Bridge:
    """MQTT <-> coordinator bridge; an async context manager that owns its gRPC channel."""

    def __init__(self, config: IngestConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(component="ingest")
        self.stats = BridgeStats()
        self.connected = asyncio.Event()
        self._coordinator = CoordinatorClient(
            config.coordinator, timeout_s=config.request_timeout_s, tls=config.coordinator_tls
        )
        self._client: aiomqtt.Client | None = None
        self._queues: dict[tuple[str, SensorKind], LatestQueue[Frame]] = {}
        self._workers: dict[tuple[str, SensorKind], asyncio.Task[None]] = {}
        self._in_flight = asyncio.Semaphore(config.max_in_flight)
        self._background: set[asyncio.Future[bool]] = set()
        self._protocol: aiomqtt.ProtocolVersion | None = {
            "5": aiomqtt.ProtocolVersion.V5,
            "3.1.1": aiomqtt.ProtocolVersion.V311,
            "auto": None,
        }[config.protocol]
        self._client_id = config.client_id or f"moesaic-{config.component}-{socket.gethostname()}"[:64]
        self._last_frame: dict[tuple[str, SensorKind], int] = {}

    async def __aenter__(self) -> Bridge:
        await self._coordinator.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._workers.clear()
        await self._coordinator.__aexit__(*exc)

    # ------------------------------------------------------------------ connection

    async def run(self) -> None:
        """Connect, subscribe and serve until cancelled; reconnect with exponential backoff."""
        delay = self.config.reconnect_min_s
        while True:
            connects = self.stats.connects
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                if self.stats.connects > connects:  # it was up: start the backoff over
                    delay = self.config.reconnect_min_s
                log.warning(
                    "MQTT connection to %s lost or refused (%s); retrying in %.1fs",
                    self.config.broker,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, self.config.reconnect_max_s)

    async def _session(self) -> None:
        protocols = (
            [self._protocol] if self._protocol else [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311]
        )
        for i, protocol in enumerate(protocols):
            client = aiomqtt.Client(
                **connect_options(self.config, client_id=self._client_id, protocol=protocol),
                will=aiomqtt.Will(status_topic(self.config.component), OFFLINE, qos=1, retain=True),
            )
            try:
                await client.__aenter__()
            except MqttConnectError:
                if i + 1 < len(protocols):
                    log.info("broker refused MQTT %s; trying %s", protocol.name, protocols[i + 1].name)
                    continue
                raise
            self._protocol = protocol
            break
        try:
            await self._serve(client)
        finally:
            self._client = None
            self.connected.clear()
            with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError, OSError):
                await asyncio.wait_for(client.__aexit__(None, None, None), timeout=_PUBLISH_TIMEOUT_S)

    async def _serve(self, client: aiomqtt.Client) -> None:
        status = status_topic(self.config.component)
        await client.publish(status, ONLINE, qos=1, retain=True, timeout=_PUBLISH_TIMEOUT_S)
        for topic_filter in sensor_subscriptions(self.config.group, self.config.sensors_filter):
            await client.subscribe(topic_filter, qos=1, timeout=_PUBLISH_TIMEOUT_S)
        self._client = client
        self.stats.connects += 1
        self.connected.set()
        log.info(
            "bridge %s connected to %s (MQTT %s)",
            self._client_id,
            self.config.broker,
            client._client.protocol,
        )
        try:
            async for message in client.messages:
                self._on_message(message)
        except aiomqtt.MqttError:
            raise  # the connection is gone: the broker sends the last will (offline)
        except BaseException:
            # Stopping (cancelled) or ending abnormally: the clean DISCONNECT that follows would
            # suppress the last will, so say offline ourselves first.
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    client.publish(status, OFFLINE, qos=1, retain=True), _PUBLISH_TIMEOUT_S
                )
            raise

    # ------------------------------------------------------------------ frames in

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        try:
            sensor_id, kind = parse_sensor_topic(topic)
        except ValueError:
            log.debug("ignoring message on %s", topic)
            return
        self.stats.received += 1
        try:
            self._accept(sensor_id, kind, message, lidar_format_of(topic))
        except Exception as exc:  # each message has its own error boundary: the bridge lives on
            error = describe(exc)
            self._report_error(sensor_id, error["reason"], error["message"])

    def _accept(
        self, sensor_id: str, kind: SensorKind, message: aiomqtt.Message, lidar_format: str | None = None
    ) -> None:
        payload = (
            message.payload
            if isinstance(message.payload, bytes | bytearray)
            else str(message.payload).encode()
        )
        try:
            frame = decode_payload(
                sensor_id,
                kind,
                payload,
                max_bytes=self.config.max_payload_bytes,
                max_pixels=self.config.max_image_pixels,
                lidar_format=lidar_format,
            )
        except PayloadError as exc:
            self._report_error(sensor_id, exc.reason, str(exc))
            return
        key = (sensor_id, kind)
        self._count_missing(key, frame.frame_id)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = LatestQueue(self.config.queue_depth, on_drop=self._on_drop)
            self._workers[key] = asyncio.create_task(self._worker(queue), name=f"bridge-{sensor_id}-{kind}")
        queue.put(frame)

    def _count_missing(self, key: tuple[str, SensorKind], frame_id: int) -> None:
        """Gaps in a sensor's frame ids are frames lost before the bridge: count them.

        Id 0 (no id, or a sensor counting from 0 again) and ids at or below the last one
        (a redelivery, or a restarted sensor) count nothing and restart the tracking.
        """
        last = self._last_frame.get(key)
        if last is not None and frame_id > last + 1 and last > 0:
            gap = frame_id - last - 1
            self.stats.missing += gap
            self.metrics.frames_missing.labels(sensor=key[0]).inc(gap)
        if last is None or frame_id > last or frame_id == 0 or frame_id < last - 1000:
            self._last_frame[key] = frame_id

    def _on_drop(self, frame: Frame) -> None:
        self.stats.dropped += 1
        self.metrics.frames_dropped.labels(sensor=frame.sensor_id, reason="queue_full").inc()

    async def _worker(self, queue: LatestQueue[Frame]) -> None:
        while True:
            frame = await queue.get()
            try:
                async with self._in_flight:
                    await self._process(frame)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad frame never stops the stream
                error = describe(exc)
                self._report_error(frame.sensor_id, error["reason"], error["message"], frame=frame)
            self.stats.processed += 1

    # ------------------------------------------------------------------ coordinator

    async def _process(self, frame: Frame) -> None:
        stream = self.config.stream(frame.sensor_id, frame.kind)
        budget = frame.budget or moesaic_pb2.Budget(
            latency_ms=stream.budget.latency_ms, energy_mj=stream.budget.energy_mj
        )
        await asyncio.gather(
            *(self._perceive(frame, task, budget, stream.options, stream.png) for task in stream.tasks)
        )

    async def _perceive(
        self, frame: Frame, task: str, budget: moesaic_pb2.Budget, options: dict[str, str], png: bool
    ) -> None:
        request = moesaic_pb2.PerceiveRequest(
            task=task,
            budget=budget,
            sensor_id=frame.sensor_id,
            timestamp=frame.timestamp,
            frame_id=frame.frame_id,
            options=options,
        )
        if frame.points is not None:
            request.points.CopyFrom(frame.points)
        elif frame.image is not None:
            request.image.CopyFrom(frame.image)
        try:
            response = await self._coordinator.perceive(request)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name.lower()
            self.metrics.requests.labels(method="Perceive", code=exc.code().name).inc()
            self._report_error(
                frame.sensor_id, f"coordinator_{code}", exc.details() or code, task=task, frame=frame
            )
            return
        self.metrics.requests.labels(method="Perceive", code="OK").inc()
        if response.error:
            self._report_error(frame.sensor_id, "coordinator_error", response.error, task=task, frame=frame)
            return
        bridge_ms = (time.monotonic() - frame.received) * 1e3
        try:
            body = result_json(frame, response, budget, bridge_ms=bridge_ms)
            image = grid_png(response) if png else None
        except ValueError as exc:
            self._report_error(frame.sensor_id, "bad_result", str(exc), task=task, frame=frame)
            return
        await self._publish(result_topic(frame.sensor_id, task), body, sensor=frame.sensor_id)
        if image is not None:
            await self._publish(result_image_topic(frame.sensor_id, task), image, sensor=frame.sensor_id)
        self.stats.results += 1

    # ------------------------------------------------------------------ out

    async def _publish(self, topic: str, payload: bytes, *, sensor: str, count_errors: bool = True) -> bool:
        client = self._client
        if client is None:
            if count_errors:
                self.metrics.mqtt_errors.labels(sensor=sensor, reason="publish_disconnected").inc()
            return False
        try:
            await client.publish(topic, payload, qos=1, timeout=_PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            log.warning("publishing to %s failed: %s", topic, exc)
            if count_errors:
                self.metrics.mqtt_errors.labels(sensor=sensor, reason="publish_failed").inc()
            return False
        return True

    def _report_error(
        self, sensor_id: str, reason: str, detail: str, *, task: str | None = None, frame: Frame | None = None
    ) -> None:
        self.stats.errors += 1
        count = self.stats.errors_by_sensor[sensor_id] = self.stats.errors_by_sensor.get(sensor_id, 0) + 1
        self.metrics.mqtt_errors.labels(sensor=sensor_id, reason=reason).inc()
        log.info("sensor %s: %s: %s", sensor_id, reason, detail)
        body: dict[str, Any] = {"sensor": sensor_id, "reason": reason, "detail": detail[:500], "count": count}
        if task:
            body["task"] = task
        if frame is not None:
            body.update(frame_id=frame.frame_id, timestamp=frame.timestamp)
        payload = json.dumps(body).encode()
        publish = asyncio.ensure_future(
            self._publish(error_topic(sensor_id), payload, sensor=sensor_id, count_errors=False)
        )
        self._background.add(publish)
        publish.add_done_callback(self._background.discard)
