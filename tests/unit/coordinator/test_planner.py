"""Coarse cache per (task, budget bucket) and fine top-k re-checked against live profiles."""

from __future__ import annotations

import numpy as np
import pytest

from moesaic.budget import Budget
from moesaic.coordinator.features import FEATURE_NAMES
from moesaic.coordinator.gate import Gate, train_gate
from moesaic.coordinator.planner import Planner, TaskModel
from moesaic.coordinator.registry import Registry
from moesaic.coordinator.selection import brute_force
from moesaic.coordinator.validation import ValidationTable
from tests.unit.coordinator.fleet_state import registry_of

IDS = ("a", "b", "c", "d")
NODES = {"a": "n0", "b": "n1", "c": "n2", "d": "n3"}


def registry_with(costs: dict[str, tuple[float, float]]) -> Registry:
    """A registry whose nodes are up with the given (latency, energy) experts; no network is touched."""
    return registry_of({f"{NODES[m]}/{m}": cost for m, cost in costs.items()})


def offer(registry: Registry) -> list:  # type: ignore[type-arg]
    return registry.experts("classification")


def table(frames: int = 60) -> ValidationTable:
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (frames, len(FEATURE_NAMES["tensor"])))
    q = rng.uniform(0.2, 0.95, (frames, 4))
    return ValidationTable(
        "classification", "tensor", IDS, FEATURE_NAMES["tensor"], features, np.arange(frames), q
    )


def planner_for(registry: Registry, max_experts: int = 0) -> Planner:
    t = table()
    gate = train_gate(t, steps=50)
    tm = TaskModel("classification", "tensor", gate, t, max_experts, gate.weights_all(t.features))
    return Planner(registry.settings, {"classification": tm})


COSTS = {"a": (10.0, 50.0), "b": (20.0, 20.0), "c": (5.0, 10.0), "d": (40.0, 80.0)}


def test_coarse_pool_is_the_exact_optimum_and_is_cached_per_bucket() -> None:
    registry = registry_with(COSTS)
    planner = planner_for(registry)
    pool = planner.pool("classification", offer(registry), Budget(energy_mj=70))
    problem = table().problem(
        planner.tasks["classification"].table_gate,
        [e.cost() for e in offer(registry)],
        overhead_ms=registry.settings.overhead_ms,
    )
    bucket = 1.25 ** np.floor(np.log(70) / np.log(1.25))
    assert [e.id for e in pool] == list(brute_force(problem, Budget(energy_mj=bucket)).ids)
    assert planner.solves == 1
    planner.pool("classification", offer(registry), Budget(energy_mj=71))  # same bucket: cached
    assert planner.solves == 1
    planner.pool("classification", offer(registry), Budget(energy_mj=200))  # another bucket
    assert planner.solves == 2
    # pool or profiles changed
    planner.pool("classification", offer(registry), Budget(energy_mj=71), epoch=1)
    assert planner.solves == 3


def test_fine_level_rechecks_live_profiles_and_request_budget() -> None:
    registry = registry_with(COSTS)
    planner = planner_for(registry)
    x = np.zeros(len(FEATURE_NAMES["tensor"]))
    plan = planner.plan("classification", offer(registry), x, Budget(energy_mj=70))
    assert plan.feasible and plan.energy_mj <= 70 and sum(plan.weights) == pytest.approx(1.0)
    # A live profile gets much more expensive than the cached pool assumed: the fine level drops it.
    for e in plan.experts:
        e.replica.profile.energy_mj = 500.0
    replan = planner.plan("classification", offer(registry), x, Budget(energy_mj=70))
    assert all(e.energy_mj <= 70 for e in replan.experts)
    assert not {e.id for e in replan.experts} & {e.id for e in plan.experts}


def test_top_k_limits_the_fine_selection() -> None:
    registry = registry_with(COSTS)
    planner = planner_for(registry, max_experts=1)
    plan = planner.plan("classification", offer(registry), np.zeros(12), Budget())
    assert len(plan.experts) == 1 and plan.weights == (1.0,)


def test_nothing_fits_runs_the_cheapest_and_says_so() -> None:
    registry = registry_with(COSTS)
    planner = planner_for(registry)
    plan = planner.plan("classification", offer(registry), np.zeros(12), Budget(latency_ms=1.0))
    assert not plan.feasible and [e.id for e in plan.experts] == ["c"]
    empty = planner.plan(
        "classification", offer(registry), np.zeros(12), Budget(latency_ms=1.0), fallback=False
    )
    assert empty.experts == ()


def test_down_nodes_leave_the_pool() -> None:
    registry = registry_with(COSTS)
    planner = planner_for(registry)
    registry.mark_down(registry.nodes[2], "test")
    assert "c" not in [e.id for e in planner.candidates("classification", offer(registry))]
    assert "c" not in [
        e.id for e in planner.plan("classification", offer(registry), np.zeros(12), Budget()).experts
    ]


def test_task_without_gate_uses_prior_weights() -> None:
    registry = registry_with(COSTS)
    planner = Planner(registry.settings, {})
    registry.nodes[0].replicas["a"].weight = 3.0
    plan = planner.plan("classification", offer(registry), None, Budget(energy_mj=60))
    assert plan.experts[0].id == "a" and plan.energy_mj <= 60
    assert isinstance(Gate.uniform("classification", IDS, "tensor").weights_all(np.zeros(12)), np.ndarray)
