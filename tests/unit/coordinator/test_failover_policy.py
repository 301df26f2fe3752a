"""Failover policy: what a missed deadline, an error reply and a transport failure do to a replica
and its node, and the per-call deadline derived from the request's budget."""

from __future__ import annotations

import time

import pytest

from moesaic.budget import Budget
from moesaic.coordinator.config import parse_fleet
from moesaic.coordinator.core import Coordinator
from moesaic.coordinator.dispatch import Dispatch
from moesaic.coordinator.inputs import RequestInputs
from moesaic.coordinator.pipeline import PerceiveInput
from tests.unit.coordinator.fleet_state import registry_of


def test_a_missed_deadline_raises_the_prediction_and_makes_the_replica_suspect_not_the_node_down() -> None:
    registry = registry_of({"edge-b/m": (10.0, 5.0), "edge-c/m": (30.0, 5.0)}, failures_to_down=1)
    replica = registry.nodes[0].replicas["m"]
    registry._probe_soon = lambda node: None  # type: ignore[method-assign]  # no event loop here
    for _ in range(5):
        registry.observe_timeout(replica, 123.0)
    assert registry.nodes[0].up and replica.suspect
    assert replica.profile.completion_ms(time.monotonic()) == pytest.approx(123.0, rel=0.01)
    assert "deadline after 123 ms" in registry.nodes[0].last_error
    # The expert is now offered through the other replica, although it was slower.
    assert [e.replica.id for e in registry.experts("classification")] == ["edge-c/m"]


def test_a_suspect_replica_is_still_offered_when_nothing_else_serves_the_task() -> None:
    registry = registry_of({"edge-b/m": (10.0, 5.0)})
    registry.nodes[0].replicas["m"].suspect = True
    assert [e.replica.id for e in registry.experts("classification")] == ["edge-b/m"]


def test_error_replies_do_not_count_but_transport_failures_do() -> None:
    registry = registry_of({"edge-b/m": (10.0, 5.0)}, failures_to_down=2)
    replica = registry.nodes[0].replicas["m"]
    for _ in range(3):
        registry.record_expert_error(replica, "INTERNAL: engine failed")
    assert registry.nodes[0].up
    registry.record_failure(replica, "UNAVAILABLE: no route")
    assert registry.nodes[0].up  # one transport failure of two
    registry.record_failure(replica, "UNAVAILABLE: connection refused")
    assert not registry.nodes[0].up and registry.experts("classification") == []


def test_unreachable_takes_the_node_down_at_once() -> None:
    registry = registry_of({"edge-b/m": (10.0, 5.0)}, failures_to_down=3)
    registry.record_failure(
        registry.nodes[0].replicas["m"], "UNAVAILABLE: connection refused", unreachable=True
    )
    assert not registry.nodes[0].up


def dispatch_for(budget: Budget, *, caller_deadline: float | None = None, **settings: object) -> Dispatch:
    config = parse_fleet(
        {
            "coordinator": {"overhead_ms": 2, "deadline_slack": 3, "deadline_margin_ms": 50, **settings},
            "nodes": [{"address": "127.0.0.1:1", "name": "edge-b"}],
        },
        env={},
    )
    coordinator = Coordinator(config, task_models={})
    coordinator.registry = registry_of({"edge-b/m": (5.0, 5.0)}, task="detection")
    pipeline = coordinator.pipeline
    pipeline.registry = coordinator.registry
    request = PerceiveInput("detection", RequestInputs({}), budget=budget, deadline=caller_deadline)
    state = pipeline.validate(request)
    pipeline.select(state)
    return Dispatch(state, pipeline.registry, pipeline.planner, pipeline.caller)


def ms_after_start(d: Dispatch, deadline: float) -> float:
    return (deadline - d.state.start) * 1e3


@pytest.mark.parametrize(
    ("budget", "expected_ms"),
    [
        (Budget(), 3 * 5 + 50),  # no budget: the hang deadline (a frozen node costs 65 ms)
        (Budget(energy_mj=5), 3 * 5 + 50),
        (Budget(latency_ms=1000), 3 * 5 + 50),  # a generous budget does not wait on a hang
        (Budget(latency_ms=30), 30 - 2),  # a tight budget: its end, less the overhead
    ],
)
def test_each_call_gets_the_earliest_of_hang_deadline_and_budget_end(
    budget: Budget, expected_ms: float
) -> None:
    d = dispatch_for(budget)
    expert = d.state.plan.experts[0]  # type: ignore[union-attr]
    assert ms_after_start(d, d.deadline(expert, d.state.start, within_budget=True)) == pytest.approx(
        expected_ms
    )


def test_outside_the_budget_only_the_hang_deadline_and_the_request_deadline_apply() -> None:
    d = dispatch_for(Budget(latency_ms=10))
    expert = d.state.plan.experts[0]  # type: ignore[union-attr]
    assert ms_after_start(d, d.deadline(expert, d.state.start, within_budget=False)) == pytest.approx(65)


def test_the_callers_deadline_and_expert_timeout_cap_everything() -> None:
    d = dispatch_for(Budget(latency_ms=1000), expert_timeout_ms=40)
    expert = d.state.plan.experts[0]  # type: ignore[union-attr]
    assert ms_after_start(d, d.deadline(expert, d.state.start, within_budget=True)) == pytest.approx(40)
    d = dispatch_for(Budget(), caller_deadline=time.monotonic() + 0.030)
    expert = d.state.plan.experts[0]  # type: ignore[union-attr]
    assert ms_after_start(d, d.deadline(expert, d.state.start, within_budget=True)) == pytest.approx(
        25, abs=1
    )
