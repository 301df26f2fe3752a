"""Failover policy: what a missed deadline, an error reply and a transport failure do to a node,
and the per-expert deadline derived from the request's budget."""

from __future__ import annotations

import pytest

from moesaic.coordinator.config import parse_fleet
from moesaic.coordinator.core import Coordinator
from moesaic.coordinator.registry import Expert, Registry
from moesaic.coordinator.selection import Budget


def make_registry(**settings: object) -> tuple[Registry, Expert]:
    config = parse_fleet(
        {"coordinator": settings, "nodes": [{"address": "127.0.0.1:1", "name": "edge-b"}]}, env={}
    )
    registry = Registry(config)
    node = registry.nodes[0]
    expert = Expert("edge-b/m", "edge-b", "m", "detection", "edge-b/cpu", 10.0, 5.0)
    node.experts["m"] = expert
    node.up = True
    return registry, expert


def test_deadline_misses_raise_the_live_latency_and_never_take_the_node_down() -> None:
    registry, expert = make_registry(failures_to_down=1, ewma_alpha=0.2)
    for _ in range(5):
        registry.observe_timeout(expert, 123.0)
    assert registry.nodes[0].up
    assert 60.0 < expert.latency_ms <= 123.0
    assert "deadline after 123 ms" in registry.nodes[0].last_error
    assert [e.id for e in registry.experts("detection")] == ["edge-b/m"]


def test_error_replies_do_not_count_but_transport_failures_do() -> None:
    registry, expert = make_registry(failures_to_down=2)
    for _ in range(3):
        registry.record_expert_error(expert, "INTERNAL: engine failed")
    assert registry.nodes[0].up
    registry.record_failure(expert, "UNAVAILABLE: no route")
    assert registry.nodes[0].up  # one transport failure of two
    registry.record_failure(expert, "UNAVAILABLE: connection refused")
    assert not registry.nodes[0].up and registry.experts("detection") == []


def test_unreachable_takes_the_node_down_at_once() -> None:
    registry, expert = make_registry(failures_to_down=3)
    registry.record_failure(expert, "UNAVAILABLE: connection refused", unreachable=True)
    assert not registry.nodes[0].up


def make_coordinator(**settings: object) -> tuple[Coordinator, Expert]:
    config = parse_fleet(
        {
            "coordinator": {"overhead_ms": 2, "deadline_slack": 3, "deadline_margin_ms": 50, **settings},
            "nodes": [{"address": "127.0.0.1:1", "name": "edge-b"}],
        },
        env={},
    )
    coordinator = Coordinator(config, task_models={})
    expert = Expert("edge-b/m", "edge-b", "m", "detection", "edge-b/cpu", 5.0, 5.0)
    return coordinator, expert


def ms(deadline: float, now: float) -> float:
    return (deadline - now) * 1e3


def test_no_latency_budget_waits_expert_timeout_ms() -> None:
    c, e = make_coordinator(expert_timeout_ms=4000)
    assert ms(c._deadline(e, 100.0, 100.0, Budget(), True, None), 100.0) == pytest.approx(4000)
    assert ms(c._deadline(e, 100.0, 100.0, Budget(energy_mj=5), True, None), 100.0) == pytest.approx(4000)
    # An expert run regardless of the budget (last resort) also gets expert_timeout_ms.
    assert ms(c._deadline(e, 100.0, 100.0, Budget(latency_ms=10), False, None), 100.0) == pytest.approx(4000)


def test_generous_budget_waits_until_a_replacement_could_still_make_it() -> None:
    c, e = make_coordinator(expert_timeout_ms=10000)
    # Predicted 5 ms (stale), budget 1000 ms, replacement needs 65 ms: wait 1000 - 2 - 65 ms.
    d = c._deadline(e, 100.0, 100.0, Budget(latency_ms=1000), True, None, reserve_ms=65)
    assert ms(d, 100.0) == pytest.approx(933)


def test_tight_budget_has_a_floor_of_slack_times_prediction_plus_margin() -> None:
    c, e = make_coordinator()
    d = c._deadline(e, 100.0, 100.0, Budget(latency_ms=10), True, None, reserve_ms=65)
    assert ms(d, 100.0) == pytest.approx(3 * 5 + 50)


def test_the_callers_deadline_and_expert_timeout_cap_everything() -> None:
    c, e = make_coordinator(expert_timeout_ms=300)
    assert ms(c._deadline(e, 100.0, 100.0, Budget(latency_ms=1000), True, None), 100.0) == pytest.approx(300)
    assert ms(c._deadline(e, 100.0, 100.0, Budget(), True, 100.2), 100.0) == pytest.approx(195)
