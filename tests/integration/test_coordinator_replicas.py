"""Replicas, frozen nodes and budget policies through a real coordinator and real nodes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from moesaic.coordinator.config import parse_fleet
from tests.helpers import slow_node  # noqa: F401  (registers the test_sleep processor in-process)
from tests.helpers.nodes import node_process, running_node
from tests.integration.test_coordinator_perceive import (
    FEATURES,
    coordinator,
    fleet,
    write_classifier,
    x_request,
)


async def test_a_model_on_two_nodes_is_one_expert_whose_requests_spread_over_its_replicas(
    tmp_path: Path,
) -> None:
    for node in ("a", "b"):
        write_classifier(tmp_path / node, "cls", seed=1, sleep_s=0.05)
    with running_node(tmp_path / "a") as a, running_node(tmp_path / "b") as b:
        prior = [{"model": "cls", "latency_ms": 50}]
        nodes = [{"address": a.address, "name": n, "experts": prior} for n, a in (("n0", a), ("n1", b))]
        async with coordinator(fleet(nodes)) as (stub, _):
            replies = await asyncio.gather(
                *(stub.Perceive(x_request(np.zeros(FEATURES), rid=str(i)), timeout=20) for i in range(12))
            )
    served = []
    for reply in replies:  # never fused with itself: one answer of the one expert
        ok = [e for e in reply.experts if e.status == "ok"]
        assert [e.expert_id for e in ok] == ["cls"] and ok[0].weight == pytest.approx(1.0)
        served.append(ok[0].node)
    # Twelve concurrent 50 ms requests: the expected wait sends some to each replica.
    assert served.count("n0") >= 3 and served.count("n1") >= 3, served


async def test_with_a_frozen_node_and_no_budget_requests_are_still_answered_within_a_second(
    tmp_path: Path,
) -> None:
    write_classifier(tmp_path / "a", "cls-a", seed=1)
    write_classifier(tmp_path / "b", "cls-b", seed=2)
    with node_process(tmp_path / "a") as (proc_a, addr_a), node_process(tmp_path / "b") as (_, addr_b):
        nodes = [{"address": addr_a, "name": "n0"}, {"address": addr_b, "name": "n1"}]
        async with coordinator(fleet(nodes, probe_interval_s=0.5)) as (stub, _):
            await stub.Perceive(x_request(np.zeros(FEATURES)), timeout=10)  # both answer once
            proc_a.send_signal(signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                took: list[float] = []
                answered_by: list[set[str]] = []

                async def one(i: int) -> None:
                    t0 = loop.time()
                    reply = await stub.Perceive(x_request(np.full(FEATURES, i % 5, np.float32)), timeout=30)
                    took.append(loop.time() - t0)
                    answered_by.append({e.expert_id for e in reply.experts if e.status == "ok"})

                tasks = []
                for i in range(100):
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(0.02)
                await asyncio.gather(*tasks)
            finally:
                proc_a.send_signal(signal.SIGCONT)
    within = sum(t < 1.0 for t in took)
    assert within >= 99, sorted(took)[-5:]
    assert all(ok == {"cls-b"} for ok in answered_by[5:])  # the frozen replica is skipped


async def test_shed_policy_refuses_what_no_expert_set_can_meet(tmp_path: Path) -> None:
    write_classifier(tmp_path / "a", "cls-a", seed=1)
    with node_process(tmp_path / "a") as (_, addr):
        config = parse_fleet(
            {
                "coordinator": {"overhead_ms": 2},
                "nodes": [{"address": addr, "name": "n0", "experts": [{"model": "cls-a", "latency_ms": 50}]}],
                "tasks": {"classification": {"on_infeasible": "shed"}},
            },
            env={},
        )
        async with coordinator(config) as (stub, _):
            fits = await stub.Perceive(x_request(np.zeros(FEATURES), latency_ms=500), timeout=10)
            assert fits.budget_met and fits.feasible
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Perceive(x_request(np.zeros(FEATURES), latency_ms=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no expert set fits" in info.value.details()


async def test_option_experts_restricts_the_choice_and_refuses_an_unknown_expert(tmp_path: Path) -> None:
    write_classifier(tmp_path / "a", "cls-a", seed=1)
    write_classifier(tmp_path / "a", "cls-b", seed=2)
    with node_process(tmp_path / "a") as (_, addr):
        async with coordinator(fleet([{"address": addr, "name": "n0"}])) as (stub, _):
            req = x_request(np.zeros(FEATURES))
            both = await stub.Perceive(req, timeout=10)
            assert {e.expert_id for e in both.experts} == {"cls-a", "cls-b"}
            req.options["experts"] = "cls-b"
            one = await stub.Perceive(req, timeout=10)
            assert [e.expert_id for e in one.experts] == ["cls-b"]
            req.options["experts"] = "cls-z"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Perceive(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cls-z" in info.value.details()
