"""A real coordinator over real nodes on loopback: Perceive with budgets, fusion, failover.

Experts are small ONNX classifiers built here (input ``x`` FP32 [1, 6] -> ``probs`` [1, 3] =
softmax(x W + b)), a deliberately slow one (the ``test_sleep`` processor), and a toy
detector (``image`` -> one 10-px box at the tile origin, score = mean brightness).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from moesaic.coordinator.config import FleetConfig, parse_fleet
from moesaic.coordinator.service import serve
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc
from tests.helpers import slow_node  # noqa: F401  (registers the test_sleep processor in-process)
from tests.helpers.images import png_bomb
from tests.helpers.nodes import node_process, running_node
from tests.helpers.onnx_models import write_model, write_toy_detector

FEATURES, CLASSES = 6, 3


def weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (FEATURES, CLASSES)).astype(np.float32), rng.normal(0, 0.1, CLASSES).astype(
        np.float32
    )


def softmax_probs(x: np.ndarray, seed: int) -> np.ndarray:
    w, b = weights(seed)
    z = x @ w + b
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def write_classifier(root: Path, name: str, seed: int, *, sleep_s: float = 0.0) -> None:
    w, b = weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", CLASSES])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    processor = f"processor: {{type: test_sleep, seconds: {sleep_s}}}\n" if sleep_s else ""
    write_model(root / name, graph, model_yaml=f"task: classification\nclass_names: [a, b, c]\n{processor}")


def x_request(x: np.ndarray, *, latency_ms: float = 0, energy_mj: float = 0, rid: str = "") -> Any:
    x = np.ascontiguousarray(x, np.float32).reshape(1, FEATURES)
    return moesaic_pb2.PerceiveRequest(
        request_id=rid,
        task="classification",
        budget=moesaic_pb2.Budget(latency_ms=latency_ms, energy_mj=energy_mj),
        tensor=moesaic_pb2.Tensor(name="x", datatype="FP32", shape=[1, FEATURES], data=x.tobytes()),
    )


@contextlib.asynccontextmanager
async def coordinator(config: FleetConfig) -> AsyncIterator[Any]:
    """The real `serve()` on a free port; yields a Coordinator stub."""
    ready, bound = asyncio.Event(), []
    task = asyncio.create_task(serve(config, "127.0.0.1:0", ready=ready, bound=bound, handle_signals=False))
    await asyncio.wait_for(ready.wait(), 30)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound[0]}")
    try:
        yield moesaic_pb2_grpc.CoordinatorStub(channel), channel
    finally:
        await channel.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def fleet(nodes: list[dict[str, Any]], **coordinator_settings: Any) -> FleetConfig:
    settings = {"overhead_ms": 2.0, "probe_interval_s": 0.3, **coordinator_settings}
    return parse_fleet({"coordinator": settings, "nodes": nodes}, env={})


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Node n0 serves cls-a and det; node n1 serves cls-b, det and cls-slow (sleeps 1.5 s)."""
    root = tmp_path_factory.mktemp("coordinator-fleet")
    write_classifier(root / "n0", "cls-a", seed=1)
    write_toy_detector(root / "n0", "det")
    write_classifier(root / "n1", "cls-b", seed=2)
    write_classifier(root / "n1", "cls-slow", seed=3, sleep_s=1.5)
    write_toy_detector(root / "n1", "det")
    with running_node(root / "n0") as a, running_node(root / "n1") as b:
        yield a.address, b.address


def priors(a: str, b: str, **per_model: dict[str, Any]) -> list[dict[str, Any]]:
    """Fleet nodes with per-model profile priors (latency_ms/energy_mj/weight)."""

    def experts(models: list[str]) -> list[dict[str, Any]]:
        return [{"model": m, **per_model.get(m.replace("-", "_"), {})} for m in models]

    return [
        {"address": a, "name": "n0", "experts": experts(["cls-a", "det"])},
        {"address": b, "name": "n1", "experts": experts(["cls-b", "cls-slow", "det"])},
    ]


NO_SLOW = {"cls_slow": {"enabled": False}}


async def test_perceive_fuses_both_nodes_and_reports_costs(two_nodes: tuple[str, str]) -> None:
    config = fleet(
        priors(
            *two_nodes,
            cls_a={"latency_ms": 5, "energy_mj": 10},
            cls_b={"latency_ms": 5, "energy_mj": 10},
            **NO_SLOW,
        )
    )
    x = np.linspace(-1, 1, FEATURES, dtype=np.float32)
    async with coordinator(config) as (stub, _):
        reply = await stub.Perceive(x_request(x, rid="r1"), timeout=10)
    assert reply.request_id == "r1" and reply.task == "classification" and reply.budget_met
    assert {e.expert_id for e in reply.experts} == {"cls-a", "cls-b"}
    assert all(e.status == "ok" for e in reply.experts)
    assert sum(e.weight for e in reply.experts) == pytest.approx(1.0)
    assert reply.predicted_energy_mj == pytest.approx(20.0)
    assert reply.predicted_latency_ms == pytest.approx(7.0)  # two devices overlap: 5 + overhead 2
    assert reply.measured_latency_ms > 0
    probs = np.frombuffer(reply.grid.data, np.float32).reshape(tuple(reply.grid.shape))
    w = {e.expert_id: e.weight for e in reply.experts}
    expected = w["cls-a"] * softmax_probs(x, 1) + w["cls-b"] * softmax_probs(x, 2)
    assert np.allclose(probs.reshape(-1), expected.reshape(-1), atol=1e-5)


