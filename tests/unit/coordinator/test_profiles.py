"""Load-aware prediction: a replica's profile (priors, replies, waits, timeouts) and the registry's
choice of replica."""

from __future__ import annotations

import math
import time

import pytest

from moesaic.coordinator.config import ExpertOverride, parse_fleet
from moesaic.coordinator.profiles import FLOOR_HALF_LIFE_S, STALE_S, Profile
from moesaic.nodes.client import InferResult
from moesaic.proto import moesaic_pb2
from tests.unit.coordinator.fleet_state import registry_of

SETTINGS = parse_fleet({}, env={}).coordinator


def described(service_ms: float = 0.0, energy_mj: float = 0.0, wait_ms: float = 0.0, profile_ms: float = 0.0):  # type: ignore[no-untyped-def]
    model = moesaic_pb2.ModelDescription(
        name="m", task="detection", service_ms=service_ms, energy_mj=energy_mj, expected_wait_ms=wait_ms
    )
    if profile_ms:
        model.profiles.add(
            batch_size=1, latency_ms=moesaic_pb2.LatencyQuantiles(p50=profile_ms), energy_mj_per_inference=7.0
        )
    return model


@pytest.mark.parametrize(
    ("model", "override", "service", "energy"),
    [
        (described(), None, SETTINGS.default_latency_ms, SETTINGS.default_energy_mj),  # nothing known
        (described(service_ms=12.0, energy_mj=30.0), None, 12.0, 30.0),  # the node's probe
        (described(service_ms=12.0, profile_ms=20.0), None, 20.0, 7.0),  # a profile file wins
        (described(service_ms=12.0), ExpertOverride(model="m", latency_ms=5.0, energy_mj=1.0), 5.0, 1.0),
    ],
)
def test_prior_takes_override_then_profile_file_then_the_nodes_probe(
    model, override, service, energy
) -> None:  # type: ignore[no-untyped-def]
    p = Profile.prior(model, override, SETTINGS, round_trip_ms=3.0)
    assert p.service_ms == service and p.energy_mj == energy
    assert p.network_ms == (0.0 if override is not None else 3.0)


def reply(compute_ms: float, energy_mj: float, queue_ms: float = 0.0, wait_ms: float = 0.0) -> InferResult:
    params = {"queue_ms": queue_ms, "expected_wait_ms": wait_ms}
    return InferResult("m", {}, compute_ms, energy_mj, "nvml+attributed", params)


def test_replies_teach_service_network_and_energy_and_the_first_replaces_the_prior() -> None:
    p = Profile(service_ms=50.0, network_ms=10.0, energy_mj=0.0)
    p.observe(reply(20.0, 100.0, queue_ms=5.0), round_trip_ms=27.0, alpha=0.5)
    assert (p.service_ms, p.network_ms, p.energy_mj) == (20.0, 2.0, 100.0)
    p.observe(reply(30.0, 200.0), round_trip_ms=34.0, alpha=0.5)
    assert (p.service_ms, p.network_ms, p.energy_mj) == (25.0, 3.0, 150.0)
    assert p.energy_source == "nvml+attributed"


def test_wait_is_the_nodes_report_counted_down_or_the_work_this_coordinator_has_in_flight() -> None:
    p = Profile(service_ms=10.0, network_ms=1.0, energy_mj=0.0)
    p.report_wait(40.0, now=100.0)
    assert p.wait_ms(100.010) == pytest.approx(30.0)
    assert p.completion_ms(100.050) == pytest.approx(11.0)  # the reported queue has drained
    for call in range(5):
        p.begin(call, now=100.050)
    assert p.wait_ms(100.052) == pytest.approx(5 * 8.0)  # five calls, 8 ms of service left each
    for call in range(5):
        p.end(call)
    assert p.wait_ms(100.052) == 0.0


def test_a_timeout_sets_a_decaying_floor_that_a_reply_clears() -> None:
    p = Profile(service_ms=5.0, network_ms=1.0, energy_mj=0.0)
    p.observe_timeout(65.0, now=10.0)
    assert p.completion_ms(10.0) == pytest.approx(65.0)
    assert p.completion_ms(10.0 + FLOOR_HALF_LIFE_S) == pytest.approx(32.5)  # halves
    p.observe_timeout(30.0, now=10.0)  # a shorter miss does not lower it
    assert p.completion_ms(10.0) == pytest.approx(65.0)
    p.observe_timeout(math.nan, now=10.0)
    p.observe(reply(4.0, 1.0), round_trip_ms=5.0, alpha=0.5)
    assert p.completion_ms(10.0) == pytest.approx(5.0)
    assert p.latency_ms == pytest.approx(5.0)  # the service time itself never took the miss


def test_the_registry_offers_each_model_once_through_its_earliest_replica_and_keeps_sensor_affinity() -> None:
    registry = registry_of({"a/m": (10.0, 1.0), "b/m": (30.0, 1.0), "b/k": (5.0, 1.0)})
    offer = {e.id: e.replica.id for e in registry.experts("classification", now=0.0)}
    assert offer == {"k": "b/k", "m": "a/m"}
    fast = registry.nodes[0].replicas["m"]
    for call in range(4):  # this coordinator queued 40 ms on a/m
        fast.profile.begin(call, now=0.0)
    assert {e.id: e.replica.id for e in registry.experts("classification", now=0.0)}["m"] == "b/m"
    # A stream pinned to a/m stays there while a/m is eligible.
    expert = next(e for e in registry.experts("classification", now=0.0) if e.id == "m")
    registry.pin(registry.offer(fast), "lidar-0")
    pinned = next(e for e in registry.experts("classification", sensor="lidar-0", now=0.0) if e.id == "m")
    assert pinned.replica.id == "a/m" and expert.replica.id == "b/m"
    assert (
        next(
            e for e in registry.experts("classification", avoid={"a/m"}, sensor="lidar-0") if e.id == "m"
        ).replica.id
        == "b/m"
    )


def test_a_replica_priced_out_by_an_old_load_comes_back() -> None:
    p = Profile(service_ms=10.0, network_ms=1.0, energy_mj=0.0)
    p.observe(reply(50.0, 1.0), round_trip_ms=51.0, alpha=0.5)  # unloaded
    for _ in range(6):
        p.observe(reply(400.0, 1.0), round_trip_ms=401.0, alpha=0.5)  # then a heavy load
    assert p.latency_ms > 400
    now = time.monotonic()
    p.refresh(described(service_ms=300.0), None, now)  # a reply just came: nothing moves
    assert p.latency_ms > 400
    for _ in range(6):  # no reply for STALE_S: pulled towards the fastest answer seen
        p.refresh(described(service_ms=300.0), None, now + STALE_S + 1)
    assert p.service_ms == pytest.approx(50.0, abs=350.0 / 64 + 1) and p.latency_ms < 70
