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
