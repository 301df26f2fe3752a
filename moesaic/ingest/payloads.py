"""Decoding of MQTT sensor payloads into frames the coordinator accepts.

A LiDAR payload is a ``moesaic.v1.SensorFrame`` (its ``encoding`` names the point format) or
raw little-endian float32 records in a format the topic declares (``lidar_format``:
``kitti-f32x4`` = x, y, z, intensity; ``nuscenes-f32x5`` = the same plus the ring index); raw
records with no declared format are refused (``format_undeclared``), never guessed. A camera
payload is JPEG or PNG bytes or a SensorFrame. Anything else raises :class:`PayloadError`
with a short machine-readable ``reason`` (published on the error topic and counted) and a
human-readable message.

>>> import numpy as np
>>> scan = np.zeros((3, 5), "<f4").tobytes()
>>> frame = decode_payload("s0", "lidar", scan, received=0.0, lidar_format="nuscenes-f32x5")
>>> frame.points.fields, len(frame.points.data)
(5, 60)
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from moesaic.ingest.topics import SensorKind
from moesaic.proto import moesaic_pb2

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_PAYLOAD_BYTES", "Frame", "PayloadError", "decode_payload"]

DEFAULT_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
"""Images declaring more pixels are refused from their header, before any decoding."""
_LIDAR_FIELDS = {"kitti-f32x4": 4, "nuscenes-f32x5": 5}
_IMAGE_ENCODINGS = ("jpeg", "png", "rgb8")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PayloadError(ValueError):
    """A sensor payload that cannot become a request; ``reason`` is a short slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Frame:
    """One decoded sensor frame, ready to become ``PerceiveRequest`` inputs."""

    sensor_id: str
    kind: SensorKind
    received: float
    """``time.monotonic()`` when the payload arrived."""
    timestamp: float
    """Sensor timestamp (seconds since the epoch); arrival wall time when the payload has none."""
    frame_id: int = 0
    budget: moesaic_pb2.Budget | None = None
    points: moesaic_pb2.PointCloud | None = None
    image: moesaic_pb2.Image | None = None
    size: int = field(default=0)
    """Payload size in bytes."""


def decode_payload(
    sensor_id: str,
    kind: SensorKind,
    payload: bytes,
    *,
    received: float | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    lidar_format: str | None = None,
) -> Frame:
    """Decode one payload of a ``kind`` sensor; :class:`PayloadError` when it is malformed.

    ``lidar_format``: the raw point format the payload's topic declares (``kitti-f32x4`` or
    ``nuscenes-f32x5``); a SensorFrame's encoding must agree with it.
    """
    received = time.monotonic() if received is None else received
    if not payload:
        raise PayloadError("empty", f"{kind} payload is empty")
    if len(payload) > max_bytes:
        raise PayloadError("too_large", f"{kind} payload is {len(payload)} bytes; the limit is {max_bytes}")
    frame = Frame(sensor_id, kind, received, timestamp=time.time(), size=len(payload))
    envelope = _sensor_frame(payload, kind)
    if envelope is not None:
        if lidar_format is not None and envelope.encoding != lidar_format:
            raise PayloadError(
                "wrong_encoding",
                f"SensorFrame.encoding {envelope.encoding!r} on a topic declaring {lidar_format!r}",
            )
        _apply_envelope(frame, envelope, max_pixels)
    elif kind == "lidar":
        if lidar_format not in _LIDAR_FIELDS:
            raise PayloadError(
                "format_undeclared",
                f"raw point cloud from sensor {sensor_id!r} without a declared format: publish it on "
                f"moesaic/v1/sensors/{sensor_id}/lidar/kitti-f32x4 (x, y, z, intensity) or "
                ".../lidar/nuscenes-f32x5 (x, y, z, intensity, ring), or as a moesaic.v1.SensorFrame "
                "whose encoding names the format",
            )
        frame.points = _point_cloud(payload, fields=_LIDAR_FIELDS[lidar_format])
    else:
        frame.image = _encoded_image(payload, max_pixels=max_pixels)
    return frame


def _sensor_frame(payload: bytes, kind: SensorKind) -> moesaic_pb2.SensorFrame | None:
    """The payload as a SensorFrame when it clearly is one (known encoding, data present)."""
    if kind == "camera" and (payload.startswith(_JPEG_MAGIC) or payload.startswith(_PNG_MAGIC)):
        return None
    message = moesaic_pb2.SensorFrame()
    try:
        message.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError):
        return None
    if not message.data or message.encoding not in (*_LIDAR_FIELDS, *_IMAGE_ENCODINGS):
        return None
    return message


