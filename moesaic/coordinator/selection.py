"""MoE² expert selection: exact branch-and-bound over the Boolean lattice of expert subsets.

The coarse level picks the subset S of a task's experts that minimises the expected loss of
the gate-weighted mixture on a validation table,

    L(S) = mean_i -log( sum_{n in S} g_in q_in / sum_{n in S} g_in )

(q_in: probability expert n gives sample i's label, g_in: gate weight), subject to

    energy(S)  = sum_{n in S} E_n                                   <= energy budget
    latency(S) = max_device sum_{n in S on device} T_n + overhead   <= latency budget

with 0 meaning unbounded and S non-empty. The branch-and-bound
(:class:`moesaic.coordinator.search.Search`) starts from a greedy + local-search incumbent and
prunes with **valid** bounds only:

- infeasibility is monotone (costs only grow when experts are added), so a candidate that
  does not fit beside the chosen set is removed from every superset;
- B1: the loss of any completion S = I ∪ T is bounded below, per sample, by -log of the
  largest mixture probability reachable from I over T (a prefix of the candidates sorted by q);
- B2: a bound coupled across samples, linear in the added experts, per completion size;
- B3: the same bound restricted to completions that contain a candidate fixes candidates out.

The proofs are in :mod:`moesaic.coordinator.bounds`. No time limit applies: :func:`solve`
returns the same optimum value as :func:`brute_force`. On adversarial instances (quality
correlated with cost, budgets at the knee of the cost/loss curve, ``bench/selection.py
--adversarial``) it solves N = 32 in under a second on a 2-core VM (p50 70 ms, max 0.7-0.8 s).

>>> p = SelectionProblem.from_arrays(["a", "b"], ["gpu", "cpu"], [5.0, 9.0], [10.0, 3.0],
...                                  q=[[0.9, 0.5], [0.2, 0.7]], gate=[[0.5, 0.5], [0.5, 0.5]])
>>> solve(p, Budget(energy_mj=20)).ids
('a', 'b')
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moesaic.budget import Budget
from moesaic.coordinator.bounds import PROB_FLOOR
from moesaic.coordinator.search import REL_TOL, Search

__all__ = [
    "GATE_FLOOR",
    "PROB_FLOOR",
    "ExpertCost",
    "Selection",
    "SelectionProblem",
    "brute_force",
    "cheapest",
    "fits",
    "solve",
    "subset_cost",
    "subset_loss",
]

GATE_FLOOR = 1e-12
"""Gate weights are floored here so every non-empty subset has a defined renormalised mixture."""


@dataclass(frozen=True)
class ExpertCost:
    """One expert's predicted cost on its device."""

    id: str
    device: str
    latency_ms: float
    energy_mj: float


