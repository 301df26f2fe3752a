"""The dashboard's state model, fed the messages the fleet publishes: results, PNGs, camera
frames, statuses, errors, node descriptions and metrics."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from moesaic.dashboard.sources import summarise_metrics
from moesaic.dashboard.state import MAX_STREAMS, FleetState
from moesaic.dashboard.streams import miss_reason
from moesaic.metrics import Metrics
from moesaic.proto import moesaic_pb2
from tests.helpers.images import png_bomb

T0 = 1_700_000_000.0


def result(**fields: Any) -> dict[str, Any]:
    """A result JSON as the bridge publishes it (moesaic.ingest.results)."""
    body: dict[str, Any] = {
        "sensor": "cam0",
        "kind": "camera",
        "task": "detection",
        "frame_id": 7,
        "timestamp": T0,
        "request_id": "r1",
        "experts": [
            {"id": "edge-a/yolo-n", "node": "edge-a", "model": "yolo-n", "weight": 0.75, "status": "ok"},
            {"id": "edge-b/yolo-s", "node": "edge-b", "model": "yolo-s", "weight": 0.25, "status": "ok"},
        ],
        "latency_ms": 80.0,
        "predicted_latency_ms": 75.0,
        "energy_mj": 400.0,
        "predicted_energy_mj": 390.0,
        "energy_source": "measured",
        "budget": {"latency_ms": 100.0, "energy_mj": 0.0},
        "budget_met": True,
        "bridge_ms": 85.0,
        "output": {
            "type": "detections",
            "items": [{"xyxy": [1, 2, 30, 40], "score": 0.9, "class_id": 0, "class_name": "car"}],
        },
    }
    body.update(fields)
    return body


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def png(width: int = 8, height: int = 8, value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_result_becomes_the_latest_decision_and_a_chart_sample() -> None:
    state = FleetState()
    state.on_message("moesaic/v1/results/cam0/detection", encode(result()), now=T0)
    [stream] = state.streams.values()
    assert (stream.sensor, stream.task, stream.kind) == ("cam0", "detection", "camera")
    decision = stream.latest
    assert decision is not None
    assert [(e["id"], e["weight"]) for e in decision["experts"]] == [
        ("edge-a/yolo-n", 0.75),
        ("edge-b/yolo-s", 0.25),
    ]
    assert decision["budget"] == {"latency_ms": 100.0, "energy_mj": 0.0}
    assert decision["budget_met"] is True and decision["budget_reason"] == ""
    assert decision["output"] == {"type": "detections", "count": 1, "classes": {"car": 1}}
    assert list(stream.samples) == [[1, T0, 80.0, 75.0, 100.0, 400.0, 390.0, 0.0, 1]]
    assert state.tasks() == {"detection": {"results": 1, "met": 1}}


def test_within_budget_share_per_task_counts_every_sensor() -> None:
    state = FleetState()
    for i, (sensor, met) in enumerate([("a", True), ("a", False), ("b", True), ("b", True)]):
        state.on_message(f"moesaic/v1/results/{sensor}/detection", encode(result(budget_met=met)), now=T0 + i)
    state.on_message("moesaic/v1/results/roof/bev_segmentation", encode(result(budget_met=False)), now=T0)
    assert state.tasks() == {
        "detection": {"results": 4, "met": 3},
        "bev_segmentation": {"results": 1, "met": 0},
    }


def test_drain_sends_what_changed_once_and_snapshot_everything() -> None:
    state = FleetState()
    topic = "moesaic/v1/results/cam0/detection"
    state.on_message(topic, encode(result()), now=T0)
    first = state.drain(now=T0)
    assert first is not None and first["type"] == "patch"
    assert [len(s["samples"]) for s in first["streams"]] == [1]
    assert state.drain(now=T0) is None  # nothing new
    state.on_message(topic, encode(result(latency_ms=90.0)), now=T0 + 1)
    second = state.drain(now=T0 + 1)
    assert second is not None
    assert [s[0] for s in second["streams"][0]["samples"]] == [2]  # only the new sample
    snapshot = state.snapshot(now=T0 + 1)
    assert [s[0] for s in snapshot["streams"][0]["samples"]] == [1, 2]
    json.dumps(snapshot, allow_nan=False)


def test_history_keeps_only_the_window() -> None:
    state = FleetState(history_s=60)
    topic = "moesaic/v1/results/cam0/detection"
    for t in (0, 20, 61, 90):
        state.on_message(topic, encode(result()), now=T0 + t)
    [stream] = state.streams.values()
    assert [s[1] - T0 for s in stream.samples] == [61, 90]  # >= now - 60 s
    assert stream.results == 4  # the counts are since the start


@pytest.mark.parametrize(
    ("fields", "reason", "derived"),
    [
        ({"budget_met": True}, "", False),
        ({"budget_met": False, "budget_reason": "expert_failed"}, "expert_failed", False),
        ({"budget_met": False, "latency_ms": 150.0}, "deadline_missed", True),
        (
            {"budget_met": False, "budget": {"latency_ms": 0, "energy_mj": 300.0}, "energy_mj": 400.0},
            "energy_over",
            True,
        ),
        ({"budget_met": False, "latency_ms": 90.0, "predicted_latency_ms": 120.0}, "no_feasible_set", True),
        ({"budget_met": False, "latency_ms": 90.0}, "unknown", True),
    ],
)
def test_the_reason_a_budget_was_missed(fields: dict[str, Any], reason: str, derived: bool) -> None:
    assert miss_reason(result(**fields)) == (reason, derived)


def test_a_miss_is_remembered_after_later_results_meet_the_budget() -> None:
    state = FleetState()
    topic = "moesaic/v1/results/cam0/detection"
    state.on_message(topic, encode(result(budget_met=False, budget_reason="no_feasible_set")), now=T0)
    state.on_message(topic, encode(result()), now=T0 + 1)
    [stream] = state.streams.values()
    assert stream.last_miss == {"t": T0, "frame_id": 7, "reason": "no_feasible_set"}
    assert stream.latest is not None and stream.latest["budget_met"] is True


def test_odd_fields_are_dropped_not_shown_or_raised() -> None:
    state = FleetState()
    body = result(
        latency_ms="fast",
        predicted_latency_ms=True,
        budget="none",
        experts=[{"id": "x" * 5000, "weight": "heavy"}, "not an expert"],
        output={"type": "detections", "items": "many"},
        budget_reason=["list"],
    )
    payload = encode(body).replace(b'"fast"', b"NaN")  # Python's json reads NaN; pages must not get it
    state.on_message("moesaic/v1/results/cam0/detection", payload, now=T0)
    decision = next(iter(state.streams.values())).latest
    assert decision is not None
    assert decision["latency_ms"] is None and decision["predicted_latency_ms"] is None
    assert decision["budget"] == {"latency_ms": 0.0, "energy_mj": 0.0}
    assert len(decision["experts"]) == 1 and len(decision["experts"][0]["id"]) == 200
    assert decision["experts"][0]["weight"] is None
    json.dumps(state.snapshot(now=T0), allow_nan=False)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("moesaic/v1/results/cam0/detection", b"{not json", "result_not_json"),
        ("moesaic/v1/results/cam0/detection", b"[1, 2]", "result_not_object"),
        ("moesaic/v1/results/cam0/detection", b"{" + b" " * (1 << 20) + b"}", "result_too_large"),
        ("moesaic/v1/results/cam0/detection/png", b"GIF89a", "grid_png_invalid"),
        ("moesaic/v1/results/roof/bev_segmentation/png", png_bomb(), "grid_png_invalid"),
        ("moesaic/v1/results/c a m/detection", b"{}", "bad_topic"),
        ("moesaic/v1/sensors/cam0/camera", b"not an image", "camera_frame_invalid"),
        ("moesaic/v1/errors/cam0", b"\xff\xfe", "error_not_json"),
        ("elsewhere/topic", b"", "unknown_topic"),
    ],
)
def test_unreadable_messages_are_counted(topic: str, payload: bytes, reason: str) -> None:
    state = FleetState()
    state.on_message(topic, payload, now=T0)
    assert state.ignored == {reason: 1}
    assert not state.streams and not state.images and not state.errors
    patch = state.drain(now=T0)
    assert patch is not None and patch["ignored"] == {reason: 1}


def test_grid_pngs_are_kept_per_sensor_and_task_with_a_version() -> None:
    state = FleetState()
    for value in (10, 20):
        state.on_message("moesaic/v1/results/roof/bev_segmentation/png", png(16, 8, value), now=T0)
    image = state.images[("roof", "bev_segmentation")]
    assert (image.width, image.height, image.version) == (16, 8, 2)
    assert state.grid_png("roof", "bev_segmentation") == png(16, 8, 20)
    assert state.grid_png("roof", "bev_reconstruction") is None
    [shown] = state.snapshot()["images"]
    assert shown["url"] == "/api/bev/roof/bev_segmentation.png?v=2"


def test_detections_are_drawn_on_the_camera_frame_with_their_id() -> None:
    state = FleetState()
    for frame_id in (6, 7, 8):
        envelope = moesaic_pb2.SensorFrame(frame_id=frame_id, encoding="jpeg", data=jpeg(64 + frame_id))
        state.on_message("moesaic/v1/sensors/cam0/camera", envelope.SerializeToString(), now=T0)
    camera = state.cameras["cam0"]
    assert camera.shown is not None and camera.shown.frame_id == 8 and camera.boxes == []  # live, no result
    state.on_message("moesaic/v1/results/cam0/detection", encode(result(frame_id=7)), now=T0 + 0.1)
    assert camera.shown.frame_id == 7 and camera.shown.width == 71
    assert camera.boxes == [{"xyxy": [1.0, 2.0, 30.0, 40.0], "score": 0.9, "label": "car"}]
    found = state.camera_image("cam0")
    assert found is not None and found[1] == "image/jpeg" and found[0] == jpeg(71)
    # a newer frame right after a match does not replace the annotated one
    state.on_message("moesaic/v1/sensors/cam0/camera", jpeg(), now=T0 + 0.2)
    assert camera.shown.frame_id == 7
    # a result for a frame the dashboard never saw leaves the picture as it is
    state.on_message("moesaic/v1/results/cam0/detection", encode(result(frame_id=99)), now=T0 + 0.3)
    assert camera.shown.frame_id == 7


def test_frames_without_ids_pair_with_the_latest_frame_and_raw_rgb_becomes_png() -> None:
    state = FleetState()
    rgb = np.zeros((4, 6, 3), np.uint8)
    envelope = moesaic_pb2.SensorFrame(encoding="rgb8", width=6, height=4, data=rgb.tobytes())
    state.on_message("moesaic/v1/sensors/cam0/camera", envelope.SerializeToString(), now=T0)
    state.on_message("moesaic/v1/results/cam0/detection", encode(result(frame_id=0)), now=T0)
    found = state.camera_image("cam0")
    assert found is not None
    data, content_type = found
    assert content_type == "image/png" and Image.open(io.BytesIO(data)).size == (6, 4)


def test_statuses_and_errors() -> None:
    state = FleetState()
    state.on_message("moesaic/v1/status/ingest", b"online", now=T0)
    state.on_message("moesaic/v1/results/cam0/detection", encode(result()), now=T0)
    state.drain(now=T0)
    error = {"sensor": "cam0", "reason": "coordinator_unavailable", "detail": "<b>down</b>", "count": 3}
    state.on_message(
        "moesaic/v1/errors/cam0", encode({**error, "task": "detection", "frame_id": 9}), now=T0 + 1
    )
    state.on_message("moesaic/v1/status/ingest", b"offline", now=T0 + 2)
    assert state.components["ingest"]["status"] == "offline" and state.components["ingest"]["online"] is False
    [kept] = state.errors
    assert kept["detail"] == "<b>down</b>" and kept["frame_id"] == 9 and kept["count"] == 3
    assert state.streams[("cam0", "detection")].last_error == kept
    patch = state.drain(now=T0 + 2)
    assert patch is not None and [e["reason"] for e in patch["errors"]] == ["coordinator_unavailable"]
    assert patch["components"][0]["status"] == "offline"
    state.on_message("moesaic/v1/errors/cam0", encode(error), now=T0 + 3)
    patch = state.drain(now=T0 + 3)
    assert patch is not None and len(patch["errors"]) == 1  # only the new one


def described(*ready: bool) -> dict[str, Any]:
    models = [
        {"name": f"m{i}", "task": "detection", "engine": "onnxruntime", "ready": r, "queue_depth": i}
        for i, r in enumerate(ready)
    ]
    return {"node_id": "edge-a", "device": {"kind": "cpu"}, "models": models}


@pytest.mark.parametrize(
    ("description", "error", "health"),
    [
        (described(True, True), None, "serving"),
        (described(True, False), None, "degraded"),
        (described(), None, "degraded"),
        (None, "failed to connect to all addresses", "down"),
    ],
)
def test_node_health(description: dict[str, Any] | None, error: str | None, health: str) -> None:
    state = FleetState()
    state.update_node("127.0.0.1:8001", name="edge-a", description=description, error=error, now=T0)
    node = state.nodes["127.0.0.1:8001"]
    assert node["name"] == "edge-a" and node["health"] == health
    assert node["error"] == (error or "")


def test_a_nodes_metrics_join_its_described_node() -> None:
    state = FleetState()
    models = [{"model": "yolo", "engine": "onnxruntime", "device": "cpu", "provider": "CPUExecutionProvider"}]
    state.node_metrics("edge-a", models, now=T0)  # metrics first: a node of its own
    assert state.nodes["metrics:edge-a"]["health"] == "metrics only"
    state.drain(now=T0)
    state.update_node("127.0.0.1:8001", name="edge-a", description=described(True), now=T0 + 1)
    assert list(state.nodes) == ["127.0.0.1:8001"]
    assert state.nodes["127.0.0.1:8001"]["metrics_models"] == models
    patch = state.drain(now=T0 + 1)
    assert patch is not None and patch["removed_nodes"] == ["metrics:edge-a"]
    state.node_metrics("edge-a", models, now=T0 + 2)  # later scrapes land on the described node
    assert list(state.nodes) == ["127.0.0.1:8001"]


def test_metrics_summary_of_a_real_registry() -> None:
    from prometheus_client import generate_latest

    node = Metrics(component="node")
    node.model_info.labels(
        model="yolo", version="1", engine="onnxruntime", device="cpu", provider="CPUExecutionProvider"
    ).set(1)
    node.requests_expired.labels(model="yolo").inc(2)
    summary = summarise_metrics(generate_latest(node.registry).decode())
    assert summary["component"] == "node"
    assert summary["models"] == [
        {
            "model": "yolo",
            "version": "1",
            "engine": "onnxruntime",
            "device": "cpu",
            "provider": "CPUExecutionProvider",
        }
    ]
    assert summary["counters"]["requests_expired"] == 2

    coordinator = Metrics(component="coordinator")
    coordinator.budget_violations.labels("detection", "deadline_missed").inc(3)  # task, reason
    coordinator.selections.labels(task="detection", expert="edge-a/yolo").inc(5)
    coordinator.experts_up.labels(expert="edge-a/yolo").set(0)
    summary = summarise_metrics(generate_latest(coordinator.registry).decode())
    assert summary["violations"] == {"detection deadline_missed": 3}
    assert summary["counters"]["selections"] == 5 and summary["experts_up"] == {"edge-a/yolo": False}


def test_what_it_keeps_is_bounded() -> None:
    state = FleetState()
    for i in range(MAX_STREAMS + 5):
        state.on_message(f"moesaic/v1/results/s{i}/detection", encode(result()), now=T0)
    assert len(state.streams) == MAX_STREAMS and state.ignored == {"too_many_streams": 5}
    for i in range(40):
        envelope = moesaic_pb2.SensorFrame(frame_id=i + 1, encoding="jpeg", data=jpeg())
        state.on_message("moesaic/v1/sensors/cam0/camera", envelope.SerializeToString(), now=T0)
    assert list(state.cameras["cam0"].recent) == list(range(9, 41))  # the newest 32
