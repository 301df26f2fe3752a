"""The one MQTT topic convention of moesaic. Every topic string is built or parsed here.

===========================================  ====  =======  =========================================
topic                                        qos   retain   payload
===========================================  ====  =======  =========================================
``moesaic/v1/sensors/{sensor_id}/lidar``     any   no       SensorFrame (its encoding says the format)
``moesaic/v1/sensors/{id}/lidar/{format}``   any   no       raw float32 records: ``kitti-f32x4`` (x, y,
                                                            z, i) or ``nuscenes-f32x5`` (+ ring index)
``moesaic/v1/sensors/{sensor_id}/camera``    any   no       JPEG / PNG bytes or SensorFrame
``moesaic/v1/results/{sensor_id}/{task}``    1     no       result JSON
``moesaic/v1/results/{sensor_id}/{task}/png`` 1    no       PNG of a BEV grid (segmentation classes)
``moesaic/v1/status/{component}``            1     yes      ``online`` / ``offline`` (last will)
``moesaic/v1/errors/{sensor_id}``            1     no       error JSON: reason, detail, count
===========================================  ====  =======  =========================================

>>> result_topic("s0", "detection")
'moesaic/v1/results/s0/detection'
>>> parse_sensor_topic("moesaic/v1/sensors/s0/lidar")
('s0', 'lidar')
>>> lidar_format_of("moesaic/v1/sensors/s0/lidar/nuscenes-f32x5")
'nuscenes-f32x5'
>>> sensor_subscriptions(group="fleet")[:2]
['$share/fleet/moesaic/v1/sensors/+/lidar', '$share/fleet/moesaic/v1/sensors/+/lidar/+']

A raw point cloud has no header saying how many floats make a point, so its format is part of
its topic (or of its SensorFrame's ``encoding``); raw bytes on the bare ``lidar`` topic are
refused with an error naming both ways, never guessed.
>>> parse_result_topic("moesaic/v1/results/s0/bev_segmentation/png")
('s0', 'bev_segmentation', True)
"""

from __future__ import annotations

import re
from typing import Literal, get_args

__all__ = [
    "LIDAR_FORMATS",
    "OFFLINE",
    "ONLINE",
    "PREFIX",
    "SENSOR_KINDS",
    "SensorKind",
    "error_topic",
    "lidar_format_of",
    "monitor_subscriptions",
    "parse_error_topic",
    "parse_result_topic",
    "parse_sensor_topic",
    "parse_status_topic",
    "result_image_topic",
    "result_topic",
    "sensor_subscriptions",
    "sensor_topic",
    "status_topic",
    "validate_segment",
]

PREFIX = "moesaic/v1"
SensorKind = Literal["lidar", "camera"]
SENSOR_KINDS: tuple[SensorKind, ...] = get_args(SensorKind)
LIDAR_FORMATS = ("kitti-f32x4", "nuscenes-f32x5")
"""Raw point-cloud layouts, as topic level and SensorFrame encoding: float32 x, y, z, intensity
(KITTI ``.bin``), and the same plus the ring index (nuScenes ``.pcd.bin``)."""

_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
ONLINE = "online"
OFFLINE = "offline"


def validate_segment(value: str, what: str) -> str:
    """Return ``value`` when it is a safe single topic level, else ``ValueError`` naming ``what``.

    Letters, digits, ``_``, ``.`` and ``-`` only (no ``/``, ``+``, ``#``), 1 to 128 characters.
    """
    if not _SEGMENT.match(value):
        raise ValueError(f"{what} {value!r} is not a valid topic level: use 1-128 of A-Z a-z 0-9 _ . -")
    return value


def sensor_topic(sensor_id: str, kind: SensorKind, lidar_format: str | None = None) -> str:
    """Where a sensor publishes its frames; raw LiDAR scans name their ``lidar_format``."""
    if kind not in SENSOR_KINDS:
        raise ValueError(f"sensor kind {kind!r}: expected one of {SENSOR_KINDS}")
    topic = f"{PREFIX}/sensors/{validate_segment(sensor_id, 'sensor id')}/{kind}"
    if lidar_format is None:
        return topic
    if kind != "lidar" or lidar_format not in LIDAR_FORMATS:
        raise ValueError(f"lidar format {lidar_format!r}: expected one of {LIDAR_FORMATS} on a lidar topic")
    return f"{topic}/{lidar_format}"


