"""MoE² expert selection: exactness, solve time, per-request time, quality vs budget.

1. Optimality: the branch-and-bound solver vs brute force on 200 random instances, N <= 14.
2. Solve time vs N = 8..32 on the simulated fleet at tight / mid / loose budgets (N=32 target
   <= 1 s), beside the previous solver's times (lexicographic B&B, commit aebc4f1).
3. Fine level (per request: gate weights -> top-k within the cached pool, re-checked against
   live profiles and the request budget): time per request (target <= 50 us).
4. Quality vs energy budget on a simulated heterogeneous fleet: MoE² vs the best single
   feasible expert, greedy by loss per joule, random feasible sets and all experts (which
   ignores the budget). Loss = test-split cross-entropy of the gate-weighted fused output.
5. Adversarial instances (:func:`adversarial`): expert quality correlated with cost, several
   devices, budgets at the knee of the cost/loss curve. 50 seeded instances at N = 16, 24, 32:
   p50 / p99 / max solve time and nodes explored (target: every N = 32 instance <= 1 s), and
   solve == brute force on 100 adversarial instances with N <= 14.

The simulated fleet (``fleet``): 16 experts = 4 model sizes x 4 devices (Jetson Orin Nano,
Jetson AGX Orin, RTX 4090, Xeon CPU); costs follow model size / device throughput and device
power. Each sample comes from one of 6 scene conditions (night, rain, far, crowd, glare,
clear); each expert family is fine-tuned on 1-2 conditions (complementary strengths), bigger
models are better everywhere, and every sample has a difficulty shared by all experts
(correlated errors, as in real ensembles). The gate sees a noisy view of the condition.

    .venv/bin/python bench/selection.py                 # everything -> bench/results/selection.json
    .venv/bin/python bench/selection.py --adversarial   # section 5 only, same file

Results go through ``bench/record.py`` (command, commit, machine, date).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one BLAS thread, as the coordinator runs it; not on import (tests)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import write_results  # noqa: E402
from moesaic.budget import Budget  # noqa: E402
from moesaic.coordinator.selection import (  # noqa: E402
    ExpertCost,
    SelectionProblem,
    brute_force,
    fits,
    solve,
    subset_cost,
    subset_loss,
)
from moesaic.coordinator.validation import ValidationTable  # noqa: E402

if TYPE_CHECKING:
    from moesaic.coordinator.gate import Gate

CONDITIONS = ("night", "rain", "far", "crowd", "glare", "clear")
CLASSES = 5
# name, relative throughput (inferences/ms at size 1), active power W
DEVICES = (("orin-nano", 0.25, 10.0), ("agx-orin", 0.8, 30.0), ("rtx4090", 4.0, 280.0), ("xeon", 0.3, 95.0))
SIZES = (("n", 1.0, 0.0), ("s", 2.5, 0.5), ("m", 6.0, 1.0), ("l", 14.0, 1.4))  # name, cost units, skill


@dataclass
class Fleet:
    costs: list[ExpertCost]
    table_train: ValidationTable
    table_val: ValidationTable
    table_test: ValidationTable


def _samples(rng: np.random.Generator, n_experts: int, affinity: np.ndarray, skill: np.ndarray, m: int):
    cond = rng.integers(0, len(CONDITIONS), m)
    difficulty = rng.normal(0, 1.0, m)  # shared across experts: correlated errors
    margin = (
        skill[None, :] + affinity[:, cond].T - 1.2 * difficulty[:, None] + rng.normal(0, 1.0, (m, n_experts))
    )
    # Label probability of a softmax over CLASSES with the label's logit `margin` above the others.
    q = np.exp(margin) / (np.exp(margin) + CLASSES - 1)
    onehot = np.eye(len(CONDITIONS))[cond]
    features = np.hstack(
        [onehot + rng.normal(0, 0.6, onehot.shape), difficulty[:, None] + rng.normal(0, 1, (m, 1))]
    )
    return features, q


def fleet(
    n_experts: int = 16, *, seed: int = 0, m_train: int = 600, m_val: int = 200, m_test: int = 2000
) -> Fleet:
    """A heterogeneous fleet of ``n_experts`` experts (cycling sizes x devices x specialities)."""
    rng = np.random.default_rng(seed)
    costs, skill, affinity = [], [], np.zeros((n_experts, len(CONDITIONS)))
    combos = list(itertools.product(range(len(SIZES)), range(len(DEVICES))))
    for i in range(n_experts):
        s, d = combos[i % len(combos)]
        size, units, base = SIZES[s]
        dev, speed, watts = DEVICES[d]
        latency = units / speed * rng.uniform(0.9, 1.1)
        copy = i // len(combos)
        costs.append(
            ExpertCost(f"{dev}{'' if copy == 0 else copy}/{size}", f"{dev}{copy}", latency, watts * latency)
        )
        skill.append(base - 0.5)
        special = rng.choice(len(CONDITIONS), size=2, replace=False)
        affinity[i, special[0]] = 2.0
        affinity[i, special[1]] = 1.0
        affinity[i] -= 0.6  # off-speciality penalty
    skill_a = np.array(skill)
    ids = tuple(c.id for c in costs)
    names = tuple(f"f{i}" for i in range(len(CONDITIONS) + 1))
    tables = []
    for m in (m_train, m_val, m_test):
        features, q = _samples(rng, n_experts, affinity, skill_a, m)
        tables.append(ValidationTable("sim", "sim", ids, names, features, np.arange(m), q))
    return Fleet(costs, *tables)


def test_loss(f: Fleet, gate: Gate, ids: tuple[str, ...]) -> float:
    cols = f.table_test.columns(list(ids))
    g = gate.weights_all(f.table_test.features)[:, cols]
    mix = (g * f.table_test.q[:, cols]).sum(axis=1) / g.sum(axis=1)
    return float(-np.log(np.maximum(mix, 1e-12)).mean())


def greedy_per_joule(problem: SelectionProblem, budget: Budget) -> tuple[int, ...]:
    singles = np.array([subset_loss(problem, [i]) for i in range(problem.size)])
    gain = (singles.max() - singles + 1e-9) / np.array([max(e.energy_mj, 1e-9) for e in problem.experts])
    chosen: list[int] = []
    for i in np.argsort(-gain):
        if fits(*subset_cost(problem, [*chosen, int(i)]), budget):
            chosen.append(int(i))
    return tuple(chosen)


def random_feasible(problem: SelectionProblem, budget: Budget, rng: np.random.Generator) -> tuple[int, ...]:
    chosen: list[int] = []
    for i in rng.permutation(problem.size):
        if fits(*subset_cost(problem, [*chosen, int(i)]), budget):
            chosen.append(int(i))
    return tuple(chosen)


def best_single(problem: SelectionProblem, budget: Budget) -> tuple[int, ...]:
    ok = [i for i in range(problem.size) if fits(*subset_cost(problem, [i]), budget)]
    return (min(ok, key=lambda i: subset_loss(problem, [i])),) if ok else ()


def quality_curves(
    f: Fleet, gate: Gate, latency_ms: float, fractions: list[float]
) -> list[dict[str, object]]:
    problem = f.table_val.problem(gate.weights_all(f.table_val.features), f.costs)
    total = sum(c.energy_mj for c in f.costs)
    rng = np.random.default_rng(1)
    rows = []
    for frac in fractions:
        budget = Budget(latency_ms=latency_ms, energy_mj=frac * total)
        ids_of = lambda idx: tuple(problem.experts[i].id for i in idx)  # noqa: E731
        moe = solve(problem, budget)
        single = best_single(problem, budget)
        greedy = greedy_per_joule(problem, budget)
        randoms = [random_feasible(problem, budget, rng) for _ in range(20)]
        row: dict[str, object] = {"energy_budget_mj": budget.energy_mj, "fraction": frac}
        for name, idx in (
            ("moe2", moe.indices if moe.feasible else ()),
            ("best_single", single),
            ("greedy", greedy),
        ):
            row[name] = test_loss(f, gate, ids_of(idx)) if idx else None
            row[f"{name}_energy_mj"] = subset_cost(problem, idx)[1] if idx else None
            row[f"{name}_violation"] = bool(idx) and not fits(*subset_cost(problem, idx), budget)
            row[f"{name}_size"] = len(idx)
        losses = [test_loss(f, gate, ids_of(r)) for r in randoms if r]
        row["random"] = float(np.mean(losses)) if losses else None
        row["all_experts"] = test_loss(f, gate, ids_of(range(problem.size)))
        row["all_experts_violation"] = not fits(*subset_cost(problem, range(problem.size)), budget)
        row["moe2_nodes"] = moe.nodes_explored
        row["moe2_solve_ms"] = moe.solve_ms
        rows.append(row)
    return rows


def optimality(instances: int, seed: int = 7) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    matched, worst_gap, nodes, subsets = 0, 0.0, 0, 0
    for k in range(instances):
        n = int(rng.integers(4, 15))
        f = fleet(n, seed=1000 + k, m_train=1, m_val=int(rng.integers(20, 80)), m_test=1)
        gate = rng.dirichlet(np.ones(n) * rng.choice([0.3, 1.0, 3.0]), len(f.table_val.frame))
        problem = SelectionProblem(tuple(f.costs), f.table_val.q, gate)
        total = sum(c.energy_mj for c in f.costs)
        budget = Budget(
            latency_ms=float(rng.choice([0, rng.uniform(3, 40)])),
            energy_mj=float(rng.uniform(0.05, 0.8) * total),
        )
        exact, ref = solve(problem, budget), brute_force(problem, budget)
        gap = abs(exact.loss - ref.loss)
        worst_gap = max(worst_gap, gap)
        matched += int(gap <= 1e-9 and exact.feasible == ref.feasible)
        nodes += exact.nodes_explored
        subsets += 2**n - 1
    return {
        "instances": instances,
        "matched": matched,
        "worst_gap": worst_gap,
        "node_fraction": nodes / subsets,
    }


def _train_gate(table: ValidationTable, steps: int) -> Gate:
    from moesaic.coordinator.gate import train_gate  # the gate stays out of the adversarial path

    return train_gate(table, steps=steps)


BUDGETS = (("tight", 0.05, 20.0), ("mid", 0.25, 60.0), ("loose", 0.5, 0.0))
"""name, energy budget as a share of the fleet's total, latency budget ms (0 = unbounded)."""
BASELINE_MS = {
    # Previous solver (lexicographic branch-and-bound, commit aebc4f1), same fleets and budgets,
    # same machine class: (median ms, max ms). Mid from the BENCHMARKS.md selection section of that
    # commit; loose measured with that commit before this change.
    "mid": {8: (10.2, 13.7), 12: (49.3, 62.2), 16: (87.6, 120.3), 20: (129.8, 186.3),
            24: (677.0, 1403.7), 28: (1330.9, 1946.1), 32: (1067.1, 5235.6)},
    "loose": {16: (360.0, 380.0), 20: (330.0, 560.0), 24: (1860.0, 1960.0), 28: (2930.0, 4620.0),
              32: (2980.0, 167770.0)},
}  # fmt: skip


