"""The demo's sensors and its results subscriber, over MQTT.

:class:`Replay` publishes the LiDAR scans and camera frames in a loop at sensor rate, each in
a ``SensorFrame`` with the next budget of :data:`LIDAR_BUDGETS` / :data:`CAMERA_BUDGETS`,
and folds every result and error the bridge publishes into the :class:`Ledger` (figures) and
the :class:`Samples` (report images). Every topic comes from :mod:`moesaic.ingest.topics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from moesaic.demo.report import Samples
from moesaic.demo.summary import Ledger
from moesaic.ingest.topics import (
    ONLINE,
    SensorKind,
    monitor_subscriptions,
    parse_error_topic,
    parse_result_topic,
    parse_status_topic,
    sensor_topic,
)

__all__ = ["CAMERA_BUDGETS", "CAMERA_SENSOR", "LIDAR_BUDGETS", "LIDAR_SENSOR", "Replay"]

log = logging.getLogger(__name__)

LIDAR_SENSOR = "roof-lidar"
CAMERA_SENSOR = "front-camera"
# Per-request budgets the replay cycles through: (latency ms, energy mJ); 0 = unbounded. Sized
# for the shipped CPU experts on the 2-core VM running the whole fleet, where one call costs
# (coordinator-measured p50, energy estimate): ppn-rec-small 170-260 ms / 1.1-1.6 J,
# ppn-seg-small 230-330 ms / 1.5-2 J, yolo-n 130-190 ms / ~1 J, yolo-n-640 ~500 ms / 4-8 J.
# LiDAR: every budget admits its task's one model (predicted at a high quantile of its latency)
# except 100 ms, which fits none on purpose (infeasible frames).
# Camera: the loose budget admits yolo-n-640 (the trained gate's choice: far better on small
# objects), the tight and the energy-bound ones only yolo-n.
LIDAR_BUDGETS = ((600.0, 0.0), (100.0, 0.0), (800.0, 4000.0), (500.0, 0.0))
CAMERA_BUDGETS = ((1200.0, 0.0), (300.0, 0.0), (1200.0, 2500.0))
_MAX_ERROR_EXAMPLES = 5
_T = TypeVar("_T")


class Replay:
    """One replay: publishers, the results subscriber, and what they saw."""

    def __init__(
        self,
        ledger: Ledger,
        samples: Samples,
        *,
        lidar: list[Path],
        camera: list[Path],
        lidar_hz: float,
        camera_hz: float,
    ) -> None:
        self.ledger = ledger
        self.samples = samples
        self.lidar = lidar
        self.camera = camera
        self.lidar_hz = lidar_hz
        self.camera_hz = camera_hz
        self.last: dict[str, dict[str, Any]] = {}
        """The latest result of each task (the live table)."""
        self.error_examples: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        """Every counted result, without its output (``results.jsonl``)."""
        self.online = asyncio.Event()
        self.started = time.monotonic()
        """When the first frame was published."""

    async def run(
        self,
        client: Any,
        *,
        duration: float,
        tick: Callable[[], Awaitable[None]],
        until_online: Callable[[asyncio.Event], Awaitable[None]],
    ) -> None:
        """Subscribe, wait for the bridge (``until_online``), replay ``duration`` seconds calling
        ``tick`` every quarter second, then wait (up to 5 s) for the answers still in flight."""
        import aiomqtt

        for topic_filter in monitor_subscriptions(camera_frames=False):  # results, PNGs, status, errors
            await client.subscribe(topic_filter, qos=1)
        receiver = asyncio.create_task(self._receive(client))
        try:
            await until_online(self.online)
            stop = asyncio.Event()
            self.started = time.monotonic()
            publishers = [
                asyncio.create_task(self._publish(client, stop, LIDAR_SENSOR, "lidar")),
                asyncio.create_task(self._publish(client, stop, CAMERA_SENSOR, "camera")),
            ]
            end = time.monotonic() + duration
            while time.monotonic() < end:
                await asyncio.sleep(0.25)
                await tick()
            await self._stop_publishing(stop, publishers)
            await self._drain(tick)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(receiver, 5)

    @staticmethod
    async def _stop_publishing(stop: asyncio.Event, publishers: list[asyncio.Task[None]]) -> None:
        """End the replay: the publishers see ``stop`` at their next frame, and are cancelled too;
        neither alone is trusted to end a publish stuck in the MQTT client."""
        stop.set()
        for task in publishers:
            task.cancel()
        _, pending = await asyncio.wait(publishers, timeout=5)
        if pending:
            log.warning("%d publisher(s) did not stop within 5 s", len(pending))

    async def _drain(self, tick: Callable[[], Awaitable[None]]) -> None:
        """Wait (up to 5 s) until no more answers arrive for the frames still in flight."""
        deadline = time.monotonic() + 5
        last = -1
        while time.monotonic() < deadline:
            count = sum(len(t.results) + len(t.errors) for t in self.ledger.tasks.values())
            if count == last:
                break
            last = count
            await asyncio.sleep(1.0)
            await tick()

    async def _receive(self, client: Any) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            try:
                self._dispatch(topic, bytes(message.payload))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("unreadable message on %s: %s", topic, exc)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if (result := _parsed(parse_result_topic, topic)) is not None:
            self._on_result(*result, payload)
        elif _parsed(parse_error_topic, topic) is not None:
            self._on_error(payload)
        elif _parsed(parse_status_topic, topic) == "ingest" and payload == ONLINE.encode():
            self.online.set()

    def _on_result(self, sensor: str, task: str, png: bool, payload: bytes) -> None:
        if png:
            self.samples.png(sensor, task, payload)
            return
        body = json.loads(payload)
        if self.ledger.result(body):
            self.last[task] = body
            self.samples.result(body)
            self.received.append({k: v for k, v in body.items() if k != "output"})

    def _on_error(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = {"reason": "unparsable error message"}
        if not isinstance(body, dict):
            body = {"reason": "unparsable error message"}
        self.ledger.error(body)
        if len(self.error_examples) < _MAX_ERROR_EXAMPLES:
            self.error_examples.append(body)

    async def _publish(self, client: Any, stop: asyncio.Event, sensor: str, kind: SensorKind) -> None:
        """Publish the frames of ``kind`` in a loop at its rate, each with the next budget."""
        from moesaic.proto import moesaic_pb2

        files = self.lidar if kind == "lidar" else self.camera
        if not files:
            return
        frames = [p.read_bytes() for p in files]
        budgets = LIDAR_BUDGETS if kind == "lidar" else CAMERA_BUDGETS
        period = 1.0 / (self.lidar_hz if kind == "lidar" else self.camera_hz)
        topic = sensor_topic(sensor, kind)
        start = time.monotonic()
        # Frame ids count from 1: the bridge reads id 0 as "no id".
        for i, (data, (latency, energy)) in enumerate(
            zip(itertools.cycle(frames), itertools.cycle(budgets)), start=1
        ):
            if stop.is_set():
                return
            frame = moesaic_pb2.SensorFrame(
                timestamp=time.time(),
                frame_id=i,
                encoding=_encoding(kind, data),
                data=data,
                budget=moesaic_pb2.Budget(latency_ms=latency, energy_mj=energy),
            )
            self.ledger.published(sensor, i)
            self.samples.published(sensor, kind, i, data if kind == "camera" else None)
            await client.publish(topic, frame.SerializeToString(), qos=0, timeout=5)
            await asyncio.sleep(max(0.0, start + i * period - time.monotonic()))


def _parsed(parse: Callable[[str], _T], topic: str) -> _T | None:
    """``parse(topic)``, or None when the topic is not of that kind."""
    try:
        return parse(topic)
    except ValueError:
        return None


def _encoding(kind: str, data: bytes) -> str:
    if kind == "lidar":
        return "kitti-f32x4"
    return "png" if data.startswith(b"\x89PNG") else "jpeg"