def result_topic(sensor_id: str, task: str) -> str:
    """Where the JSON result of ``task`` for ``sensor_id`` is published (QoS 1)."""
    return f"{PREFIX}/results/{validate_segment(sensor_id, 'sensor id')}/{validate_segment(task, 'task')}"


def result_image_topic(sensor_id: str, task: str) -> str:
    """Where the PNG rendering of a grid result is published, beside its JSON."""
    return result_topic(sensor_id, task) + "/png"


def status_topic(component: str) -> str:
    """Retained ``online`` / ``offline`` of one component (a bridge, a node, a coordinator)."""
    return f"{PREFIX}/status/{validate_segment(component, 'component')}"


def error_topic(sensor_id: str) -> str:
    """Where malformed payloads and failed requests of ``sensor_id`` are reported."""
    return f"{PREFIX}/errors/{validate_segment(sensor_id, 'sensor id')}"


def parse_sensor_topic(topic: str) -> tuple[str, SensorKind]:
    """``(sensor_id, kind)`` of a sensor topic (``.../lidar/{format}`` included); ``ValueError``
    naming the topic otherwise."""
    parts = topic.split("/")
    declared = len(parts) == 6 and parts[4] == "lidar" and parts[5] in LIDAR_FORMATS
    if (
        not (len(parts) == 5 or declared)
        or "/".join(parts[:3]) != f"{PREFIX}/sensors"
        or parts[4] not in SENSOR_KINDS
    ):
        raise ValueError(
            f"topic {topic!r} is not {PREFIX}/sensors/{{sensor_id}}/{{lidar|camera}} or "
            f"{PREFIX}/sensors/{{sensor_id}}/lidar/{{{'|'.join(LIDAR_FORMATS)}}}"
        )
    validate_segment(parts[3], "sensor id")
    return parts[3], parts[4]


def lidar_format_of(topic: str) -> str | None:
    """The raw point-cloud format a sensor topic declares (``.../lidar/{format}``), else None."""
    parts = topic.split("/")
    return parts[5] if len(parts) == 6 and parts[4] == "lidar" and parts[5] in LIDAR_FORMATS else None


def sensor_subscriptions(group: str | None = None, sensors: tuple[str, ...] = ()) -> list[str]:
    """Topic filters a bridge subscribes to: every sensor, or only ``sensors``.

    With ``group`` they are MQTT 5 shared subscriptions (``$share/{group}/...``): the broker
    gives each message to one subscriber of the group.
    """
    ids = [validate_segment(s, "sensor id") for s in sensors] or ["+"]
    filters = [f"{PREFIX}/sensors/{s}/{level}" for s in ids for level in ("lidar", "lidar/+", "camera")]
    if group:
        validate_segment(group, "group")
        filters = [f"$share/{group}/{f}" for f in filters]
    return filters


def parse_result_topic(topic: str) -> tuple[str, str, bool]:
    """``(sensor_id, task, is_png)`` of a result topic (JSON, or its ``/png``); ``ValueError`` otherwise."""
    parts = topic.split("/")
    png = len(parts) == 6 and parts[5] == "png"
    shape_ok = len(parts) == 5 or png
    if not shape_ok or "/".join(parts[:3]) != f"{PREFIX}/results":
        raise ValueError(f"topic {topic!r} is not {PREFIX}/results/{{sensor_id}}/{{task}}[/png]")
    return validate_segment(parts[3], "sensor id"), validate_segment(parts[4], "task"), png


def parse_status_topic(topic: str) -> str:
    """The component of a status topic; ``ValueError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or "/".join(parts[:3]) != f"{PREFIX}/status":
        raise ValueError(f"topic {topic!r} is not {PREFIX}/status/{{component}}")
    return validate_segment(parts[3], "component")


def parse_error_topic(topic: str) -> str:
    """The sensor id of an error topic; ``ValueError`` otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or "/".join(parts[:3]) != f"{PREFIX}/errors":
        raise ValueError(f"topic {topic!r} is not {PREFIX}/errors/{{sensor_id}}")
    return validate_segment(parts[3], "sensor id")


def monitor_subscriptions(*, camera_frames: bool = True) -> list[str]:
    """Topic filters of a fleet monitor (the dashboard): every result JSON and PNG, status and
    error; with ``camera_frames`` the camera frames too (to draw detections on)."""
    filters = [
        f"{PREFIX}/results/+/+",
        f"{PREFIX}/results/+/+/png",
        f"{PREFIX}/status/+",
        f"{PREFIX}/errors/+",
    ]
    if camera_frames:
        filters.append(f"{PREFIX}/sensors/+/camera")
    return filters