def solve_times(ns: list[int], repeats: int, fraction: float, latency_ms: float) -> list[dict[str, float]]:
    rows = []
    for n in ns:
        times, nodes = [], []
        for r in range(repeats):
            f = fleet(n, seed=50 + r, m_train=400, m_val=200, m_test=1)
            gate = _train_gate(f.table_train, steps=200)
            problem = f.table_val.problem(gate.weights_all(f.table_val.features), f.costs)
            budget = Budget(latency_ms=latency_ms, energy_mj=fraction * sum(c.energy_mj for c in f.costs))
            s = solve(problem, budget)
            times.append(s.solve_ms)
            nodes.append(s.nodes_explored)
        rows.append(
            {
                "n": n,
                "median_ms": float(np.median(times)),
                "max_ms": float(np.max(times)),
                "nodes": float(np.median(nodes)),
                "subsets": float(2**n - 1),
            }
        )
    return rows


def fine_level_time(requests: int) -> dict[str, float]:
    from moesaic.coordinator.config import parse_fleet
    from moesaic.coordinator.planner import Planner, TaskModel
    from moesaic.coordinator.profiles import Profile
    from moesaic.coordinator.registry import Registry, Replica

    f = fleet(16, seed=3, m_train=400, m_val=200, m_test=requests)
    gate = _train_gate(f.table_train, steps=200)
    config = parse_fleet(
        {"nodes": [{"address": f"127.0.0.1:{9000 + i}", "name": f"n{i}"} for i in range(16)]}, env={}
    )
    registry = Registry(config)
    for node, cost in zip(registry.nodes, f.costs, strict=True):  # one model (= expert) per node
        profile = Profile(cost.latency_ms, 0.0, cost.energy_mj, drift=registry.settings.profile_drift)
        node.replicas[cost.id] = Replica(node.name, cost.id, "sim", cost.device, profile)
        node.up = True
    tm = TaskModel("sim", "sim", gate, f.table_val, 4, gate.weights_all(f.table_val.features))
    planner = Planner(registry.settings, {"sim": tm})
    experts = registry.experts("sim")
    budget = Budget(latency_ms=50.0, energy_mj=0.3 * sum(c.energy_mj for c in f.costs))
    feats = f.table_test.features
    planner.plan("sim", experts, feats[0], budget)  # coarse solve, cached
    batch = 100
    means = []
    for start in range(0, requests - batch + 1, batch):
        t0 = time.perf_counter()
        for i in range(start, start + batch):
            planner.plan("sim", experts, feats[i], budget)
        means.append((time.perf_counter() - t0) / batch * 1e6)
    return {
        "requests": requests,
        "us_per_request": float(np.median(means)),
        "us_per_request_best_batch": float(np.min(means)),
        "coarse_solves": planner.solves,
    }


