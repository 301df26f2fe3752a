"""Budget adherence under load: do requests that could meet their budget meet it, as load rises?

    .venv/bin/python bench/budget_adherence.py                  # ~9 min on 2 cores
    .venv/bin/python bench/budget_adherence.py --seconds 6 --loads 0.5,1.0   # quick look

The fleet is what users run: two ``moesaic node`` processes (yolo-n on one, yolo-n-640 on the
other, one thread each) and a ``moesaic coordinator`` process; this process is the gRPC
client. The two nodes share this host's CPUs, so the fleet config gives them one device
(``device: this-host-cpu``): the coordinator predicts that their work queues, not overlaps.
Frames are real camera images (KITTI, nuScenes; fixtures from ../shared/data/real, never
shipped), each request with a budget from a cycle sized to the experts' measured
costs: some admit only yolo-n, some yolo-n-640 or both, some nothing (those are refused:
the task's policy is ``shed``).

1. **Calibrate**: each expert alone, unloaded (option ``experts=``), for its p50 latency;
   then the fleet's capacity: closed-loop throughput of the MoE² policy over the budget cycle.
2. **Load**: Poisson arrivals at 20, 50, 80, 100 and 120 % of capacity for each policy:
   ``moe2`` (the coordinator's choice), ``best_single`` (yolo-n-640 only), ``all`` (both
   experts, no budget sent; judged against the budget) and ``random`` (a random expert set
   that the calibrated costs say fits, sent with the budget).

Per policy and load: within-budget share of the feasible requests (feasible: the budget is at
least the cheapest expert's unloaded p95 — the same rule for every policy; "(coord.)": those the
coordinator's own prediction admitted, for the policies that send the budget), shed and
flagged shares, *silently late* replies (late but ``budget_met`` true: must be 0), p50/p99
latency and mean energy. Raw JSON:
``bench/results/budget_adherence.json`` with command, commit and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import write_results  # noqa: E402
from moesaic.fleet import ProcessTree, free_port, wait_grpc_ready  # noqa: E402
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc  # noqa: E402

REAL = Path("/work/shared/data/real")
EXPERTS = ("yolo-n", "yolo-n-640")
POLICIES = ("moe2", "best_single", "all", "random")


@dataclass
class Outcome:
    budget_ms: float
    feasible: bool
    """Static rule, every policy: the budget is at least the cheapest expert's unloaded p95."""
    sent_at: float
    budget_sent: bool = True
    """False for the ``all`` policy: sent without a budget, judged against it."""
    code: str = "OK"
    latency_ms: float = 0.0
    energy_mj: float = 0.0
    budget_met: bool = False
    predicted_feasible: bool = False
    experts: list[str] = field(default_factory=list)

    @property
    def within(self) -> bool:
        return self.code == "OK" and self.latency_ms <= self.budget_ms


def images() -> list[bytes]:
    files = [REAL / "kitti_000008.png", REAL / "nuscenes_cam_front.jpg"]
    found = [f.read_bytes() for f in files if f.exists()]
    if not found:
        raise SystemExit(f"no camera images in {REAL}")
    return found


def request(image: bytes, budget_ms: float, experts: tuple[str, ...] = ()) -> Any:
    return moesaic_pb2.PerceiveRequest(
        task="detection",
        image=moesaic_pb2.Image(data=image),
        budget=moesaic_pb2.Budget(latency_ms=budget_ms),
        options={"experts": ",".join(experts)} if experts else {},
    )


def start_fleet(tree: ProcessTree, work: Path) -> str:
    nodes = []
    for i, model in enumerate(EXPERTS):
        repo = work / f"node{i}"
        repo.mkdir()
        shutil.copytree(ROOT / "models" / model, repo / model)
        spec = (repo / model / "model.yaml").read_text()
        (repo / model / "model.yaml").write_text(
            spec.replace("type: onnxruntime", "type: onnxruntime\n  intra_op_threads: 1", 1)
        )
        port = free_port()
        proc = tree.spawn(
            f"node{i}",
            [
                "moesaic",
                "node",
                "--models",
                str(repo),
                "--listen",
                f"127.0.0.1:{port}",
                "--node-id",
                f"n{i}",
            ],
        )
        nodes.append((f"127.0.0.1:{port}", proc))
    for address, proc in nodes:
        wait_grpc_ready(address, timeout=120, process=proc)
    fleet = work / "fleet.yaml"
    fleet.write_text(
        "coordinator: {overhead_ms: 8, probe_interval_s: 0.5}\n"
        "nodes:\n"
        + "".join(
            f"  - {{address: '{a}', name: n{i}, device: this-host-cpu, "
            f"experts: [{{model: {m}, weight: {i + 1}}}]}}\n"
            for i, ((a, _), m) in enumerate(zip(nodes, EXPERTS, strict=True))
        )
        + "tasks:\n  detection: {on_infeasible: shed}\n"
    )
    port = free_port()
    proc = tree.spawn(
        "coordinator", ["moesaic", "coordinator", "--config", str(fleet), "--listen", f"127.0.0.1:{port}"]
    )
    wait_grpc_ready(f"127.0.0.1:{port}", service="moesaic.v1.Coordinator", timeout=60, process=proc)
    return f"127.0.0.1:{port}"


