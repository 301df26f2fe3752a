"""What the dashboard shows, as one model fed by messages: pure, no I/O, so tests feed it.

The MQTT feed hands it results, grid PNGs, camera frames, statuses and errors; the pollers
hand it node descriptions, metrics and health. Pages get :meth:`FleetState.snapshot` once
and then every :meth:`FleetState.drain` (what changed since the last one)::

    state = FleetState(history_s=300)
    state.on_message("moesaic/v1/results/s0/detection", payload, now=time.time())
    page = state.snapshot()     # everything, for a page that just connected
    patch = state.drain()       # the changes since the last drain; None when nothing changed

Chart samples and errors carry a sequence number, so a page that got a snapshot ignores the
samples a following patch repeats. Every string from the wire is cut to a bounded length;
payloads that are not what their topic says are counted, never raised.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from moesaic.dashboard.streams import Stream, TaskKey, number, text
from moesaic.ingest.payloads import PayloadError, decode_payload
from moesaic.ingest.topics import (
    ONLINE,
    parse_error_topic,
    parse_result_topic,
    parse_sensor_topic,
    parse_status_topic,
)

__all__ = ["MAX_IMAGE_PIXELS", "MAX_STREAMS", "Camera", "CameraFrame", "FleetState", "GridImage"]

MAX_JSON_BYTES = 1 << 20
MAX_IMAGE_BYTES = 16 << 20
MAX_IMAGE_PIXELS = 16_000_000
"""Images the page would be asked to decode are refused above this, from their header."""
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_RECENT_FRAMES = 32
_RECENT_BYTES = 64 << 20
"""A camera keeps its recent frames (to pair with their detections) up to these bounds."""
_FRESH_RESULT_S = 5.0
MAX_STREAMS = 256
"""Task streams, grid images and cameras followed at most: more (a misbehaving publisher
inventing sensor ids) are counted as ignored instead of growing without bound."""


@dataclass
class GridImage:
    """The latest PNG of a grid result (BEV segmentation or reconstruction) of one sensor."""

    sensor: str
    task: str
    data: bytes
    width: int
    height: int
    received: float
    version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "sensor": self.sensor,
            "task": self.task,
            "width": self.width,
            "height": self.height,
            "received": self.received,
            "version": self.version,
            "url": f"/api/bev/{self.sensor}/{self.task}.png?v={self.version}",
        }


@dataclass
class CameraFrame:
    data: bytes
    encoding: str
    """``jpeg``, ``png`` or ``rgb8`` (turned into PNG when shown)."""
    width: int
    height: int
    frame_id: int
    received: float


@dataclass
class Camera:
    """One camera: its recent frames (by frame id) and the frame shown with its detections."""

    sensor: str
    recent: OrderedDict[int, CameraFrame] = field(default_factory=OrderedDict)
    shown: CameraFrame | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    task: str = ""
    version: int = 0
    matched_at: float = -math.inf
    frames: int = 0

    @property
    def content_type(self) -> str:
        return "image/jpeg" if self.shown is not None and self.shown.encoding == "jpeg" else "image/png"

    def image_bytes(self) -> bytes | None:
        """The shown frame as JPEG or PNG bytes (raw RGB frames are encoded once, here)."""
        frame = self.shown
        if frame is None:
            return None
        if frame.encoding == "rgb8":
            from PIL import Image

            buffer = io.BytesIO()
            Image.frombytes("RGB", (frame.width, frame.height), frame.data).save(buffer, format="PNG")
            frame.data, frame.encoding = buffer.getvalue(), "png"
        return frame.data

    def to_json(self) -> dict[str, Any]:
        shown = self.shown
        return {
            "sensor": self.sensor,
            "version": self.version,
            "frames": self.frames,
            "task": self.task,
            "frame_id": shown.frame_id if shown else None,
            "width": shown.width if shown else 0,
            "height": shown.height if shown else 0,
            "received": shown.received if shown else None,
            "boxes": self.boxes,
            "url": f"/api/camera/{self.sensor}?v={self.version}" if shown else None,
        }


class FleetState:
    """Nodes, components, task streams, images and errors of one fleet, as the page shows them."""

    def __init__(self, *, history_s: float = 300.0, max_errors: int = 50) -> None:
        self.history_s = history_s
        self.streams: dict[TaskKey, Stream] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.components: dict[str, dict[str, Any]] = {}
        self.images: dict[tuple[str, str], GridImage] = {}
        self.cameras: dict[str, Camera] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=max_errors)
        self.ignored: dict[str, int] = {}
        """Messages the dashboard could not read, by reason (shown, never raised)."""
        self._seq = 0
        self._dirty: set[tuple[str, Any]] = set()
        self._errors_sent = 0

    # ------------------------------------------------------------------ MQTT in

    def on_message(self, topic: str, payload: bytes, *, now: float) -> None:
        """Route one MQTT message by its topic; unreadable ones are counted in ``ignored``."""
        try:
            if topic.startswith("moesaic/v1/results/"):
                sensor, task, png = parse_result_topic(topic)
                if png:
                    self.on_grid_image(sensor, task, payload, now=now)
                else:
                    self.on_result(sensor, task, payload, now=now)
            elif topic.startswith("moesaic/v1/status/"):
                self.on_status(parse_status_topic(topic), payload, now=now)
            elif topic.startswith("moesaic/v1/errors/"):
                self.on_error(parse_error_topic(topic), payload, now=now)
            elif topic.startswith("moesaic/v1/sensors/"):
                sensor, kind = parse_sensor_topic(topic)
                if kind == "camera":
                    self.on_camera_frame(sensor, payload, now=now)
            else:
                self._ignore("unknown_topic")
        except ValueError:
            self._ignore("bad_topic")

    def _ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
        self._dirty.add(("meta", None))

    def _json(self, payload: bytes, what: str) -> dict[str, Any] | None:
        if len(payload) > MAX_JSON_BYTES:
            self._ignore(f"{what}_too_large")
            return None
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            self._ignore(f"{what}_not_json")
            return None
        if not isinstance(body, dict):
            self._ignore(f"{what}_not_object")
            return None
        return body

    def on_result(self, sensor: str, task: str, payload: bytes, *, now: float) -> None:
        """A result JSON of ``results/{sensor}/{task}`` (format: :mod:`moesaic.ingest.results`)."""
        body = self._json(payload, "result")
        if body is None:
            return
        key = TaskKey(sensor, task)
        stream = self.streams.get(key)
        if stream is None:
            if len(self.streams) >= MAX_STREAMS:
                self._ignore("too_many_streams")
                return
            stream = self.streams[key] = Stream(sensor, task)
        self._seq += 1
        stream.add(body, now=now, seq=self._seq, history_s=self.history_s)
        self._dirty.add(("stream", key))
        output = body.get("output")
        if isinstance(output, dict) and output.get("type") == "detections":
            self._match_detections(sensor, task, body, output, now=now)

    def on_grid_image(self, sensor: str, task: str, payload: bytes, *, now: float) -> None:
        """The PNG of a grid result; refused (counted) unless a PNG of at most MAX_IMAGE_PIXELS."""
        if not payload.startswith(_PNG_MAGIC) or len(payload) > MAX_IMAGE_BYTES:
            self._ignore("grid_png_invalid")
            return
        size = _image_size(payload)
        if size is None:
            self._ignore("grid_png_invalid")
            return
        key = (sensor, task)
        previous = self.images.get(key)
        if previous is None and len(self.images) >= MAX_STREAMS:
            self._ignore("too_many_streams")
            return
        version = previous.version + 1 if previous else 1
        self.images[key] = GridImage(sensor, task, bytes(payload), size[0], size[1], now, version)
        self._dirty.add(("image", key))

    def on_camera_frame(self, sensor: str, payload: bytes, *, now: float) -> None:
        """A camera frame (JPEG, PNG or SensorFrame), kept until its detections arrive."""
        try:
            frame = decode_payload(
                sensor, "camera", payload, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS
            )
        except PayloadError:
            self._ignore("camera_frame_invalid")
            return
        image = frame.image
        if image is None:
            return
        camera = self.cameras.get(sensor)
        if camera is None:
            if len(self.cameras) >= MAX_STREAMS:
                self._ignore("too_many_streams")
                return
            camera = self.cameras[sensor] = Camera(sensor)
        kept = CameraFrame(bytes(image.data), image.encoding, image.width, image.height, frame.frame_id, now)
        camera.recent[frame.frame_id] = kept
        camera.recent.move_to_end(frame.frame_id)
        while len(camera.recent) > 1 and (
            len(camera.recent) > _RECENT_FRAMES
            or sum(len(f.data) for f in camera.recent.values()) > _RECENT_BYTES
        ):
            camera.recent.popitem(last=False)
        camera.frames += 1
        if now - camera.matched_at > _FRESH_RESULT_S:  # no detections lately: show the camera is live
            camera.shown, camera.boxes, camera.task = kept, [], ""
            camera.version += 1
            self._dirty.add(("camera", sensor))

    def _match_detections(
        self, sensor: str, task: str, body: dict[str, Any], output: dict[str, Any], *, now: float
    ) -> None:
        camera = self.cameras.get(sensor)
        if camera is None or not camera.recent:
            return
        frame_id = body.get("frame_id")
        frame = camera.recent.get(frame_id) if isinstance(frame_id, int) else None
        if frame is None and frame_id in (0, None):  # frames without ids: the latest one
            frame = next(reversed(camera.recent.values()))
        if frame is None:
            return
        items = output.get("items")
        boxes = []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            xyxy = item.get("xyxy")
            coords = [number(v) for v in xyxy] if isinstance(xyxy, list) and len(xyxy) == 4 else []
            if len(coords) != 4 or any(c is None for c in coords):
                continue
            boxes.append(
                {
                    "xyxy": coords,
                    "score": number(item.get("score")),
                    "label": text(item.get("class_name"), 60) or text(item.get("class_id"), 20),
                }
            )
            if len(boxes) >= 500:
                break
        camera.shown, camera.boxes, camera.task = frame, boxes, task
        camera.matched_at = now
        camera.version += 1
        self._dirty.add(("camera", sensor))

    def on_status(self, component: str, payload: bytes, *, now: float) -> None:
        """A retained ``online`` / ``offline`` of a component."""
        status = text(payload.decode("utf-8", "replace"), 40)
        entry = self.components.setdefault(component, {"name": component})
        entry.update(status=status, online=status == ONLINE, status_at=now)
        self._dirty.add(("component", component))

    def on_error(self, sensor: str, payload: bytes, *, now: float) -> None:
        """An error JSON of ``errors/{sensor}``: reason, detail, count, task?, frame_id?."""
        body = self._json(payload, "error")
        if body is None:
            return
        self._seq += 1
        error = {
            "seq": self._seq,
            "t": now,
            "sensor": sensor,
            "reason": text(body.get("reason"), 80),
            "detail": text(body.get("detail"), 500),
            "task": text(body.get("task"), 128),
            "frame_id": body.get("frame_id") if isinstance(body.get("frame_id"), int) else None,
            "count": body.get("count") if isinstance(body.get("count"), int) else None,
        }
        self.errors.append(error)
        task = error["task"]
        stream = self.streams.get(TaskKey(sensor, task)) if isinstance(task, str) and task else None
        if stream is not None:
            stream.last_error = error
            self._dirty.add(("stream", stream.key))
        self._dirty.add(("errors", None))

    # ------------------------------------------------------------------ pollers in

    def update_node(
        self,
        key: str,
        *,
        name: str | None = None,
        address: str | None = None,
        description: dict[str, Any] | None = None,
        error: str | None = None,
        now: float,
    ) -> None:
        """A node's Describe (``description``) or its failure (``error``). ``key`` is stable (its
        address); ``name`` is what the page shows (the configured name, else Describe's node_id)."""
        node = self.nodes.setdefault(
            key, {"key": key, "name": name or key, "health": "unknown", "models": []}
        )
        if name:
            node["name"] = name
            orphan = self.nodes.pop(f"metrics:{name}", None) if key != f"metrics:{name}" else None
            if orphan is not None:  # its metrics came before its first Describe: one node
                node.setdefault("metrics_models", orphan.get("metrics_models", []))
                self._dirty.discard(("node", f"metrics:{name}"))
                self._dirty.add(("node_removed", f"metrics:{name}"))
        if address is not None:
            node["address"] = address
        if description is not None:
            node.update(description)
            models = description.get("models", [])
            ready = [m for m in models if m.get("ready")]
            node["health"] = "serving" if models and len(ready) == len(models) else "degraded"
            node["error"] = ""
            node["described_at"] = now
        elif error is not None:
            node["health"] = "down"
            node["error"] = text(error, 300)
        self._dirty.add(("node", key))

    def node_metrics(self, name: str, models: list[dict[str, Any]], *, now: float) -> None:
        """The models a node's metrics list (``moesaic_model_info``): on the node of that name, or on
        a node of its own when none is described."""
        key = next((k for k, n in self.nodes.items() if n.get("name") == name), f"metrics:{name}")
        node = self.nodes.setdefault(key, {"key": key, "name": name, "health": "unknown", "models": []})
        node["metrics_models"] = models
        node["metrics_at"] = now
        if "described_at" not in node:
            node["health"] = "metrics only"
        self._dirty.add(("node", key))

    def update_component(self, name: str, *, now: float, **fields: Any) -> None:
        """Health or metrics of a component (``metrics=...``, ``health=...``, ``error=...``)."""
        entry = self.components.setdefault(name, {"name": name})
        entry.update(fields, updated=now)
        self._dirty.add(("component", name))

    # ------------------------------------------------------------------ out

    def tasks(self) -> dict[str, dict[str, int]]:
        """Per task (all sensors): results and how many met their budget."""
        out: dict[str, dict[str, int]] = {}
        for stream in self.streams.values():
            entry = out.setdefault(stream.task, {"results": 0, "met": 0})
            entry["results"] += stream.results
            entry["met"] += stream.met
        return out

    def snapshot(self, *, now: float | None = None) -> dict[str, Any]:
        """Everything, for a page that just connected (chart samples included)."""
        if now is not None:
            for stream in self.streams.values():
                stream.trim(now, self.history_s)
        return {
            "type": "snapshot",
            "t": now,
            "history_s": self.history_s,
            "streams": [s.to_json(samples_after=0) for s in self.streams.values()],
            "nodes": list(self.nodes.values()),
            "components": list(self.components.values()),
            "images": [i.to_json() for i in self.images.values()],
            "cameras": [c.to_json() for c in self.cameras.values()],
            "errors": list(self.errors),
            "tasks": self.tasks(),
            "ignored": dict(self.ignored),
        }

    def drain(self, *, now: float | None = None) -> dict[str, Any] | None:
        """What changed since the last drain (new samples and errors only); None when nothing did."""
        if not self._dirty:
            return None
        dirty, self._dirty = self._dirty, set()
        patch: dict[str, Any] = {"type": "patch", "t": now}

        def picked(kind: str) -> list[Any]:
            return [key for k, key in dirty if k == kind]

        if keys := picked("stream"):
            patch["streams"] = [self.streams[k].drain_json() for k in keys if k in self.streams]
            patch["tasks"] = self.tasks()
        if names := picked("node"):
            patch["nodes"] = [self.nodes[n] for n in names if n in self.nodes]
        if keys := picked("node_removed"):
            patch["removed_nodes"] = keys
        if names := picked("component"):
            patch["components"] = [self.components[n] for n in names if n in self.components]
        if keys := picked("image"):
            patch["images"] = [self.images[k].to_json() for k in keys if k in self.images]
        if names := picked("camera"):
            patch["cameras"] = [self.cameras[n].to_json() for n in names if n in self.cameras]
        if ("errors", None) in dirty:
            patch["errors"] = [e for e in self.errors if e["seq"] > self._errors_sent]
            if self.errors:
                self._errors_sent = self.errors[-1]["seq"]
        if ("meta", None) in dirty:
            patch["ignored"] = dict(self.ignored)
        return patch

    def grid_png(self, sensor: str, task: str) -> bytes | None:
        image = self.images.get((sensor, task))
        return image.data if image else None

    def camera_image(self, sensor: str) -> tuple[bytes, str] | None:
        camera = self.cameras.get(sensor)
        data = camera.image_bytes() if camera else None
        return (data, camera.content_type) if camera and data is not None else None


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header; None when unreadable or over MAX_IMAGE_PIXELS."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (OSError, SyntaxError, ValueError, ImportError, Image.DecompressionBombError):
        return None
    return (width, height) if 0 < width * height <= MAX_IMAGE_PIXELS else None