async def test_energy_budget_limits_the_set_and_unmeetable_budget_says_so(two_nodes: tuple[str, str]) -> None:
    config = fleet(
        priors(
            *two_nodes,
            cls_a={"latency_ms": 5, "energy_mj": 10, "weight": 2},
            cls_b={"latency_ms": 5, "energy_mj": 12},
            **NO_SLOW,
        )
    )
    x = np.zeros(FEATURES, np.float32)
    async with coordinator(config) as (stub, _):
        one = await stub.Perceive(x_request(x, energy_mj=15), timeout=10)
        assert [e.expert_id for e in one.experts] == ["cls-a"] and one.experts[0].weight == pytest.approx(1.0)
        assert one.predicted_energy_mj <= 15
        # 0.5 ms cannot fit the 2 ms overhead: the cheapest expert runs and the reply says so.
        late = await stub.Perceive(x_request(x, latency_ms=0.5), timeout=10)
        assert not late.budget_met and len(late.experts) == 1 and late.experts[0].status == "ok"
        assert late.budget_reason == "no_feasible_set"
        assert late.WhichOneof("output") == "grid"


async def test_deadline_miss_drops_the_expert_and_reselects(two_nodes: tuple[str, str]) -> None:
    # cls-slow claims 5 ms but sleeps 1.5 s. It is given up at its hang deadline (3 x its
    # prediction + 50 ms), long before the 600 ms budget ends, and cls-a replaces it.
    config = fleet(
        priors(
            *two_nodes,
            cls_slow={"latency_ms": 5, "energy_mj": 1, "weight": 100},
            cls_a={"latency_ms": 5, "energy_mj": 5},
            cls_b={"enabled": False},
        ),
        max_experts=1,
    )
    async with coordinator(config) as (stub, _):
        reply = await stub.Perceive(x_request(np.ones(FEATURES), latency_ms=600), timeout=10)
        status = {e.expert_id: e.status for e in reply.experts}
        assert status == {"cls-slow": "deadline", "cls-a": "ok"}
        assert reply.measured_latency_ms < 400 and reply.budget_met and reply.budget_reason == ""
        ok = [e for e in reply.experts if e.status == "ok"]
        assert ok[0].weight == pytest.approx(1.0)
        # The miss taught cls-slow's live latency (>= the time it was waited for): a budget
        # below that skips it.
        tight = await stub.Perceive(x_request(np.ones(FEATURES), latency_ms=40), timeout=10)
        assert [(e.expert_id, e.status) for e in tight.experts] == [("cls-a", "ok")]
        # Its node stayed up; with no budget every miss raises what it is waited for, so the
        # slow expert soon finishes.
        for _ in range(8):
            await asyncio.sleep(0.6)  # its node answers a probe: the replica is no longer suspect
            free = await stub.Perceive(x_request(np.ones(FEATURES)), timeout=10)
            if ("cls-slow", "ok") in [(e.expert_id, e.status) for e in free.experts]:
                break
        assert [(e.expert_id, e.status) for e in free.experts] == [("cls-slow", "ok")]
        assert free.measured_latency_ms >= 1400 and free.budget_met


async def test_every_expert_slower_than_the_budget_still_answers(two_nodes: tuple[str, str]) -> None:
    # Only cls-slow (1.5 s) serves the task; a 100 ms budget cannot be met, so the cheapest
    # expert runs anyway (budget_met=False), twice: a slow expert never takes its node down.
    config = fleet(
        priors(
            *two_nodes,
            cls_slow={"latency_ms": 1500, "energy_mj": 1},
            cls_a={"enabled": False},
            cls_b={"enabled": False},
        ),
    )
    async with coordinator(config) as (stub, _):
        for _ in range(2):
            reply = await stub.Perceive(x_request(np.ones(FEATURES), latency_ms=100), timeout=10)
            assert [(e.expert_id, e.status) for e in reply.experts] == [("cls-slow", "ok")]
            assert not reply.budget_met and reply.WhichOneof("output") == "grid"
            assert reply.budget_reason == "no_feasible_set" and not reply.feasible
            assert reply.cheapest_latency_ms >= 1500 and reply.budget.latency_ms == 100


