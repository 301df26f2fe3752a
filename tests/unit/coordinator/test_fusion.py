"""Fusion per task with gate weights."""

from __future__ import annotations

import numpy as np
import pytest

from moesaic.coordinator.fusion import ExpertOutput, fuse
from moesaic.coordinator.pipeline import Perception
from moesaic.coordinator.service import to_proto
from moesaic.proto import moesaic_pb2


def test_detections_weighted_boxes_fusion() -> None:
    a = {
        "boxes": np.array([[10, 10, 50, 50]], np.float32),
        "scores": np.array([0.9], np.float32),
        "class_ids": np.array([1]),
    }
    b = {
        "boxes": np.array([[14, 14, 54, 54], [200, 200, 220, 220]], np.float32),
        "scores": np.array([0.5, 0.8], np.float32),
        "class_ids": np.array([1, 0]),
    }
    fused = fuse(
        "detection",
        [ExpertOutput("a", 3.0, a), ExpertOutput("b", 1.0, b)],
        image_size=(320, 240),
        class_names=("car", "person"),
    ).detections
    assert fused is not None and len(fused) == 2
    merged = fused.select(fused.class_ids == 1)
    # The fused box lies between the two, nearer the heavier expert a (weight 0.75).
    x1 = float(merged.boxes[0, 0])
    assert 10 < x1 < 12.5
    assert merged.scores[0] == pytest.approx(0.75 * 0.9 + 0.25 * 0.5, abs=1e-3)
    lone = fused.select(fused.class_ids == 0)
    assert lone.scores[0] == pytest.approx(0.25 * 0.8, abs=1e-3)  # only b saw it
    assert np.allclose(lone.boxes[0], [200, 200, 220, 220], atol=0.1)
    assert fused.name_of(0) in ("car", "person")


def test_detections_all_empty() -> None:
    empty = {
        "boxes": np.zeros((0, 4), np.float32),
        "scores": np.zeros(0, np.float32),
        "class_ids": np.zeros(0),
    }
    fused = fuse("detection", [ExpertOutput("a", 1.0, empty)]).detections
    assert fused is not None and len(fused) == 0


def test_segmentation_weighted_probabilities() -> None:
    pa = np.zeros((2, 2, 2), np.float32)
    pa[0] = 1.0
    pb = np.zeros((2, 2, 2), np.float32)
    pb[1] = 1.0
    fused = fuse(
        "bev_segmentation", [ExpertOutput("a", 0.3, {"probs": pa}), ExpertOutput("b", 0.7, {"probs": pb})]
    )
    assert fused.grid is not None and fused.grid[0] == "classes"
    assert fused.grid[1].dtype == np.uint8 and np.all(fused.grid[1] == 1)
    assert np.allclose(fused.extras["probs"][1], 0.7)


def test_one_expert_segmentation_is_not_copied() -> None:
    """A 1024x1024 grid's probabilities are 20 MB: one expert's pass through as they are (the
    FP64 mean cost 160-270 ms a frame on the coordinator, more than the expert's GPU run)."""
    probs = np.random.default_rng(0).random((5, 64, 64), dtype=np.float32)
    fused = fuse("bev_segmentation", [ExpertOutput("a", 0.3, {"probs": probs})])
    assert np.shares_memory(fused.extras["probs"], probs)
    assert fused.grid is not None
    np.testing.assert_array_equal(fused.grid[1], probs.argmax(axis=0))


def test_reconstruction_mean_classification_and_text() -> None:
    fused = fuse(
        "bev_reconstruction",
        [
            ExpertOutput("a", 1, {"bev": np.zeros((1, 2, 2))}),
            ExpertOutput("b", 3, {"bev": np.ones((1, 2, 2))}),
        ],
    )
    assert fused.grid is not None and np.allclose(fused.grid[1], 0.75)
    text = fuse(
        "vlm",
        [
            ExpertOutput("a", 0.4, {"text": np.array([b"a car"], object)}),
            ExpertOutput("b", 0.6, {"text": np.array([b"two cars"], object)}),
        ],
    )
    assert text.text == "two cars"


def test_mismatched_shapes_and_missing_outputs_name_the_expert() -> None:
    with pytest.raises(ValueError, match="expert b: probs has shape"):
        fuse(
            "classification",
            [ExpertOutput("a", 1, {"probs": np.ones(3)}), ExpertOutput("b", 1, {"probs": np.ones(4)})],
        )
    with pytest.raises(ValueError, match="expert a: output 'bev' missing"):
        fuse("bev_reconstruction", [ExpertOutput("a", 1, {"probs": np.ones(3)})])
    with pytest.raises(ValueError, match="fuses only"):
        fuse("juggling", [ExpertOutput("a", 1, {})])


def test_segmentation_response_carries_the_class_map_and_probabilities() -> None:
    """The fused grid and its probabilities reach the PerceiveResponse whole (written into the
    response's own fields, not copied in)."""
    probs = np.random.default_rng(1).random((5, 32, 48), dtype=np.float32)
    fused = fuse("bev_segmentation", [ExpertOutput("a", 1.0, {"probs": probs})])
    perception = Perception("r1", "bev_segmentation", [], fused, 1.0, 2.0, 1.5, 2.5, True, True)
    response = moesaic_pb2.PerceiveResponse.FromString(to_proto(perception).SerializeToString())
    grid = response.grid
    assert (grid.name, grid.datatype, list(grid.shape)) == ("classes", "UINT8", [32, 48])
    np.testing.assert_array_equal(np.frombuffer(grid.data, np.uint8).reshape(32, 48), probs.argmax(axis=0))
    (extra,) = response.extras
    assert (extra.name, extra.datatype, list(extra.shape)) == ("probs", "FP32", [5, 32, 48])
    np.testing.assert_array_equal(np.frombuffer(extra.data, np.float32).reshape(probs.shape), probs)