# -- 5. adversarial instances -------------------------------------------------------------
ADVERSARIAL_SIZES = (16, 24, 32)


def adversarial(
    n: int, seed: int, *, m: int = 200, conditions: int = 6, classes: int = 5
) -> tuple[SelectionProblem, Budget]:
    """A hard selection instance: ``n`` experts on 3-6 devices, quality correlated with cost,
    the budget at the knee of the cost/loss curve.

    Each expert has a skill s ~ U(-1, 2) and costs exp(1.2 s + noise) units of work, run on a
    device with its own speed (units/ms) and power (W): better experts are slower and hungrier
    (a strongly correlated knapsack). Each is fine-tuned on 2 of ``conditions`` scene conditions;
    sample i has a condition and a difficulty shared by all experts, plus independent noise, and
    q_in is the label probability of a ``classes``-way softmax with that margin. The gate is a
    softmax over noisy condition affinities and skill. Many subsets then have nearly the same
    loss, which is what makes exact selection hard.

    The budget sits at the knee of the greedy loss-per-energy curve (start from the cheapest
    expert, add the best gain per mJ while the loss falls; knee = farthest point below the chord
    of the normalised curve), scaled by U(0.8, 1.25), on energy, latency or both at random.
    """
    rng = np.random.default_rng(seed)
    n_dev = int(rng.integers(3, 7))
    speed = np.exp(rng.uniform(math.log(0.3), math.log(4.0), n_dev))
    power = rng.uniform(10, 200, n_dev)
    dev = rng.integers(0, n_dev, n)
    skill = rng.uniform(-1.0, 2.0, n)
    latency = np.exp(1.2 * skill + rng.normal(0, 0.15, n)) / speed[dev]
    energy = power[dev] * latency
    affinity = np.full((n, conditions), -0.5)
    for i in range(n):
        strong, weak = rng.choice(conditions, 2, replace=False)
        affinity[i, strong], affinity[i, weak] = 1.5, 0.8
    cond = rng.integers(0, conditions, m)
    difficulty = rng.normal(0, 1.0, m)
    margin = skill + affinity[:, cond].T - 1.2 * difficulty[:, None] + rng.normal(0, 1.0, (m, n))
    q = np.exp(margin) / (np.exp(margin) + classes - 1)
    logits = rng.uniform(0.5, 2.0) * (affinity[:, cond].T + rng.normal(0, 0.7, (m, n))) + 0.5 * skill
    gate = np.exp(logits - logits.max(axis=1, keepdims=True))
    gate /= gate.sum(axis=1, keepdims=True)
    experts = tuple(ExpertCost(f"e{i}", f"d{dev[i]}", float(latency[i]), float(energy[i])) for i in range(n))
    problem = SelectionProblem(experts, q, gate, overhead_ms=float(rng.uniform(0, 2)))
    # Greedy loss-per-energy curve from the cheapest expert.
    chosen = [int(np.argmin(energy))]
    curve = [(float(energy[chosen[0]]), subset_loss(problem, chosen), tuple(chosen))]
    while len(chosen) < n:
        rest = [j for j in range(n) if j not in chosen]
        losses = np.array([subset_loss(problem, [*chosen, j]) for j in rest])
        gain = (curve[-1][1] - losses) / energy[rest]
        j = int(np.argmax(gain))
        if gain[j] <= 0:
            break
        chosen.append(rest[j])
        curve.append((curve[-1][0] + float(energy[rest[j]]), float(losses[j]), tuple(chosen)))
    e_curve = np.array([c[0] for c in curve])
    l_curve = np.array([c[1] for c in curve])
    knee = len(curve) - 1
    if len(curve) >= 3:
        e_norm = (e_curve - e_curve[0]) / max(e_curve[-1] - e_curve[0], 1e-12)
        l_norm = (l_curve[0] - l_curve) / max(l_curve[0] - l_curve[-1], 1e-12)
        knee = int(np.argmax(l_norm - e_norm))
    knee_energy, _, knee_set = curve[knee]
    knee_latency = subset_cost(problem, knee_set)[0]
    mode = rng.choice(["energy", "latency", "both"])
    e_scale, l_scale = rng.uniform(0.8, 1.25, 2)
    budget = Budget(
        latency_ms=float(knee_latency * l_scale) if mode != "energy" else 0.0,
        energy_mj=float(knee_energy * e_scale) if mode != "latency" else 0.0,
    )
    return problem, budget


