"""MoE² expert selection: exact branch-and-bound over the Boolean lattice of expert subsets.

The coarse level picks the subset S of a task's experts that minimises the expected loss of
the gate-weighted mixture on a validation table,

    L(S) = mean_i -log( sum_{n in S} g_in q_in / sum_{n in S} g_in )

(q_in: probability expert n gives sample i's label, g_in: gate weight), subject to

    energy(S)  = sum_{n in S} E_n                                   <= energy budget
    latency(S) = max_device sum_{n in S on device} T_n + overhead   <= latency budget

with 0 meaning unbounded and S non-empty. The search branches on one expert at a time
(include / exclude; the expert the bound leans on most, see :class:`_Search`), starts from a
greedy incumbent and prunes with **valid** bounds only:

- infeasibility is monotone (costs only grow when experts are added), so a candidate that
  does not fit beside the chosen set is removed from every superset;
- the loss of any completion S = I ∪ T is bounded below, per sample, by -log of the largest
  mixture probability reachable from I over T, a prefix of the candidates sorted by q
  (proved in :mod:`moesaic.coordinator.bounds`). With I empty this is -log of the best single
  candidate probability.

:func:`solve` therefore returns the same optimum value as :func:`brute_force`.

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

from moesaic.coordinator.bounds import PROB_FLOOR, RatioBounds, max_count

__all__ = [
    "GATE_FLOOR",
    "PROB_FLOOR",
    "Budget",
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
_REL_TOL = 1e-9


@dataclass(frozen=True)
class Budget:
    """Per-request limits; 0 (or less) means unbounded."""

    latency_ms: float = 0.0
    energy_mj: float = 0.0

    @property
    def bounded(self) -> bool:
        return self.latency_ms > 0 or self.energy_mj > 0


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
    if budget.latency_ms > 0 and latency_ms > budget.latency_ms * (1 + _REL_TOL):
        return False
    return not (budget.energy_mj > 0 and energy_mj > budget.energy_mj * (1 + _REL_TOL))


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


class _Search:
    """State of one branch-and-bound run: binary branching (include / exclude one expert).

    A node is (chosen set S, candidates C): C holds the experts that still fit beside S. The
    branching expert is the candidate the node's bound leans on most (the largest summed share
    in the per-sample best extensions, :meth:`RatioBounds.unconstrained`): excluding it raises
    the bound of many samples at once, including it moves the search towards the optimum. The
    include child is explored first (depth first); the exclude child continues in a loop.
    """

    def __init__(self, problem: SelectionProblem, budget: Budget) -> None:
        self.p = problem
        self.budget = budget
        self.m = problem.q.shape[0]
        devices = sorted({e.device for e in problem.experts})
        self.dev = [devices.index(e.device) for e in problem.experts]
        self.n_dev = len(devices)
        self.lat = np.array([e.latency_ms for e in problem.experts])
        self.energy = np.array([e.energy_mj for e in problem.experts])
        self.bounds = RatioBounds(problem.q, problem.gate, self.energy)
        self.a = self.bounds.a  # [M, N] g q
        self.b = self.bounds.b  # [M, N] g
        self.lat_cap = budget.latency_ms - problem.overhead_ms if budget.latency_ms > 0 else math.inf
        self.e_cap = budget.energy_mj if budget.energy_mj > 0 else math.inf
        self.tol_l = abs(budget.latency_ms) * _REL_TOL
        self.tol_e = abs(budget.energy_mj) * _REL_TOL
        self.best_loss = math.inf
        self.best: tuple[int, ...] = ()
        self.nodes = 0

    # -- costs -------------------------------------------------------------------------
    def _fits_with(self, n: int, dev_time: list[float], energy: float) -> bool:
        if energy + self.energy[n] > self.e_cap + self.tol_e:
            return False
        return bool(dev_time[self.dev[n]] + self.lat[n] <= self.lat_cap + self.tol_l)

    def _max_count(self, cands: list[int], dev_time: list[float], energy: float) -> int:
        """Most experts from ``cands`` any feasible completion can add (energy and per-device time)."""
        return max_count(
            cands,
            self.energy,
            self.lat,
            self.dev,
            dev_time,
            self.e_cap + self.tol_e - energy,
            self.lat_cap + self.tol_l,
        )

    def bound(self, num: np.ndarray, den: np.ndarray, cands: list[int]) -> float:
        """Lower bound on L(I ∪ T) over every T ⊆ cands (T may be empty when I is not).

        ``num``/``den`` are the per-sample sums of a = g q and b = g over the chosen set I.
        """
        mask = np.zeros(self.p.size, bool)
        mask[cands] = True
        ratio, _ = self.bounds.unconstrained(num, den, mask)
        return self.bounds.loss_of(ratio)

    # -- search ------------------------------------------------------------------------
    def run(self) -> None:
        root = [n for n in range(self.p.size) if self._fits_with(n, [0.0] * self.n_dev, 0.0)]
        self._greedy_incumbent(root)
        mask = np.zeros(self.p.size, bool)
        mask[root] = True
        zeros = np.zeros(self.m)
        self._branch(zeros, zeros, [0.0] * self.n_dev, 0.0, (), mask)

    def _greedy_incumbent(self, root: list[int]) -> None:
        """Forward selection: a good feasible start tightens pruning (any feasible subset is valid)."""
        chosen: list[int] = []
        num = np.zeros(self.m)
        den = np.zeros(self.m)
        dev_time = [0.0] * self.n_dev
        energy = 0.0
        current = math.inf
        while True:
            fit = [n for n in root if n not in chosen and self._fits_with(n, dev_time, energy)]
            if not fit:
                break
            ratios = (num[:, None] + self.a[:, fit]) / (den[:, None] + self.b[:, fit])
            losses = -np.log(np.maximum(ratios, PROB_FLOOR)).sum(axis=0) / self.m
            j = int(np.argmin(losses))
            if losses[j] >= current:
                break
            n = fit[j]
            chosen.append(n)
            num, den = num + self.a[:, n], den + self.b[:, n]
            dev_time[self.dev[n]] += float(self.lat[n])
            energy += float(self.energy[n])
            current = float(losses[j])
        if chosen:
            self.best_loss, self.best = current, tuple(chosen)

    def _branch(
        self,
        num: np.ndarray,
        den: np.ndarray,
        dev_time: list[float],
        energy: float,
        chosen: tuple[int, ...],
        mask: np.ndarray,
    ) -> None:
        mask = mask.copy()
        while True:
            cands = np.flatnonzero(mask).tolist()
            if not cands:
                return
            self.nodes += 1
            slack = 1e-12 * max(1.0, abs(self.best_loss))
            stop = self.best_loss - slack
            ratio, score = self.bounds.unconstrained(num, den, mask)
            if self.bounds.loss_of(ratio) >= stop:
                return
            k = self._max_count(cands, dev_time, energy)
            if k == 0:
                return
            score[~mask] = -1.0
            v = int(np.argmax(score))
            mask[v] = False
            # Include v: its loss is a candidate incumbent, then its own subtree.
            num2, den2 = num + self.a[:, v], den + self.b[:, v]
            loss = self.bounds.loss_of(num2 / den2)
            chosen2 = (*chosen, v)
            if loss < self.best_loss:
                self.best_loss, self.best = loss, chosen2
            dev2 = list(dev_time)
            dev2[self.dev[v]] += float(self.lat[v])
            energy2 = energy + float(self.energy[v])
            child = mask.copy()
            for c in np.flatnonzero(child).tolist():
                if not self._fits_with(c, dev2, energy2):
                    child[c] = False
            if k > 1:
                self._branch(num2, den2, dev2, energy2, chosen2, child)
            # Exclude v: same chosen set, one candidate fewer (next loop iteration).


def solve(problem: SelectionProblem, budget: Budget) -> Selection:
    """Exact minimum-loss feasible subset; when none fits, the cheapest expert with feasible=False."""
    start = time.perf_counter()
    search = _Search(problem, budget)
    search.run()
    if not search.best:
        return _result(problem, [cheapest(problem)], False, search.nodes, start)
    return _result(problem, search.best, True, search.nodes, start)