def _apply_envelope(frame: Frame, envelope: moesaic_pb2.SensorFrame, max_pixels: int) -> None:
    if envelope.timestamp:
        if not math.isfinite(envelope.timestamp) or envelope.timestamp < 0:
            raise PayloadError(
                "bad_timestamp", f"SensorFrame.timestamp must be finite and >= 0, got {envelope.timestamp}"
            )
        frame.timestamp = envelope.timestamp
    frame.frame_id = envelope.frame_id
    if envelope.HasField("budget"):
        b = envelope.budget
        if (
            not (math.isfinite(b.latency_ms) and math.isfinite(b.energy_mj))
            or b.latency_ms < 0
            or b.energy_mj < 0
        ):
            raise PayloadError(
                "bad_budget", "SensorFrame.budget latency_ms and energy_mj must be finite and >= 0"
            )
        frame.budget = b
    encoding = envelope.encoding
    if frame.kind == "lidar":
        if encoding not in _LIDAR_FIELDS:
            raise PayloadError(
                "wrong_encoding",
                f"SensorFrame.encoding {encoding!r} on a lidar topic; expected one of {list(_LIDAR_FIELDS)}",
            )
        frame.points = _point_cloud(envelope.data, fields=_LIDAR_FIELDS[encoding])
        return
    if encoding not in _IMAGE_ENCODINGS:
        raise PayloadError(
            "wrong_encoding",
            f"SensorFrame.encoding {encoding!r} on a camera topic; expected one of {list(_IMAGE_ENCODINGS)}",
        )
    if encoding == "rgb8":
        w, h = envelope.width, envelope.height
        if w * h > max_pixels:
            raise PayloadError(
                "too_many_pixels", f"SensorFrame rgb8 {w}x{h} pixels; the limit is {max_pixels}"
            )
        if w <= 0 or h <= 0 or len(envelope.data) != w * h * 3:
            raise PayloadError(
                "bad_image",
                f"SensorFrame rgb8 data is {len(envelope.data)} bytes; width*height*3 = {abs(w * h) * 3}",
            )
        frame.image = moesaic_pb2.Image(data=envelope.data, encoding="rgb8", width=w, height=h)
        return
    frame.image = _encoded_image(envelope.data, expected=encoding, max_pixels=max_pixels)


def _point_cloud(data: bytes, *, fields: int) -> moesaic_pb2.PointCloud:
    record = 4 * fields
    if len(data) % record:
        raise PayloadError(
            "bad_points",
            f"lidar payload is {len(data)} bytes, not a whole number of {record}-byte records "
            f"({fields} x float32)",
        )
    values = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(values).all():
        raise PayloadError("bad_points", "lidar payload holds NaN or infinite values")
    return moesaic_pb2.PointCloud(data=data, fields=fields)


def _encoded_image(data: bytes, expected: str | None = None, *, max_pixels: int) -> moesaic_pb2.Image:
    if data.startswith(_JPEG_MAGIC):
        encoding = "jpeg"
    elif data.startswith(_PNG_MAGIC):
        encoding = "png"
    else:
        raise PayloadError("bad_image", "camera payload is neither JPEG nor PNG nor a moesaic.v1.SensorFrame")
    if expected and expected != encoding:
        raise PayloadError("bad_image", f"SensorFrame.encoding says {expected!r} but the data is {encoding}")
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                width, height = img.size
                if width * height > max_pixels:
                    raise PayloadError(
                        "too_many_pixels",
                        f"camera payload declares {width}x{height} pixels; the limit is {max_pixels}",
                    )
                img.verify()
    except Image.DecompressionBombError:
        raise PayloadError(
            "too_many_pixels", f"camera payload declares more than {max_pixels} pixels (a decompression bomb)"
        ) from None
    except (UnidentifiedImageError, ImportError):  # ImportError: ultralytics' patched open
        raise PayloadError("bad_image", f"camera payload is not a readable {encoding}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PayloadError("bad_image", f"camera payload is a broken {encoding}: {exc}") from None
    return moesaic_pb2.Image(data=data, encoding=encoding, width=width, height=height)
