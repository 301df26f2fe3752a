"""Gate features, training once on the full expert set, renormalisation over subsets, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesaic.coordinator.features import FEATURE_NAMES, features_of, input_kind_of
from moesaic.coordinator.gate import Gate, mixture_loss, train_gate
from moesaic.coordinator.validation import ValidationTable, score_rows


def regime_table(seed: int = 0, frames: int = 200) -> ValidationTable:
    """Two regimes told apart by the first tensor value: expert a is right in one, b in the other."""
    rng = np.random.default_rng(seed)
    regime = rng.integers(0, 2, frames)
    xs = [np.concatenate([[r * 2.0 - 1.0 + rng.normal(0, 0.3)], rng.normal(0, 1, 5)]) for r in regime]
    features = np.stack([features_of("tensor", {"x": x}) for x in xs])
    q = np.where(regime[:, None] == np.array([[0, 1]]), 0.9, 0.2)
    q = np.hstack([q, np.full((frames, 1), 0.5)])  # c: mediocre everywhere
    return ValidationTable(
        "classification",
        "tensor",
        ("n/a", "n/b", "n/c"),
        FEATURE_NAMES["tensor"],
        features,
        np.arange(frames),
        q,
    )


def test_features_per_input_kind() -> None:
    pts = np.random.default_rng(0).normal(0, 10, (1000, 4)).astype(np.float32)
    img = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for kind, inputs in (("points", {"points": pts}), ("image", {"image": img}), ("tensor", {"x": pts})):
        assert input_kind_of(inputs) == kind
        f = features_of(kind, inputs)
        assert f.shape == (len(FEATURE_NAMES[kind]),) and np.all(np.isfinite(f))
    assert features_of("points", {"points": np.zeros((0, 4), np.float32)}).shape == (9,)
    dark = features_of("image", {"image": np.zeros((10, 10, 3), np.uint8)})
    assert dark[FEATURE_NAMES["image"].index("dark_fraction")] == 1.0
    with pytest.raises(ValueError, match="expects an image"):
        features_of("image", {"points": pts})


def test_trained_gate_beats_uniform_and_routes_by_regime() -> None:
    table = regime_table()
    gate = train_gate(table, steps=300)
    uniform = Gate.uniform(table.task, table.experts, "tensor")
    assert mixture_loss(gate, table) < 0.8 * mixture_loss(uniform, table)
    low = features_of("tensor", {"x": np.array([-1.0, 0, 0, 0, 0, 0])})
    high = features_of("tensor", {"x": np.array([1.0, 0, 0, 0, 0, 0])})
    assert gate.weights_all(low).argmax() == 0 and gate.weights_all(high).argmax() == 1


def test_weights_renormalise_over_subsets_without_retraining() -> None:
    gate = train_gate(regime_table(), steps=50)
    x = features_of("tensor", {"x": np.array([0.3, 1, 2, 3, 4, 5])})
    full = gate.weights_all(x)
    assert full.sum() == pytest.approx(1.0)
    sub = gate.weights_over(x, ["n/c", "n/a"])
    assert sub.sum() == pytest.approx(1.0)
    assert sub[0] / sub[1] == pytest.approx(full[2] / full[0])  # ratios preserved
    with pytest.raises(LookupError, match="no expert 'n/z'"):
        gate.weights_over(x, ["n/z"])


def test_gate_and_table_files_round_trip(tmp_path: Path) -> None:
    table = regime_table(frames=30)
    table.save(tmp_path / "t.npz")
    loaded = ValidationTable.load(tmp_path / "t.npz")
    assert loaded.experts == table.experts and np.array_equal(loaded.q, table.q)
    gate = train_gate(loaded, steps=20)
    gate.save(tmp_path / "g.json")
    again = Gate.load(tmp_path / "g.json")
    x = table.features[0]
    assert np.allclose(again.weights_all(x), gate.weights_all(x))
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        Gate.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a validation table"):
        ValidationTable.load(tmp_path / "g.json")


def test_train_gate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moesaic.cli import main

    regime_table(frames=60).save(tmp_path / "t.npz")
    assert main(["train-gate", "--table", str(tmp_path / "t.npz"), "--out", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "trained gate" in out and Gate.load(tmp_path / "g.json").experts == ("n/a", "n/b", "n/c")
    assert main(["train-gate", "--table", str(tmp_path / "none.npz"), "--out", str(tmp_path / "x.json")]) == 2


def test_score_rows_per_task() -> None:
    assert score_rows("classification", {"probs": np.array([[0.2, 0.8]])}, {"label": np.array(1)}) == [0.8]
    probs = np.zeros((3, 4, 4))
    probs[2] = 1.0
    grid = np.full((4, 4), 2)
    rows = score_rows("bev_segmentation", {"probs": probs}, {"label": grid})
    assert rows.shape == (16,) and np.all(rows == 1.0)
    out = {
        "boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]]),
        "scores": np.array([0.7, 0.9]),
        "class_ids": np.array([1, 0]),
    }
    gt = {
        "boxes": np.array([[1, 1, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]]),
        "class_ids": np.array([1, 1, 0]),
    }
    assert score_rows("detection", out, gt).tolist() == [0.7, 0.01, 0.01]
    rec = score_rows("bev_reconstruction", {"bev": np.ones((1, 2, 2))}, {"bev": np.ones((2, 2))})
    assert rec.tolist() == [1.0]
    with pytest.raises(ValueError, match="no validation scoring"):
        score_rows("vlm", {}, {})
