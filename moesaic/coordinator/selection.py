"""MoE² expert selection: exact branch-and-bound over the Boolean lattice of expert subsets.

The coarse level picks the subset S of a task's experts that minimises the expected loss of
the gate-weighted mixture on a validation table,

    L(S) = mean_i -log( sum_{n in S} g_in q_in / sum_{n in S} g_in )

(q_in: probability expert n gives sample i's label, g_in: gate weight), subject to

    energy(S)  = sum_{n in S} E_n                                   <= energy budget
    latency(S) = max_device sum_{n in S on device} T_n + overhead   <= latency budget

with 0 meaning unbounded and S non-empty. The branch-and-bound (:class:`_Search`) starts from
a greedy + local-search incumbent and prunes with **valid** bounds only:

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
from typing import NamedTuple

import numpy as np

from moesaic.coordinator.bounds import PROB_FLOOR, Capacity, NodeBounds, RatioBounds

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


class _Nodes(NamedTuple):
    """A batch of search nodes (chosen set I, candidates C) with their bounds."""

    chosen: list[tuple[int, ...]]
    base: np.ndarray
    """[F, 2M] A | G of each chosen set."""
    dev_time: np.ndarray
    """[F, D] queue time per device."""
    energy: np.ndarray
    """[F] energy."""
    mask: np.ndarray
    """[F, N] candidates."""
    bounds: NodeBounds
    """Bounds of each node, ``forced`` over all N experts."""


class _Search:
    """State of one branch-and-bound run over (chosen set I, candidates C) nodes.

    C holds the experts that still fit beside I. Expanding a node orders its candidates
    v_0, v_1, ... by how much B1 leans on them (the summed share of each sample's best
    extension: excluding such an expert raises the bound of many samples at once) and splits its
    completions into "contains v_0", "contains v_1 but not v_0", ...: the include children
    (I + v_t, C minus v_0..v_t) and the exclude chain (I, C minus v_0..v_(t-1)). Once a chain
    node is pruned, every later child is a subset of it and is skipped.

    The search runs level by level: all open nodes of a level are expanded together, their
    chains bounded in a few growing stages and their children in one batch, so each numpy call
    of :meth:`RatioBounds.evaluate` covers many nodes. Bounds and candidate fixing:
    :mod:`moesaic.coordinator.bounds`.
    """

    def __init__(self, problem: SelectionProblem, budget: Budget) -> None:
        self.p = problem
        self.m = problem.q.shape[0]
        devices = sorted({e.device for e in problem.experts})
        self.dev = np.array([devices.index(e.device) for e in problem.experts])
        self.n_dev = len(devices)
        self.lat = np.array([e.latency_ms for e in problem.experts])
        self.energy = np.array([e.energy_mj for e in problem.experts])
        self.bounds = RatioBounds(problem.q, problem.gate)
        self.capacity = Capacity(self.energy, self.lat, self.dev)
        lat_cap = budget.latency_ms - problem.overhead_ms if budget.latency_ms > 0 else math.inf
        e_cap = budget.energy_mj if budget.energy_mj > 0 else math.inf
        self.lat_cap = lat_cap + abs(budget.latency_ms) * _REL_TOL  # inclusive of tolerance
        self.e_cap = e_cap + abs(budget.energy_mj) * _REL_TOL
        self.best_loss = math.inf
        self.best: tuple[int, ...] = ()
        self.nodes = 0

    # -- costs and bounds ----------------------------------------------------------------
    def _fitting(self, dev_time: np.ndarray, energy: np.ndarray) -> np.ndarray:
        """[T, N] experts that fit beside T sets with these per-device times [T, D] and energies [T]."""
        e_ok = energy[:, None] + self.energy <= self.e_cap
        return e_ok & (dev_time[:, self.dev] + self.lat <= self.lat_cap)

    def _cost_of(self, chosen: Sequence[int]) -> tuple[np.ndarray, float]:
        dev_time = np.zeros(self.n_dev)
        np.add.at(dev_time, self.dev[list(chosen)], self.lat[list(chosen)])
        return dev_time, float(self.energy[list(chosen)].sum())

    def _evaluate(
        self,
        base: np.ndarray,
        masks: np.ndarray,
        dev_time: np.ndarray,
        energy: np.ndarray,
        sizes: np.ndarray,
        *,
        rows: np.ndarray | None = None,
        lean: float = -math.inf,
    ) -> NodeBounds:
        """Bounds of T nodes: base [T, 2M] (or the rows ``rows`` of it), non-empty candidate
        masks [T, N], costs [T, D] and [T]. ``sizes`` [T] bounds how many candidates fit together
        where already known (a row drawn from a node's candidates with the node's chosen set
        inherits its count), -1 elsewhere, counted here."""
        self.nodes += len(masks)
        todo = sizes < 0
        if todo.any():
            sizes = sizes.copy()
            sizes[todo] = self.capacity.count(
                masks[todo], dev_time[todo], self.e_cap - energy[todo], self.lat_cap
            )
        pool = self.bounds.pool(np.flatnonzero(masks.any(axis=0)))
        local = masks[:, pool.ids]
        sizes = np.clip(sizes, 1, local.sum(axis=1))  # a larger count only weakens B2
        nb = self.bounds.evaluate(pool, base, local, sizes, rows=rows, lean=lean)
        forced = np.full(masks.shape, np.inf)
        forced[:, pool.ids] = nb.forced
        leans = np.zeros(masks.shape)
        leans[:, pool.ids] = nb.lean
        return nb._replace(forced=forced, sizes=sizes, lean=leans)

    def bound(self, chosen: Sequence[int], cands: Sequence[int]) -> float:
        """Lower bound max(B1, B2) on L(I ∪ T) over every T ⊆ cands (T may be empty when I is not);
        the budget is not used beyond ``cands`` (every size up to |cands| is allowed)."""
        base = self.bounds.empty_base() + self.bounds.ab_t[list(chosen)].sum(axis=0)
        if not cands:
            return float(self.bounds.loss_of(base))
        pool = self.bounds.pool(np.array(sorted(cands)))
        masks = np.ones((1, len(cands)), bool)
        nb = self.bounds.evaluate(pool, base[None], masks, np.array([len(cands)]))
        b2 = float(nb.b2[0])
        if chosen:
            b2 = min(b2, float(self.bounds.loss_of(base)))  # T = ∅
        return max(float(nb.b1[0]), b2)

    def _stop(self) -> float:
        """Bounds at or above this cannot lead to a better subset than the incumbent."""
        return self.best_loss - 1e-12 * max(1.0, abs(self.best_loss))

    # -- search ------------------------------------------------------------------------
    def run(self) -> None:
        root = self._fitting(np.zeros((1, self.n_dev)), np.zeros(1))
        self._incumbent(root[0])
        if not root.any():
            return
        base = self.bounds.empty_base()[None]
        dev_time, energy = np.zeros((1, self.n_dev)), np.zeros(1)
        level: _Nodes | None = _Nodes(
            [()],
            base,
            dev_time,
            energy,
            root,
            self._evaluate(base, root, dev_time, energy, np.full(1, -1), lean=math.inf),
        )
        while level is not None:
            level = self._expand(level)

    def _expand(self, level: _Nodes) -> _Nodes | None:
        """Expand every open node of a level; returns the next level (the children), if any.

        Child t of a node adds v_t and draws from chain row t + 1, minus what does not fit or
        what chain row t fixed out; it is skipped when that row fixed out v_t itself."""
        stop = self._stop()
        nb = level.bounds
        open_ = np.flatnonzero(nb.bound < stop)
        masks = level.mask[open_] & (nb.forced[open_] < stop)  # B3: fixed out
        orders = [
            (c := np.flatnonzero(mk))[np.argsort(-nb.lean[i, c], kind="stable")]
            for i, mk in zip(open_, masks, strict=True)
        ]
        ends, forced = self._chains(level, open_, masks, orders, stop)
        kids = [
            (f, t) for f in range(len(open_)) for t in range(ends[f]) if forced[f][t][orders[f][t]] < stop
        ]
        if not kids:
            return None
        fs = np.array([f for f, _ in kids])
        adds = np.array([orders[f][t] for f, t in kids])
        src = open_[fs]
        base = level.base[src] + self.bounds.ab_t[adds]
        losses = self.bounds.loss_of(base)
        chosen = [(*level.chosen[open_[f]], int(adds[r])) for r, (f, _) in enumerate(kids)]
        j = int(np.argmin(losses))
        if losses[j] < self.best_loss:
            self.best_loss, self.best = float(losses[j]), chosen[j]
        dev_time = level.dev_time[src].copy()
        dev_time[np.arange(len(kids)), self.dev[adds]] += self.lat[adds]
        energy = level.energy[src] + self.energy[adds]
        child = masks[fs] & self._fitting(dev_time, energy)
        for r, (f, t) in enumerate(kids):
            child[r, orders[f][: t + 1]] = False
            child[r] &= forced[f][t] < stop
        live = np.flatnonzero(child.any(axis=1))
        if live.size == 0:
            return None
        rows_nb = self._evaluate(
            base[live], child[live], dev_time[live], energy[live], np.full(live.size, -1), lean=self._stop()
        )
        return _Nodes(
            [chosen[r] for r in live], base[live], dev_time[live], energy[live], child[live], rows_nb
        )

    def _chains(
        self, level: _Nodes, open_: np.ndarray, masks: np.ndarray, orders: list[np.ndarray], stop: float
    ) -> tuple[list[int], list[list[np.ndarray]]]:
        """Bound the exclude chains of the open nodes: row t of node f drops v_0..v_(t-1) (row 0
        is the node). Rows go in growing stages across all nodes at once; a node's chain ends at
        its first pruned row, since every later child is a subset of it. Returns each node's
        end and the B3 row (``forced``) of each of its rows before the end."""
        nb = level.bounds
        ends = [len(o) for o in orders]
        forced = [[nb.forced[i]] for i in open_]
        lo = 1
        while True:
            hi = lo + max(1, lo // 2)
            rows = [(f, t) for f in range(len(open_)) for t in range(lo, min(hi, ends[f]))]
            if not rows:
                return ends, forced
            fs = np.array([f for f, _ in rows])
            chain = masks[fs].copy()
            for r, (f, t) in enumerate(rows):
                chain[r, orders[f][:t]] = False
            src = open_[fs]
            cb = self._evaluate(
                level.base, chain, level.dev_time[src], level.energy[src], nb.sizes[src], rows=src
            )
            for r, (f, t) in enumerate(rows):
                if t >= ends[f]:
                    continue
                if cb.bound[r] >= stop:
                    ends[f] = t
                else:
                    forced[f].append(cb.forced[r])
            lo = hi

    # -- incumbent ---------------------------------------------------------------------
    def _incumbent(self, root: np.ndarray) -> None:
        """Greedy forward selection, then local search (add, drop, swap one expert) to a local
        optimum: a good feasible start tightens pruning (any feasible subset is valid)."""
        chosen: list[int] = []
        base = self.bounds.empty_base()
        current = math.inf
        while True:
            dev_time, energy = self._cost_of(chosen)
            fit = root & self._fitting(dev_time[None], np.array([energy]))[0]
            fit[chosen] = False
            adds = np.flatnonzero(fit)
            if adds.size == 0:
                break
            losses = self.bounds.loss_of(base + self.bounds.ab_t[adds])
            j = int(np.argmin(losses))
            if losses[j] >= current:
                break
            chosen.append(int(adds[j]))
            base = base + self.bounds.ab_t[adds[j]]
            current = float(losses[j])
        if not chosen:
            return
        for _ in range(4 * self.p.size):
            move = self._best_move(chosen, base, root)
            if move is None or move[0] >= current - 1e-15:
                break
            current, drop, add = move
            if drop >= 0:
                chosen.remove(drop)
                base = base - self.bounds.ab_t[drop]
            if add >= 0:
                chosen.append(add)
                base = base + self.bounds.ab_t[add]
        self.best_loss, self.best = float(self.bounds.loss_of(base)), tuple(chosen)

    def _best_move(
        self, chosen: list[int], base: np.ndarray, root: np.ndarray
    ) -> tuple[float, int, int] | None:
        """Best (loss, dropped or -1, added or -1) over every feasible add, drop and swap."""
        dev_time, energy = self._cost_of(chosen)
        moves: list[tuple[int, int]] = []
        rows = []
        for drop in (-1, *chosen):
            dt, e, b = dev_time.copy(), energy, base
            if drop >= 0:
                dt[self.dev[drop]] -= self.lat[drop]
                e, b = e - self.energy[drop], base - self.bounds.ab_t[drop]
                if len(chosen) > 1:
                    moves.append((drop, -1))
                    rows.append(b[None])
            fit = root & self._fitting(dt[None], np.array([e]))[0]
            fit[chosen] = False
            adds = np.flatnonzero(fit)
            moves.extend((drop, int(u)) for u in adds)
            rows.append(b + self.bounds.ab_t[adds])
        if not moves:
            return None
        losses = self.bounds.loss_of(np.vstack(rows))
        j = int(np.argmin(losses))
        return float(losses[j]), moves[j][0], moves[j][1]


def solve(problem: SelectionProblem, budget: Budget) -> Selection:
    """Exact minimum-loss feasible subset; when none fits, the cheapest expert with feasible=False."""
    start = time.perf_counter()
    search = _Search(problem, budget)
    search.run()
    if not search.best:
        return _result(problem, [cheapest(problem)], False, search.nodes, start)
    return _result(problem, search.best, True, search.nodes, start)
