"""The demo's gate cache: where it lives and what makes a gate train again."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesaic.demo import gates
from moesaic.demo.labelled import bev_grid
from moesaic.demo.metrics import labelled, samples


def model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text("task: detection\n")
    (folder / "model.onnx").write_bytes(weights)
    return folder


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gates.cache_root() == tmp_path / "moesaic" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gates.cache_root() == Path.home() / ".cache" / "moesaic" / "demo"


def test_key_changes_with_the_model_files_and_the_experts(tmp_path: Path) -> None:
    a = model(tmp_path / "a", b"weights-1")
    key = gates._key("detection", ["yolo-n"], [a])
    assert (
        gates._key("detection", ["yolo-n"], [model(tmp_path / "b", b"weights-1")]) == key
    )  # content, not path
    assert gates._key("detection", ["yolo-n", "yolo-x"], [a]) != key
    assert gates._key("bev_segmentation", ["yolo-n"], [a]) != key
    (a / "model.onnx").write_bytes(b"weights-2")
    assert gates._key("detection", ["yolo-n"], [a]) != key


@pytest.mark.parametrize(
    ("yaml", "shape", "resolution"),
    [
        ("task: bev_segmentation\n", (32, 32), 3.2),
        ("task: bev_segmentation\nprocessor: {type: ppn_bev, resolution: 0.4}\n", (256, 256), 0.4),
        # a ppn_bev grid that does not give the output's shape is not used
        ("task: bev_segmentation\nprocessor: {type: ppn_bev, resolution: 0.4}\n", (64, 64), 1.6),
    ],
)
def test_bev_grid_matches_the_expert_output(
    tmp_path: Path, yaml: str, shape: tuple[int, int], resolution: float
) -> None:
    (tmp_path / "model.yaml").write_text(yaml)
    grid = bev_grid(tmp_path, shape)
    assert grid.shape == shape
    assert grid.resolution == pytest.approx(resolution)


def test_metrics_are_read_with_the_prometheus_parser() -> None:
    text = (
        "# HELP moesaic_mqtt_frames_dropped Sensor frames dropped.\n"
        "# TYPE moesaic_mqtt_frames_dropped counter\n"
        'moesaic_mqtt_frames_dropped_total{reason="queue_full",sensor="a"} 3.0\n'
        'moesaic_mqtt_frames_dropped_total{reason="queue_full",sensor="b"} 2.0\n'
        'moesaic_mqtt_frames_dropped_created{reason="queue_full",sensor="a"} 1.7e9\n'
    )
    values = samples(text, "moesaic_mqtt_frames_dropped_total")
    assert values == {
        (("reason", "queue_full"), ("sensor", "a")): 3.0,
        (("reason", "queue_full"), ("sensor", "b")): 2.0,
    }
    assert labelled(values, "reason") == {"queue_full": 5.0}
    assert samples("", "anything") == {}