async def one(stub: Any, req: Any, outcome: Outcome, timeout: float) -> Outcome:
    try:
        reply = await stub.Perceive(req, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code().name
        return outcome
    outcome.latency_ms = reply.measured_latency_ms
    outcome.energy_mj = reply.measured_energy_mj
    outcome.budget_met = reply.budget_met
    outcome.predicted_feasible = reply.feasible
    outcome.experts = [e.expert_id for e in reply.experts if e.status == "ok"]
    return outcome


async def calibrate(stub: Any, frames: list[bytes]) -> tuple[dict[str, float], dict[str, float]]:
    """Each expert alone, unloaded: (p50, p95) of the coordinator's measured latency."""
    p50, p95 = {}, {}
    for expert in EXPERTS:
        times = []
        for i in range(24):
            reply = await stub.Perceive(request(frames[i % len(frames)], 0.0, (expert,)), timeout=30)
            if i >= 4:
                times.append(reply.measured_latency_ms)
        p50[expert], p95[expert] = float(np.percentile(times, 50)), float(np.percentile(times, 95))
    return p50, p95


async def settle(stub: Any, frames: list[bytes], p95: dict[str, float], limit_s: float = 30.0) -> None:
    """Wait until every expert answers an unbudgeted request within 1.5x its unloaded p95 twice
    in a row (queues drained, the CPU free again), so cells do not inherit each other's load."""
    end = time.monotonic() + limit_s
    for expert in EXPERTS:
        good = 0
        while good < 2 and time.monotonic() < end:
            try:
                reply = await stub.Perceive(request(frames[0], 0.0, (expert,)), timeout=30)
            except grpc.aio.AioRpcError:  # e.g. its node is down until the coordinator's next probe
                good = 0
                await asyncio.sleep(0.5)
                continue
            good = good + 1 if reply.measured_latency_ms <= 1.5 * p95[expert] else 0


def budget_cycle(costs: dict[str, float]) -> list[float]:
    small, large = costs["yolo-n"], costs["yolo-n-640"]
    # only yolo-n | yolo-n-640 alone or both (different devices) | generous | nothing fits
    return [1.6 * small, 1.4 * large, 2.5 * large, 1.2 * small, 0.5 * small]


def plan_request(
    policy: str, image: bytes, budget: float, costs: dict[str, float], rng: random.Random
) -> Any:
    if policy == "moe2":
        return request(image, budget)
    if policy == "best_single":
        return request(image, budget, ("yolo-n-640",))
    if policy == "all":
        return request(image, 0.0)
    fitting = [e for e in EXPERTS if costs[e] <= budget]
    sets = [s for s in ((EXPERTS[0],), (EXPERTS[1],), EXPERTS) if all(e in fitting for e in s)]
    return request(image, budget, rng.choice(sets) if sets else (rng.choice(EXPERTS),))


async def closed_loop(
    stub: Any, frames: list[bytes], budgets: list[float], seconds: float, clients: int
) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def client(k: int) -> None:
        nonlocal done
        i = k
        while time.monotonic() < end:
            try:
                await stub.Perceive(request(frames[i % len(frames)], budgets[i % len(budgets)]), timeout=10)
                done += 1
            except grpc.aio.AioRpcError:
                pass
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    return done / seconds


async def open_loop(
    stub: Any,
    policy: str,
    rate: float,
    seconds: float,
    frames: list[bytes],
    budgets: list[float],
    costs: dict[str, float],
    seed: int,
) -> list[Outcome]:
    rng = random.Random(seed)
    cheapest = min(costs.values())
    tasks = []
    start = time.monotonic()
    i = 0
    next_at = start
    while next_at < start + seconds:
        await asyncio.sleep(max(next_at - time.monotonic(), 0))
        budget = budgets[i % len(budgets)]
        outcome = Outcome(budget, budget >= cheapest, time.monotonic(), budget_sent=policy != "all")
        req = plan_request(policy, frames[i % len(frames)], budget, costs, rng)
        tasks.append(asyncio.create_task(one(stub, req, outcome, timeout=10)))
        i += 1
        next_at += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    feasible = [o for o in outcomes if o.feasible]
    ok = [o for o in outcomes if o.code == "OK"]
    lat = [o.latency_ms for o in ok]
    predicted = [o for o in ok if o.predicted_feasible and o.budget_sent]
    return {
        "requests": len(outcomes),
        "feasible": len(feasible),
        "within_budget_of_feasible": sum(o.within for o in feasible) / max(len(feasible), 1),
        "within_budget_of_predicted_feasible": (
            sum(o.within for o in predicted) / len(predicted) if predicted else None
        ),
        "shed": sum(o.code == "RESOURCE_EXHAUSTED" for o in outcomes) / max(len(outcomes), 1),
        "flagged": sum(o.code == "OK" and not o.budget_met for o in outcomes) / max(len(outcomes), 1),
        "errors": sum(o.code not in ("OK", "RESOURCE_EXHAUSTED") for o in outcomes),
        "silently_late": sum(
            o.code == "OK" and o.budget_sent and o.budget_met and o.latency_ms > o.budget_ms for o in outcomes
        ),
        "latency_ms_p50": float(np.percentile(lat, 50)) if lat else None,
        "latency_ms_p99": float(np.percentile(lat, 99)) if lat else None,
        "energy_mj_mean": statistics.fmean(o.energy_mj for o in ok) if ok else None,
        "experts": {e: sum(e in o.experts for o in ok) for e in EXPERTS},
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'policy':<12}{'load':>6}{'req':>6}{'in budget/feasible':>20}{'(coord.)':>10}{'shed':>7}"
        f"{'flagged':>9}{'silent':>8}{'p50 ms':>9}{'p99 ms':>9}{'mJ':>8}  vs moe2"
    )
    lines = [head, "-" * len(head)]
    moe2 = {r["load"]: r["within_budget_of_feasible"] for r in rows if r["policy"] == "moe2"}
    for r in rows:
        ratio = r["within_budget_of_feasible"] / moe2[r["load"]] if moe2.get(r["load"]) else float("nan")
        lines.append(
            f"{r['policy']:<12}{r['load']:>6.0%}{r['requests']:>6}{r['within_budget_of_feasible']:>20.3f}"
            f"{_share(r['within_budget_of_predicted_feasible']):>10}"
            f"{r['shed']:>7.2f}{r['flagged']:>9.2f}{r['silently_late']:>8}"
            f"{r['latency_ms_p50'] or 0:>9.1f}{r['latency_ms_p99'] or 0:>9.1f}"
            f"{r['energy_mj_mean'] or 0:>8.0f}  {ratio:.2f}x"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    frames = images()
    keep = tempfile.mkdtemp(prefix="moesaic-adherence-") if args.keep_logs else None
    with (
        (
            contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="moesaic-adherence-")
        ) as tmp,
        ProcessTree(Path(tmp)) as tree,
    ):
        if keep:
            print(f"logs of the fleet: {keep}")
        address = start_fleet(tree, Path(tmp))
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            stub = moesaic_pb2_grpc.CoordinatorStub(channel)
            p50, costs = await calibrate(stub, frames)
            budgets = budget_cycle(p50)
            capacity = await closed_loop(stub, frames, budgets, args.calibrate_seconds, clients=4)
            print(
                f"unloaded p50 {_ms(p50)}, p95 {_ms(costs)}; capacity {capacity:.1f} req/s; "
                f"budgets {[round(b) for b in budgets]} ms"
            )
            rows = []
            for load in args.loads:
                for policy in POLICIES:
                    outcomes = await open_loop(
                        stub,
                        policy,
                        load * capacity,
                        args.seconds,
                        frames,
                        budgets,
                        costs,
                        seed=int(load * 100),
                    )
                    rows.append(
                        {"policy": policy, "load": load, "rate_per_s": load * capacity, **summarise(outcomes)}
                    )
                    print(
                        f"  {policy:<12} load {load:.0%}: "
                        f"{rows[-1]['within_budget_of_feasible']:.3f} within budget of feasible"
                    )
                    await settle(stub, frames, costs)  # each cell starts from an idle fleet
    return {
        "unloaded_p50_ms": p50,
        "unloaded_p95_ms": costs,
        "capacity_per_s": capacity,
        "budgets_ms": budgets,
        "rows": rows,
    }


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(costs: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} ms" for k, v in costs.items())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="arrivals per cell (default 20)")
    parser.add_argument("--calibrate-seconds", type=float, default=8.0)
    parser.add_argument(
        "--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5, 0.8, 1.0, 1.2]
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-logs", action="store_true", help="keep the fleet's logs (printed path)")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    print(table(summary["rows"]))
    path = write_results("budget_adherence", summary, out=args.out)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