def adversarial_times(sizes: tuple[int, ...], instances: int) -> list[dict[str, object]]:
    """Solve ``instances`` seeded adversarial instances per size; raw times and nodes per seed."""
    rows = []
    for n in sizes:
        runs = []
        for seed in range(instances):
            problem, budget = adversarial(n, seed)
            t0, c0 = time.perf_counter(), time.thread_time()
            s = solve(problem, budget)
            wall_ms = (time.perf_counter() - t0) * 1e3
            cpu_ms = (time.thread_time() - c0) * 1e3
            runs.append(
                {"seed": seed, "solve_ms": wall_ms, "cpu_ms": cpu_ms, "nodes": s.nodes_explored,
                 "size": len(s.indices), "feasible": s.feasible, "loss": s.loss,
                 "budget": [budget.latency_ms, budget.energy_mj]}
            )  # fmt: skip
        times = np.array([r["solve_ms"] for r in runs])
        cpu = np.array([r["cpu_ms"] for r in runs])
        nodes = np.array([r["nodes"] for r in runs])
        rows.append(
            {
                "n": n,
                "instances": instances,
                "p50_ms": float(np.median(times)),
                "p99_ms": float(np.quantile(times, 0.99)),
                "max_ms": float(times.max()),
                "cpu_p50_ms": float(np.median(cpu)),
                "cpu_max_ms": float(cpu.max()),
                "nodes_p50": float(np.median(nodes)),
                "nodes_p99": float(np.quantile(nodes, 0.99)),
                "nodes_max": int(nodes.max()),
                "subsets": 2**n - 1,
                "runs": runs,
            }
        )
    return rows