async def test_bad_requests_get_clear_errors(two_nodes: tuple[str, str]) -> None:
    config = fleet(priors(*two_nodes, **NO_SLOW))
    async with coordinator(config) as (stub, channel):
        bad = x_request(np.zeros(FEATURES))
        bad.tensor.data = b"\x00" * 7
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Perceive(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tensor.data" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Perceive(moesaic_pb2.PerceiveRequest(task="juggling"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "task" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # not echoed whole (nor RESOURCE_EXHAUSTED)
            await stub.Perceive(moesaic_pb2.PerceiveRequest(task="x" * 20_000), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 300
        with pytest.raises(grpc.aio.AioRpcError) as info:  # refused from its header, before any expert
            bomb = moesaic_pb2.PerceiveRequest(task="detection", image=moesaic_pb2.Image(data=png_bomb()))
            await stub.Perceive(bomb, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decompression bomb" in info.value.details() and "0x" not in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # not a PerceiveRequest at all
            await channel.unary_unary("/moesaic.v1.Coordinator/Perceive")(
                b"\xff\xff garbage \x00", timeout=10
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            seg = x_request(np.zeros(FEATURES))
            seg.task = "bev_segmentation"
            await stub.Perceive(seg, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no expert of that task in this fleet
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service="moesaic.v1.Coordinator"), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_stream_survives_bad_requests_and_a_node_killed_mid_stream(tmp_path: Path) -> None:
    write_classifier(tmp_path / "a", "cls-a", seed=1)
    write_classifier(tmp_path / "b", "cls-b", seed=2)
    with node_process(tmp_path / "a") as (proc_a, addr_a), node_process(tmp_path / "b") as (_, addr_b):
        nodes = [
            {"address": addr_a, "name": "n0", "experts": [{"model": "cls-a", "latency_ms": 5, "weight": 5}]},
            {"address": addr_b, "name": "n1", "experts": [{"model": "cls-b", "latency_ms": 5}]},
        ]
        config = fleet(nodes, max_experts=1, probe_interval_s=30)
        async with coordinator(config) as (stub, _):
            queue: asyncio.Queue[Any] = asyncio.Queue()

            async def requests() -> AsyncIterator[Any]:
                while (item := await queue.get()) is not None:
                    yield item

            call = stub.PerceiveStream(requests(), timeout=30)
            await queue.put(x_request(np.zeros(FEATURES), rid="1", latency_ms=2000))
            first = await call.read()
            assert first.request_id == "1" and [e.expert_id for e in first.experts] == ["cls-a"]
            await queue.put(moesaic_pb2.PerceiveRequest(request_id="bad", task="classification"))
            bad = await call.read()
            assert (
                bad.request_id == "bad" and bad.error.startswith("INVALID_ARGUMENT") and "input" in bad.error
            )
            proc_a.kill()
            proc_a.wait(timeout=10)
            await queue.put(x_request(np.zeros(FEATURES), rid="2", latency_ms=2000))
            second = await call.read()
            assert second.request_id == "2" and not second.error
            status = {e.expert_id: e.status for e in second.experts}
            assert status == {"cls-a": "error", "cls-b": "ok"}  # reselected within the budget
            await queue.put(x_request(np.zeros(FEATURES), rid="3", latency_ms=2000))
            third = await call.read()
            assert [e.expert_id for e in third.experts] == ["cls-b"]  # n0 is down: out of the pool
            await queue.put(None)
            assert await call.read() == grpc.aio.EOF


async def test_sliced_detection_spreads_tiles_over_both_nodes(two_nodes: tuple[str, str]) -> None:
    config = fleet(priors(*two_nodes, det={"latency_ms": 5, "energy_mj": 1}, **NO_SLOW))
    image = np.full((128, 192, 3), 200, np.uint8)
    request = moesaic_pb2.PerceiveRequest(
        task="detection",
        image=moesaic_pb2.Image(data=image.tobytes(), encoding="rgb8", width=192, height=128),
        options={"slice": "64", "overlap": "0"},
    )
    async with coordinator(config) as (stub, _):
        reply = await stub.Perceive(request, timeout=20)
    assert reply.WhichOneof("output") == "detections"
    tiles = 2 * 3
    origins = sorted((round(d.xyxy[0]), round(d.xyxy[1])) for d in reply.detections.items)
    assert origins == sorted((x, y) for x in (0, 64, 128) for y in (0, 64))
    assert all(
        d.score == pytest.approx(200 / 255, abs=1e-3) and d.class_name == "thing"
        for d in reply.detections.items
    )
    assert {e.expert_id for e in reply.experts} == {"det"}  # one expert, two replicas
    assert {e.node for e in reply.experts} == {"n0", "n1"}
    assert sum(e.weight for e in reply.experts) == pytest.approx(1.0)
    assert all(e.weight * tiles >= 1 for e in reply.experts)  # both nodes took tiles


def test_build_validation_train_gate_then_coarse_selection(
    two_nodes: tuple[str, str], tmp_path: Path
) -> None:
    from moesaic.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "frames"
    data.mkdir()
    for i in range(24):
        x = rng.normal(0, 1, (1, FEATURES)).astype(np.float32)
        label = int(
            np.argmax(softmax_probs(x, 1 + i % 2))
        )  # half the frames agree with cls-a, half with cls-b
        np.savez(data / f"{i:03d}.npz", x=x, label=np.array(label))
    a, b = two_nodes
    (tmp_path / "fleet.yaml").write_text(
        f"nodes:\n  - {{address: '{a}', name: n0, only_listed: true, experts: [{{model: cls-a}}]}}\n"
        f"  - {{address: '{b}', name: n1, only_listed: true, experts: [{{model: cls-b}}]}}\n"
        "tasks:\n  classification: {gate: gate.json, validation: table.npz}\n"
    )
    fleet_yaml = str(tmp_path / "fleet.yaml")
    args = ["build-validation", "--config", fleet_yaml, "--task", "classification", "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "table.npz")]) == 0
    assert (
        main(["train-gate", "--table", str(tmp_path / "table.npz"), "--out", str(tmp_path / "gate.json")])
        == 0
    )
    assert (
        main(
            [
                "build-validation",
                "--config",
                fleet_yaml,
                "--task",
                "vlm",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )

    from moesaic.budget import Budget
    from moesaic.coordinator.config import load_fleet
    from moesaic.coordinator.core import Coordinator, PerceiveInput
    from moesaic.coordinator.inputs import RequestInputs

    async def run() -> list[str]:
        async with Coordinator(load_fleet(tmp_path / "fleet.yaml", env={})) as c:
            x = np.zeros((1, FEATURES), np.float32)
            p = await c.perceive(PerceiveInput("classification", RequestInputs({"x": x}), Budget()))
            assert c.planner.solves == 1 and p.budget_met
            return [r.expert.id for r in p.runs]

    assert set(asyncio.run(run())) <= {"cls-a", "cls-b"}


def test_coordinator_command_rejects_bad_config(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("coordinator: {overhed_ms: 1}\n")
    from moesaic.cli import main

    assert main(["coordinator", "--config", str(tmp_path / "fleet.yaml")]) == 2


async def test_a_frozen_node_and_a_killed_node_under_load_leave_no_request_unanswered(tmp_path: Path) -> None:
    """SIGSTOP one node and SIGKILL another while requests stream in: every request gets its
    result or an explicit error before its deadline, and the fleet keeps answering."""
    for i, name in enumerate(("a", "b", "c")):
        write_classifier(tmp_path / name, f"cls-{name}", seed=i + 1)
    with (
        node_process(tmp_path / "a") as (proc_a, addr_a),
        node_process(tmp_path / "b") as (proc_b, addr_b),
        node_process(tmp_path / "c") as (_, addr_c),
    ):
        nodes = [
            {"address": addr, "name": f"n{i}", "experts": [{"model": f"cls-{name}", "latency_ms": 5}]}
            for i, (name, addr) in enumerate((("a", addr_a), ("b", addr_b), ("c", addr_c)))
        ]
        async with coordinator(fleet(nodes, probe_interval_s=30)) as (stub, _):
            outcomes: list[tuple[str, float]] = []
            deadline_s = 2.0

            async def one(i: int) -> None:
                start = asyncio.get_running_loop().time()
                try:
                    reply = await stub.Perceive(
                        x_request(np.full(FEATURES, i % 7, np.float32), latency_ms=600, rid=str(i)),
                        timeout=deadline_s,
                    )
                    outcome = "ok" if any(e.status == "ok" for e in reply.experts) else "no-expert"
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code().name
                outcomes.append((outcome, asyncio.get_running_loop().time() - start))

            tasks = []
            for i in range(60):
                if i == 15:
                    proc_a.send_signal(signal.SIGSTOP)  # frozen: connections stay open, nothing answers
                if i == 30:
                    proc_b.kill()
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.03)
            await asyncio.gather(*tasks)
            late = await stub.Perceive(x_request(np.zeros(FEATURES), latency_ms=600), timeout=deadline_s)
            proc_a.send_signal(signal.SIGCONT)
    assert len(outcomes) == 60
    assert all(seconds < deadline_s for _, seconds in outcomes), sorted(s for _, s in outcomes)[-5:]
    assert {o for o, _ in outcomes} <= {"ok", "UNAVAILABLE"}, outcomes
    assert sum(o == "ok" for o, _ in outcomes) >= 50
    assert [e.expert_id for e in late.experts if e.status == "ok"] == ["cls-c"]