@dataclass(frozen=True)
class SelectionProblem:
    """Experts, their costs and the validation table (label probabilities q and gate weights)."""

    experts: tuple[ExpertCost, ...]
    q: np.ndarray
    """[M, N] probability expert n assigns to sample i's label."""
    gate: np.ndarray
    """[M, N] gate weights of sample i over all N experts (any positive scale)."""
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.experts)
        if n == 0:
            raise ValueError("experts: at least one expert is needed")
        q = np.asarray(self.q, dtype=np.float64)
        gate = np.asarray(self.gate, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != n or q.shape[0] == 0:
            raise ValueError(f"q: expected shape [M>0, {n}], got {list(q.shape)}")
        if gate.shape != q.shape:
            raise ValueError(f"gate: expected shape {list(q.shape)}, got {list(gate.shape)}")
        if not (np.all(np.isfinite(q)) and np.all(q >= 0) and np.all(q <= 1 + 1e-6)):
            raise ValueError("q: label probabilities must lie in [0, 1]")
        if not (np.all(np.isfinite(gate)) and np.all(gate >= 0)):
            raise ValueError("gate: weights must be finite and >= 0")
        ids = [e.id for e in self.experts]
        if len(set(ids)) != n:
            raise ValueError(f"experts: duplicate ids in {ids}")
        for e in self.experts:
            if not (math.isfinite(e.latency_ms) and e.latency_ms >= 0):
                raise ValueError(f"experts[{e.id}].latency_ms: must be finite and >= 0")
            if not (math.isfinite(e.energy_mj) and e.energy_mj >= 0):
                raise ValueError(f"experts[{e.id}].energy_mj: must be finite and >= 0")
        object.__setattr__(self, "q", np.clip(q, 0.0, 1.0))
        object.__setattr__(self, "gate", np.maximum(gate, GATE_FLOOR))

    @classmethod
    def from_arrays(
        cls,
        ids: Sequence[str],
        devices: Sequence[str],
        latency_ms: Sequence[float],
        energy_mj: Sequence[float],
        *,
        q: Sequence[Sequence[float]] | np.ndarray,
        gate: Sequence[Sequence[float]] | np.ndarray,
        overhead_ms: float = 0.0,
    ) -> SelectionProblem:
        experts = tuple(
            ExpertCost(i, d, float(t), float(e))
            for i, d, t, e in zip(ids, devices, latency_ms, energy_mj, strict=True)
        )
        return cls(experts, np.asarray(q, np.float64), np.asarray(gate, np.float64), float(overhead_ms))

    @property
    def size(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class Selection:
    """The chosen subset and what it costs."""

    indices: tuple[int, ...]
    ids: tuple[str, ...]
    loss: float
    latency_ms: float
    energy_mj: float
    feasible: bool
    nodes_explored: int = 0
    solve_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The ``moesaic select --json`` output."""
        return {
            "selected": list(self.ids),
            "loss": self.loss,
            "latency_ms": self.latency_ms,
            "energy_mj": self.energy_mj,
            "feasible": self.feasible,
            "nodes_explored": self.nodes_explored,
            "solve_ms": self.solve_ms,
        }


def subset_cost(problem: SelectionProblem, indices: Sequence[int]) -> tuple[float, float]:
    """(latency_ms, energy_mj) of a subset: per-device queues overlap, overhead added once."""
    per_device: dict[str, float] = {}
    energy = 0.0
    for i in indices:
        e = problem.experts[i]
        per_device[e.device] = per_device.get(e.device, 0.0) + e.latency_ms
        energy += e.energy_mj
    latency = (max(per_device.values()) if per_device else 0.0) + problem.overhead_ms
    return latency, energy


def fits(latency_ms: float, energy_mj: float, budget: Budget) -> bool:
    """True when a cost is within a budget (0 = unbounded), with a tiny relative tolerance."""
    if budget.latency_ms > 0 and latency_ms > budget.latency_ms * (1 + REL_TOL):
        return False
    return not (budget.energy_mj > 0 and energy_mj > budget.energy_mj * (1 + REL_TOL))


def subset_loss(problem: SelectionProblem, indices: Sequence[int]) -> float:
    """L(S): mean over samples of -log of the label probability of the renormalised mixture."""
    idx = list(indices)
    if not idx:
        raise ValueError("subset_loss: the subset must not be empty")
    g = problem.gate[:, idx]
    m = (g * problem.q[:, idx]).sum(axis=1) / g.sum(axis=1)
    return float(-np.log(np.maximum(m, PROB_FLOOR)).mean())


def cheapest(problem: SelectionProblem, among: Sequence[int] | None = None) -> int:
    """Index of the cheapest expert (least energy, then least latency, then lowest index)."""
    pool = range(problem.size) if among is None else among
    return min(pool, key=lambda i: (problem.experts[i].energy_mj, problem.experts[i].latency_ms, i))


def _result(
    problem: SelectionProblem, indices: Sequence[int], feasible: bool, nodes: int, start: float
) -> Selection:
    idx = tuple(sorted(indices))
    latency, energy = subset_cost(problem, idx)
    return Selection(
        indices=idx,
        ids=tuple(problem.experts[i].id for i in idx),
        loss=subset_loss(problem, idx),
        latency_ms=latency,
        energy_mj=energy,
        feasible=feasible,
        nodes_explored=nodes,
        solve_ms=(time.perf_counter() - start) * 1e3,
    )


def brute_force(problem: SelectionProblem, budget: Budget) -> Selection:
    """Enumerate all 2^N - 1 subsets (reference for tests and benchmarks; N <= ~20)."""
    start = time.perf_counter()
    best: tuple[float, tuple[int, ...]] | None = None
    nodes = 0
    for r in range(1, problem.size + 1):
        for combo in itertools.combinations(range(problem.size), r):
            nodes += 1
            if not fits(*subset_cost(problem, combo), budget):
                continue
            loss = subset_loss(problem, combo)
            if best is None or loss < best[0]:
                best = (loss, combo)
    if best is None:
        return _result(problem, [cheapest(problem)], False, nodes, start)
    return _result(problem, best[1], True, nodes, start)


def solve(problem: SelectionProblem, budget: Budget) -> Selection:
    """Exact minimum-loss feasible subset; when none fits, the cheapest expert with feasible=False."""
    start = time.perf_counter()
    search = Search(problem, budget)
    search.run()
    if not search.best:
        return _result(problem, [cheapest(problem)], False, search.nodes, start)
    return _result(problem, search.best, True, search.nodes, start)