def adversarial_optimality(instances: int, seed: int = 11) -> dict[str, object]:
    """solve vs brute force on adversarial instances with N <= 14."""
    rng = np.random.default_rng(seed)
    matched, worst_gap = 0, 0.0
    for k in range(instances):
        problem, budget = adversarial(int(rng.integers(4, 15)), 10_000 + k, m=int(rng.integers(20, 200)))
        exact, ref = solve(problem, budget), brute_force(problem, budget)
        gap = abs(exact.loss - ref.loss)
        worst_gap = max(worst_gap, gap)
        matched += int(gap <= 1e-9 and exact.feasible == ref.feasible)
    return {"instances": instances, "matched": matched, "worst_gap": worst_gap}


def print_adversarial(rows: list[dict[str, object]], opt: dict[str, object]) -> None:
    print(
        "\n5. adversarial instances (quality ~ cost, budget at the knee), exact solve; "
        f"solve == brute force on {opt['matched']}/{opt['instances']} instances with N <= 14 "
        f"(worst gap {opt['worst_gap']:.1e})"
    )
    print("  wall time per solve (what a request waits), and CPU time of the solving thread (the")
    print("  work, less sensitive to other jobs on the host)")
    head = ("N", "inst", "p50 ms", "p99 ms", "max ms", "CPU p50", "CPU max", "nodes p50", "p99", "max")
    widths = (4, 5, 8, 8, 8, 8, 8, 10, 7, 7)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print(
            f"{r['n']:>4} {r['instances']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} "
            f"{r['cpu_p50_ms']:>8.1f} {r['cpu_max_ms']:>8.1f} "
            f"{r['nodes_p50']:>10.0f} {r['nodes_p99']:>7.0f} {r['nodes_max']:>7}"
        )


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    x = [float(r["energy_budget_mj"]) for r in rows]  # type: ignore[arg-type]
    for key, label, style in (
        ("moe2", "MoE² (exact)", "o-"),
        ("best_single", "best single feasible", "s--"),
        ("greedy", "greedy loss/joule", "^-."),
        ("random", "random feasible", "x:"),
    ):
        ax.plot(x, [r[key] if r[key] is not None else np.nan for r in rows], style, label=label)  # type: ignore[misc]
    ax.axhline(float(rows[0]["all_experts"]), color="grey", lw=1, label="all experts (ignores budget)")  # type: ignore[arg-type]
    ax.set_xscale("log")
    ax.set_xlabel("energy budget per request (mJ), latency budget fixed")
    ax.set_ylabel("test cross-entropy of the fused output")
    ax.set_title("Quality vs energy budget, simulated 16-expert fleet")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def fmt(v: object, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/selection.json")
    parser.add_argument("--quick", action="store_true", help="fewer instances (smoke test)")
    parser.add_argument("--adversarial", action="store_true", help="section 5 only")
    parser.add_argument("--instances", type=int, default=50, help="adversarial instances per N")
    args = parser.parse_args()
    quick = args.quick
    results: dict[str, Any] = {}
    if not args.adversarial:
        rows = classic_sections(results, quick)
    instances = 5 if quick else args.instances
    adv = adversarial_times(ADVERSARIAL_SIZES, instances)
    adv_opt = adversarial_optimality(10 if quick else 100)
    results["adversarial"] = {"sizes": adv, "optimality": adv_opt, "target_ms": 1000.0}
    print_adversarial(adv, adv_opt)
    path = write_results("selection", results, out=args.out)
    print(f"\nwrote {path}")
    if not args.adversarial:
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 0


def classic_sections(results: dict[str, Any], quick: bool) -> list[dict[str, object]]:
    """Sections 1-4 into ``results``; returns the quality rows (for the plot)."""
    opt: dict[str, Any] = optimality(20 if quick else 200)
    results["optimality"] = opt
    print(
        f"\n1. optimality vs brute force (N <= 14): {opt['matched']}/{opt['instances']} match, "
        f"worst gap {opt['worst_gap']:.2e}, B&B visits {100 * opt['node_fraction']:.2f}% of the subsets"
    )

    latency = 60.0
    ns = [8, 12, 16] if quick else [8, 12, 16, 20, 24, 28, 32]
    results["solve_time"] = {}
    for name, fraction, lat in BUDGETS:
        times = solve_times(ns, 1 if quick else 3, fraction=fraction, latency_ms=lat)
        results["solve_time"][name] = times
        lat_s = f"latency {lat:.0f} ms" if lat > 0 else "no latency limit"
        print(f"\n2. exact solve time, {name} budget ({100 * fraction:.0f}% of the fleet's energy, {lat_s})")
        print(
            f"{'N':>4} {'median ms':>10} {'max ms':>9} {'nodes':>7} {'subsets':>14} "
            f"{'old median':>11} {'old max':>9} {'speed-up (median)':>18}"
        )
        for r in times:
            old = BASELINE_MS.get(name, {}).get(int(r["n"]))
            ratio = f"{old[0] / r['median_ms']:.1f}x" if old else "-"
            olds = (f"{old[0]:>11.1f} {old[1]:>9.1f}") if old else f"{'-':>11} {'-':>9}"
            print(
                f"{r['n']:>4} {r['median_ms']:>10.1f} {r['max_ms']:>9.1f} {r['nodes']:>7.0f} "
                f"{r['subsets']:>14.0f} {olds} {ratio:>18}"
            )

    fine = fine_level_time(200 if quick else 5000)
    results["fine_level"] = fine
    print(
        f"\n3. fine level per request: median {fine['us_per_request']:.1f} us, best batch of 100 "
        f"{fine['us_per_request_best_batch']:.1f} us (target <= 50 us), "
        f"{fine['coarse_solves']} coarse solve(s) for {fine['requests']} requests"
    )

    f = fleet(16, seed=11)
    gate = _train_gate(f.table_train, steps=400)
    fractions = [0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8] if not quick else [0.02, 0.1, 0.3]
    rows = quality_curves(f, gate, latency, fractions)
    results["quality"] = rows
    print("\n4. quality vs energy budget (test cross-entropy; lower is better; latency budget 60 ms)")
    print(
        f"{'E budget mJ':>11} {'MoE²':>7} {'|S|':>4} {'single':>7} {'greedy':>7} {'random':>7} {'all*':>7} "
        f"{'MoE²/single':>11} {'viol':>5}"
    )
    for r in rows:
        ratio = (r["moe2"] / r["best_single"]) if r["moe2"] and r["best_single"] else None  # type: ignore[operator]
        print(
            f"{r['energy_budget_mj']:>11.1f} {fmt(r['moe2']):>7} {r['moe2_size']:>4} "
            f"{fmt(r['best_single']):>7} {fmt(r['greedy']):>7} {fmt(r['random']):>7} "
            f"{fmt(r['all_experts']):>7} {fmt(ratio, 2):>11} "
            f"{int(bool(r['moe2_violation'])):>5}"
        )
    print("  * all experts ignore the budget (violates it whenever the budget is below the fleet's total).")
    mids = [r for r in rows if 0.04 <= float(r["fraction"]) <= 0.3 and r["moe2"] and r["best_single"]]  # type: ignore[arg-type]
    gains = [1 - r["moe2"] / r["best_single"] for r in mids]  # type: ignore[operator]
    results["mid_budget_gain_vs_best_single"] = (
        {"min": min(gains), "mean": float(np.mean(gains))} if gains else None
    )
    violations = sum(int(bool(r["moe2_violation"])) for r in rows)
    results["moe2_energy_violations"] = violations
    if gains:
        print(
            f"\nmid budgets (4-30% of fleet energy): MoE² loss {100 * min(gains):.1f}% .. "
            f"{100 * max(gains):.1f}% lower than the best single feasible expert; "
            f"energy violations {violations}"
        )

    return rows


if __name__ == "__main__":
    sys.exit(main())
