"""The one Budget type: 0 = unbounded, limits finite and >= 0, unknown keys refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from moesaic.budget import UNBOUNDED, Budget
from moesaic.coordinator.config import parse_fleet
from moesaic.coordinator.problem import ProblemError, parse_problem
from moesaic.ingest.config import load_config


def test_zero_is_unbounded() -> None:
    assert not Budget().bounded and Budget() == UNBOUNDED
    assert Budget(latency_ms=5).bounded and Budget(energy_mj=1).bounded


@pytest.mark.parametrize(
    "data",
    [
        {"latency_ms": -1},
        {"energy_mj": math.inf},
        {"latency_ms": math.nan},
        {"latency": 5},
        {"latency_ms": None},
    ],
)
def test_invalid_budgets_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Budget.model_validate(data)


def test_one_type_in_every_config(tmp_path: Path) -> None:
    fleet = parse_fleet({"coordinator": {"default_budget": {"latency_ms": 40}}}, env={})
    ingest = load_config(env={})
    problem = {
        "experts": [{"id": "a", "device": "d", "latency_ms": 1, "energy_mj": 1}],
        "samples": [{"label": 0, "gate": [1], "probs": [[1.0]]}],
        "budget": {"energy_mj": 3},
    }
    _, budget = parse_problem(problem)
    assert (
        type(fleet.coordinator.default_budget)
        is type(ingest.defaults.camera.budget)
        is type(budget)
        is Budget
    )
    assert fleet.coordinator.default_budget == Budget(latency_ms=40) and budget == Budget(energy_mj=3)


def test_budget_errors_name_the_source_and_field(tmp_path: Path) -> None:
    path = tmp_path / "ingest.yaml"
    path.write_text("defaults:\n  lidar: {tasks: [bev_segmentation], budget: {latency_ms: -5}}\n")
    with pytest.raises(
        ValueError, match=r"ingest.yaml: defaults\.lidar\.budget\.latency_ms: .*greater than or equal"
    ):
        load_config(path, env={})
    problem = {
        "experts": [{"id": "a", "device": "d", "latency_ms": 1, "energy_mj": 1}],
        "samples": [{"label": 0, "gate": [1], "probs": [[1.0]]}],
        "budget": {"energy_mj": -1},
    }
    with pytest.raises(ProblemError, match=r"p\.json: budget\.energy_mj"):
        parse_problem(problem, source="p.json")
