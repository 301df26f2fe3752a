"""The topic convention's parsers: every topic a monitor reads, and what they refuse."""

from __future__ import annotations

import pytest

from moesaic.ingest.topics import (
    monitor_subscriptions,
    parse_error_topic,
    parse_result_topic,
    parse_status_topic,
    result_image_topic,
    result_topic,
)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (result_topic("s0", "detection"), ("s0", "detection", False)),
        (result_image_topic("roof", "bev_segmentation"), ("roof", "bev_segmentation", True)),
    ],
)
def test_result_topics_parse_back(topic: str, expected: tuple[str, str, bool]) -> None:
    assert parse_result_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "moesaic/v1/results/s0",
        "moesaic/v1/results/s0/detection/jpg",
        "moesaic/v1/results/s0/detection/png/x",
        "moesaic/v2/results/s0/detection",
        "moesaic/v1/results/s 0/detection",
        "moesaic/v1/status/ingest",
    ],
)
def test_other_topics_are_not_results(topic: str) -> None:
    with pytest.raises(ValueError, match="is not"):
        parse_result_topic(topic)


def test_status_and_error_topics() -> None:
    assert parse_status_topic("moesaic/v1/status/ingest") == "ingest"
    assert parse_error_topic("moesaic/v1/errors/front-camera") == "front-camera"
    for bad in ("moesaic/v1/status", "moesaic/v1/status/a/b", "moesaic/v1/errors/+"):
        with pytest.raises(ValueError):
            parse_status_topic(bad)
        with pytest.raises(ValueError):
            parse_error_topic(bad)


def test_monitor_subscriptions() -> None:
    assert monitor_subscriptions(camera_frames=False) == [
        "moesaic/v1/results/+/+",
        "moesaic/v1/results/+/+/png",
        "moesaic/v1/status/+",
        "moesaic/v1/errors/+",
    ]
    assert monitor_subscriptions()[-1] == "moesaic/v1/sensors/+/camera"


# ---------------------------------------------------------------- raw point clouds declare their format


def test_lidar_topics_declare_the_raw_format() -> None:
    from moesaic.ingest.topics import lidar_format_of, parse_sensor_topic, sensor_subscriptions, sensor_topic

    assert sensor_topic("roof", "lidar", "nuscenes-f32x5") == "moesaic/v1/sensors/roof/lidar/nuscenes-f32x5"
    assert parse_sensor_topic("moesaic/v1/sensors/roof/lidar/kitti-f32x4") == ("roof", "lidar")
    assert lidar_format_of("moesaic/v1/sensors/roof/lidar/kitti-f32x4") == "kitti-f32x4"
    assert lidar_format_of("moesaic/v1/sensors/roof/lidar") is None
    assert "moesaic/v1/sensors/+/lidar/+" in sensor_subscriptions()
    for bad in ("moesaic/v1/sensors/roof/lidar/xyz", "moesaic/v1/sensors/roof/camera/kitti-f32x4"):
        with pytest.raises(ValueError, match="is not"):
            parse_sensor_topic(bad)
    with pytest.raises(ValueError, match="lidar format"):
        sensor_topic("roof", "camera", "kitti-f32x4")


@pytest.mark.parametrize(
    ("fields", "declared", "outcome"),
    [
        (4, "kitti-f32x4", 4),
        (5, "nuscenes-f32x5", 5),
        (5, None, "format_undeclared"),  # a nuScenes scan is never silently read as KITTI
        (4, None, "format_undeclared"),
        (5, "kitti-f32x4", "bad_points"),  # 7 points x 5 floats is not whole 4-float records
    ],
)
def test_raw_points_need_a_declared_format(fields: int, declared: str | None, outcome: object) -> None:
    import numpy as np

    from moesaic.ingest.payloads import PayloadError, decode_payload

    scan = np.arange(7 * fields, dtype="<f4").tobytes()
    if isinstance(outcome, int):
        frame = decode_payload("s0", "lidar", scan, received=0.0, lidar_format=declared)
        assert frame.points is not None and frame.points.fields == outcome
        return
    with pytest.raises(PayloadError) as info:
        decode_payload("s0", "lidar", scan, received=0.0, lidar_format=declared)
    assert info.value.reason == outcome
    if outcome == "format_undeclared":
        assert "moesaic/v1/sensors/s0/lidar/kitti-f32x4" in str(info.value) and "SensorFrame" in str(
            info.value
        )


def test_a_sensor_frame_must_agree_with_its_topic() -> None:
    import numpy as np

    from moesaic.ingest.payloads import PayloadError, decode_payload
    from moesaic.proto import moesaic_pb2

    data = np.zeros((3, 5), "<f4").tobytes()
    frame = moesaic_pb2.SensorFrame(encoding="nuscenes-f32x5", data=data).SerializeToString()
    assert decode_payload("s0", "lidar", frame, received=0.0).points.fields == 5  # type: ignore[union-attr]
    with pytest.raises(PayloadError, match="on a topic declaring 'kitti-f32x4'"):
        decode_payload("s0", "lidar", frame, received=0.0, lidar_format="kitti-f32x4")
