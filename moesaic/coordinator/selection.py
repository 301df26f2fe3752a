"""MoE² expert selection: exact branch-and-bound over the Boolean lattice of expert subsets.

The coarse level picks the subset S of a task's experts that minimises the expected loss of
the gate-weighted mixture on a validation table,

    L(S) = mean_i -log( sum_{n in S} g_in q_in / sum_{n in S} g_in )

(q_in: probability expert n gives sample i's label, g_in: gate weight), subject to

    energy(S)  = sum_{n in S} E_n                                   <= energy budget
    latency(S) = max_device sum_{n in S on device} T_n + overhead   <= latency budget

with 0 meaning unbounded and S non-empty. The search enumerates subsets in lexicographic
order and prunes with **valid** bounds only:

- infeasibility is monotone (costs only grow when experts are added), so a candidate that
  does not fit beside the chosen set is removed from every superset;
- the loss of any completion S = I ∪ T is bounded below, per sample, by -log of the largest
  mixture probability reachable from I over T (the unconstrained maximum of the ratio is a
  prefix of the candidates sorted by q; a Dinkelbach step bounds it under the cardinality the
  budget allows). With I empty this is -log of the best single candidate probability.

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

PROB_FLOOR = 1e-12
"""Mixture probabilities are floored here before the log, so a subset that misses a label costs
-log(1e-12) ≈ 27.6 rather than infinity."""
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
    """State of one branch-and-bound run."""

    def __init__(self, problem: SelectionProblem, budget: Budget) -> None:
        self.p = problem
        self.budget = budget
        self.q = problem.q
        self.a = problem.gate * problem.q  # [M, N]
        self.b = problem.gate
        self.m = problem.q.shape[0]
        # Per-sample expert order by q descending, and the sorted a / b columns.
        self.qT = np.ascontiguousarray(problem.q.T)  # [N, M]: gathers of candidate rows
        self.aT = np.ascontiguousarray(self.a.T)
        self.bT = np.ascontiguousarray(self.b.T)
        devices = sorted({e.device for e in problem.experts})
        self.dev = [devices.index(e.device) for e in problem.experts]
        self.n_dev = len(devices)
        self.lat = np.array([e.latency_ms for e in problem.experts])
        self.energy = np.array([e.energy_mj for e in problem.experts])
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
        k = len(cands)
        if math.isfinite(self.e_cap):
            room = self.e_cap + self.tol_e - energy
            count = 0
            for e in sorted(self.energy[c] for c in cands):
                if e > room:
                    break
                room -= e
                count += 1
            k = min(k, count)
        if math.isfinite(self.lat_cap):
            per_dev: dict[int, list[float]] = {}
            for c in cands:
                per_dev.setdefault(self.dev[c], []).append(float(self.lat[c]))
            count = 0
            for d, times in per_dev.items():
                room = self.lat_cap + self.tol_l - dev_time[d]
                for t in sorted(times):
                    if t > room:
                        break
                    room -= t
                    count += 1
            k = min(k, count)
        return k

    # -- bound -------------------------------------------------------------------------
    def bound(
        self,
        num: np.ndarray,
        den: np.ndarray,
        cands: list[int],
        k: int,
        room: float = math.inf,
    ) -> float:
        """Lower bound on L(I ∪ T) over T ⊆ cands with |T| <= k and energy(T) <= room.

        ``num``/``den`` are the per-sample sums of a = g q and b = g over the chosen set I.
        """
        if not cands or k == 0:
            return self._loss_of(num / den)
        ratio, ratios = self._unconstrained(num[None], den[None], [cands])
        return self._refine(num, den, cands, k, room, ratio[0], ratios[0])

    def _unconstrained(
        self, nums: np.ndarray, dens: np.ndarray, rests: list[list[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per child j and sample i, the largest ratio over T ⊆ rests[j]: a prefix of the
        candidates sorted by q (a threshold set). Batched over children.

        Returns the maxima [J, M] and the prefix ratios [J, M, R] (column t: the best t + 1).
        """
        width = max(len(r) for r in rests)
        cols = np.zeros((len(rests), width), np.int64)
        valid = np.zeros((len(rests), width), bool)
        for j, rest in enumerate(rests):
            cols[j, : len(rest)] = rest
            valid[j, : len(rest)] = True
        v = valid[:, None, :]
        q = np.where(v, self.qT[cols].transpose(0, 2, 1), -1.0)  # [J, M, R]; padding sorts last
        order = np.argsort(-q, axis=2, kind="stable")
        a = np.take_along_axis(self.aT[cols].transpose(0, 2, 1) * v, order, axis=2)
        b = np.take_along_axis(self.bT[cols].transpose(0, 2, 1) * v, order, axis=2)
        ratios = (nums[:, :, None] + np.cumsum(a, axis=2)) / (dens[:, :, None] + np.cumsum(b, axis=2))
        return np.maximum(nums / dens, ratios.max(axis=2)), ratios

    def _refine(
        self,
        num: np.ndarray,
        den: np.ndarray,
        cands: list[int],
        k: int,
        room: float,
        ratio: np.ndarray,
        ratios: np.ndarray,
    ) -> float:
        """Tighten the unconstrained ``ratio`` with the cardinality and energy limits."""
        lb = self._loss_of(ratio)
        r = len(cands)
        energies = self.energy[cands]
        energy_binds = float(energies.sum()) > room
        if lb >= self.best_loss or (k >= r and not energy_binds):
            return lb
        base = num / den
        if k < r:
            ratio = np.minimum(ratio, self._cardinality(num, den, cands, k, ratios, base))
            lb = self._loss_of(ratio)
            if lb >= self.best_loss:
                return lb
        if energy_binds:
            ratio = np.minimum(ratio, self._knapsack(num, den, cands, [(np.arange(r), energies, room)], base))
        return self._loss_of(ratio)

    def _knapsack(
        self,
        num: np.ndarray,
        den: np.ndarray,
        cands: list[int],
        groups: list[tuple[np.ndarray, np.ndarray, float]],
        lam: np.ndarray,
    ) -> np.ndarray:
        """Upper bound on the ratio under knapsack limits, via their LP (fractional) relaxation.

        ``groups`` are independent limits (columns into ``cands``, costs, capacity): the energy
        room over all candidates, or one latency room per device. For any lam, every feasible T
        has num + Σa - lam (den + Σb) <= F(lam), with F the sum over groups of the LP value of
        max Σ b (q - lam), so ratio <= lam + max(F, 0) / den. Newton steps on the convex,
        decreasing F move lam up towards its root from below, tightening the bound.
        """
        b_all = self.b[:, cands]
        q_all = self.q[:, cands]
        parts = [
            (b_all[:, cols], q_all[:, cols], np.maximum(costs, 1e-12), cap) for cols, costs, cap in groups
        ]
        best = np.full(self.m, np.inf)
        for _ in range(3):
            gain = np.zeros(self.m)
            mass = np.zeros(self.m)
            for b, q, e, cap in parts:
                c = b * (q - lam[:, None])
                order = np.argsort(np.where(c > 0, -c / e, np.inf), axis=1)
                cs = np.take_along_axis(c, order, axis=1)
                ps = cs > 0
                es = e[order] * ps
                prev = np.cumsum(es, axis=1) - es
                share = np.where(ps, np.clip((cap - prev) / np.maximum(es, 1e-12), 0.0, 1.0), 0.0)
                gain += (cs * share).sum(axis=1)
                mass += (np.take_along_axis(b, order, axis=1) * share).sum(axis=1)
            f = np.maximum(num - lam * den + gain, 0.0)
            best = np.minimum(best, lam + f / den)
            lam = lam + f / (den + mass)
        return best

    def _cardinality(
        self,
        num: np.ndarray,
        den: np.ndarray,
        cands: list[int],
        k: int,
        ratios: np.ndarray,
        base: np.ndarray,
    ) -> np.ndarray:
        """Upper bound on the ratio when |T| <= k (Dinkelbach gap, see :meth:`bound`)."""
        r = len(cands)
        ratio = np.full(self.m, np.inf)
        # At most k experts fit: lam = best q-prefix of <= k candidates (achievable), then the
        # Dinkelbach gap f(lam) = max_{|T|<=k} [num + Σa - lam (den + Σb)] gives
        # ratio <= lam + max(f, 0) / den for every such T.
        lam = np.maximum(base, ratios[:, :k].max(axis=1))
        b = self.b[:, cands]
        q = self.q[:, cands]
        for _ in range(2):
            c = b * (q - lam[:, None])
            top = np.partition(c, r - k, axis=1)[:, r - k :]
            gain = np.maximum(top, 0.0).sum(axis=1)
            f = num - lam * den + gain
            ub = lam + np.maximum(f, 0.0) / den
            # One Dinkelbach step: lam <- ratio of the top-k set (an achievable value).
            thresh = np.maximum(top.min(axis=1), 0.0)
            take = c > thresh[:, None]
            lam = np.maximum(lam, (num + (b * q * take).sum(axis=1)) / (den + (b * take).sum(axis=1)))
            ratio = np.minimum(ratio, ub)
        return ratio

    def _loss_of(self, ratio: np.ndarray) -> float:
        return float(-np.log(np.maximum(ratio, PROB_FLOOR)).sum() / self.m)

    # -- search ------------------------------------------------------------------------
    def run(self) -> None:
        root = [n for n in range(self.p.size) if self._fits_with(n, [0.0] * self.n_dev, 0.0)]
        # Explore strong single experts first so the incumbent tightens early.
        singles = {n: float(-np.log(np.maximum(self.q[:, n], PROB_FLOOR)).mean()) for n in root}
        root.sort(key=lambda n: singles[n])
        self._greedy_incumbent(root)
        zeros = np.zeros(self.m)
        self._expand(zeros, zeros, [0.0] * self.n_dev, 0.0, (), root)

    def _greedy_incumbent(self, root: list[int]) -> None:
        """Forward selection: a good feasible start tightens pruning (any feasible subset is valid)."""
        chosen: list[int] = []
        dev_time = [0.0] * self.n_dev
        energy = 0.0
        current = math.inf
        while True:
            best_n, best_l = -1, current
            for n in root:
                if n in chosen or not self._fits_with(n, dev_time, energy):
                    continue
                loss = subset_loss(self.p, [*chosen, n])
                if loss < best_l:
                    best_n, best_l = n, loss
            if best_n < 0:
                break
            chosen.append(best_n)
            dev_time[self.dev[best_n]] += float(self.lat[best_n])
            energy += float(self.energy[best_n])
            current = best_l
        if chosen:
            self.best_loss, self.best = current, tuple(chosen)

    def _expand(
        self,
        num: np.ndarray,
        den: np.ndarray,
        dev_time: list[float],
        energy: float,
        chosen: tuple[int, ...],
        cands: list[int],
    ) -> None:
        r = len(cands)
        if r == 0:
            return
        self.nodes += r
        idx = np.asarray(cands)
        nums = num[None, :] + self.a[:, idx].T  # [r, M]: child j adds cands[j]
        dens = den[None, :] + self.b[:, idx].T
        losses = -np.log(np.maximum(nums / dens, PROB_FLOOR)).sum(axis=1) / self.m
        j_best = int(np.argmin(losses))
        if losses[j_best] < self.best_loss:
            self.best_loss, self.best = float(losses[j_best]), (*chosen, cands[j_best])
        children = []
        for j, n in enumerate(cands):
            dev2 = list(dev_time)
            dev2[self.dev[n]] += float(self.lat[n])
            energy2 = energy + float(self.energy[n])
            rest = [c for c in cands[j + 1 :] if self._fits_with(c, dev2, energy2)]
            if not rest:
                continue
            k = self._max_count(rest, dev2, energy2)
            if k:
                children.append((j, n, dev2, energy2, rest, k))
        if not children:
            return
        rows = [c[0] for c in children]
        ratio, ratios = self._unconstrained(nums[rows], dens[rows], [c[4] for c in children])
        loss_bounds = -np.log(np.maximum(ratio, PROB_FLOOR)).sum(axis=1) / self.m
        for row, (j, n, dev2, energy2, rest, k) in enumerate(children):
            slack = 1e-12 * max(1.0, abs(self.best_loss))
            if loss_bounds[row] >= self.best_loss - slack:
                continue
            room = self.e_cap + self.tol_e - energy2
            lb = self._refine(nums[j], dens[j], rest, k, room, ratio[row], ratios[row])
            if lb >= self.best_loss - slack:
                continue
            self._expand(nums[j], dens[j], dev2, energy2, (*chosen, n), rest)


def solve(problem: SelectionProblem, budget: Budget) -> Selection:
    """Exact minimum-loss feasible subset; when none fits, the cheapest expert with feasible=False."""
    start = time.perf_counter()
    search = _Search(problem, budget)
    search.run()
    if not search.best:
        return _result(problem, [cheapest(problem)], False, search.nodes, start)
    return _result(problem, search.best, True, search.nodes, start)
