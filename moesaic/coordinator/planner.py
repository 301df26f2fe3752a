"""The two levels of MoE² selection over the experts a request may use (pure: no I/O).

The caller passes the experts on offer now (:meth:`Registry.experts
<moesaic.coordinator.registry.Registry.experts>`, each with its predicted cost) and the
registry's ``epoch``; the planner never calls back.

- **Coarse** (:meth:`Planner.pool`): the exact branch-and-bound solution S* of the task's
  validation table under the budget, cached per (task, budget bucket, experts on offer,
  profile epoch). Budgets are rounded *down* to powers of ``budget_bucket_ratio``, so a cached pool
  fits every budget of its bucket under the profiles it was solved with.
- **Fine** (:meth:`Planner.plan`): per request, experts of S* in order of the request's gate
  weights (top-k), each added only while the set still fits the request's own budget under the
  predicted costs (queue wait included). When nothing fits, the plan names the cheapest expert
  and says feasible=False.

A task without a gate or validation table uses the prior weights of the fleet config and the
whole pool (still re-checked against the budget).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesaic.budget import Budget
from moesaic.coordinator.config import CoordinatorSettings, TaskSettings
from moesaic.coordinator.gate import Gate
from moesaic.coordinator.registry import Expert
from moesaic.coordinator.selection import solve
from moesaic.coordinator.validation import ValidationTable

__all__ = ["Plan", "Planner", "TaskModel", "cheapest", "load_task_models", "set_cost"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskModel:
    """What the coordinator knows about one task: its gate and validation table (both optional)."""

    task: str
    input_kind: str = "tensor"
    gate: Gate | None = None
    table: ValidationTable | None = None
    max_experts: int = 0
    table_gate: np.ndarray | None = field(default=None, repr=False)
    """Gate weights of the table's frames [Fr, N], computed once."""


def load_task_models(tasks: Mapping[str, TaskSettings]) -> dict[str, TaskModel]:
    """Load each task's gate and validation table named in the fleet config."""
    out: dict[str, TaskModel] = {}
    for task, settings in tasks.items():
        gate = Gate.load(Path(settings.gate)) if settings.gate else None
        table = ValidationTable.load(Path(settings.validation)) if settings.validation else None
        if gate is not None and gate.task != task:
            raise ValueError(f"tasks.{task}.gate: the gate was trained for task {gate.task!r}")
        if table is not None and table.task != task:
            raise ValueError(f"tasks.{task}.validation: the table is for task {table.task!r}")
        if table is not None and gate is not None and tuple(table.experts) != tuple(gate.experts):
            raise ValueError(f"tasks.{task}: the gate and the validation table list different experts")
        kind = gate.input_kind if gate else (table.input_kind if table else settings.input_kind or "tensor")
        table_gate = gate.weights_all(table.features) if gate is not None and table is not None else None
        out[task] = TaskModel(task, kind, gate, table, settings.max_experts or 0, table_gate)
    return out


@dataclass(frozen=True)
class _Pool:
    """A cached coarse pool with the gate's columns for it, so a request costs one small matmul."""

    ids: tuple[str, ...]
    weights_cols: np.ndarray | None
    bias_cols: np.ndarray | None
    prior: np.ndarray | None
    columns: tuple[tuple[float, tuple[float, ...]], ...] | None = None
    """(bias, weights) per pool expert, for the pure-Python path."""

    @classmethod
    def of(cls, tm: TaskModel, experts: list[Expert]) -> _Pool:
        if tm.gate is not None and experts:
            index = {e: i for i, e in enumerate(tm.gate.experts)}
            cols = [index[e.id] for e in experts]
            # Fold the feature standardisation into the columns: z = f @ W' + b'.
            w = tm.gate.weights[:, cols] / tm.gate.scale[:, None]
            b = tm.gate.bias[cols] - (tm.gate.mean / tm.gate.scale) @ tm.gate.weights[:, cols]
            columns = tuple((float(b[j]), tuple(w[:, j].tolist())) for j in range(len(cols)))
            ids = tuple(e.id for e in experts)
            return cls(ids, w, b, None, columns if len(cols) * w.shape[0] <= 512 else None)
        prior = np.array([e.weight for e in experts], np.float64)
        return cls(tuple(e.id for e in experts), None, None, prior / prior.sum() if len(prior) else prior)

    def weights(self, tm: TaskModel, features: np.ndarray | None) -> list[float]:
        """Gate weights of one request renormalised over this pool (softmax over its columns)."""
        if self.weights_cols is None or self.bias_cols is None or tm.gate is None or features is None:
            if self.prior is not None:
                return [float(p) for p in self.prior]
            return [1.0 / len(self.ids)] * len(self.ids)
        if self.columns is None:  # large pools: numpy
            z = features @ self.weights_cols + self.bias_cols
            e = np.exp(z - z.max())
            return [float(x) for x in e / e.sum()]
        # Small pools: plain Python beats numpy's per-call overhead on a few dozen numbers.
        f = features.tolist()
        zs = [b + sum(x * w for x, w in zip(f, col, strict=True)) for b, col in self.columns]
        top = max(zs)
        es = [math.exp(z - top) for z in zs]
        total = sum(es)
        return [e / total for e in es]


@dataclass(frozen=True)
class Plan:
    experts: tuple[Expert, ...]
    weights: tuple[float, ...]
    """Gate weights renormalised over ``experts``."""
    latency_ms: float
    energy_mj: float
    feasible: bool


@functools.lru_cache(maxsize=4096)
def _bucket(value: float, ratio: float) -> float:
    """``value`` rounded down to a power of ``ratio`` (0 stays 0 = unbounded)."""
    if value <= 0:
        return 0.0
    return float(ratio ** math.floor(math.log(value) / math.log(ratio) + 1e-12))


def set_cost(
    experts: Sequence[Expert], overhead_ms: float, busy: Mapping[str, float] | None = None
) -> tuple[float, float]:
    """(latency, energy) of running ``experts`` on top of devices already ``busy`` (ms left)."""
    per_device = dict(busy or {})
    energy = 0.0
    for e in experts:
        per_device[e.device] = per_device.get(e.device, 0.0) + e.latency_ms
        energy += e.energy_mj
    return (max(per_device.values()) if per_device else 0.0) + overhead_ms, energy


class Planner:
    def __init__(self, settings: CoordinatorSettings, tasks: Mapping[str, TaskModel]) -> None:
        self.settings = settings
        self.tasks = dict(tasks)
        self._cache: dict[tuple[object, ...], tuple[str, ...]] = {}
        self._pools: dict[tuple[object, ...], _Pool] = {}
        self._known: dict[str, frozenset[str] | None] = {}
        self.solves = 0

    def task_model(self, task: str) -> TaskModel:
        return self.tasks.get(task) or TaskModel(task)

    def candidates(self, task: str, experts: Sequence[Expert]) -> list[Expert]:
        """The ``experts`` that the task's gate knows (all when it has none)."""
        if task not in self._known:
            tm = self.task_model(task)
            ids = tm.gate.experts if tm.gate else (tm.table.experts if tm.table else None)
            self._known[task] = frozenset(ids) if ids is not None else None
        known = self._known[task]
        if known is None:
            return list(experts)
        return [e for e in experts if e.id in known]

    def pool(self, task: str, experts: Sequence[Expert], budget: Budget, epoch: int = 0) -> list[Expert]:
        """Coarse level: the cached exact optimum S* for the budget's bucket (empty when none fits)."""
        cands = self.candidates(task, experts)
        by_id = {e.id: e for e in cands}
        return [by_id[i] for i in self._pool(task, cands, budget, epoch).ids]

    def _pool(self, task: str, cands: list[Expert], budget: Budget, epoch: int) -> _Pool:
        ids = tuple(e.id for e in cands)
        key = (task, budget.latency_ms, budget.energy_mj, epoch, ids)
        hit = self._pools.get(key)
        if hit is not None:
            return hit
        ratio = self.settings.budget_bucket_ratio
        bucketed = Budget(
            latency_ms=_bucket(budget.latency_ms, ratio), energy_mj=_bucket(budget.energy_mj, ratio)
        )
        tm = self.task_model(task)
        if cands and tm.table is not None and tm.table_gate is not None:
            chosen_ids = self._solve(tm, cands, bucketed, epoch)
            if not chosen_ids and bucketed != budget:
                # Rounding the budget down made it infeasible: solve the request's own budget.
                chosen_ids = self._solve(tm, cands, budget, epoch)
            by_id = {e.id: e for e in cands}
            chosen = [by_id[i] for i in chosen_ids]
        else:
            chosen = list(cands)
        pool = _Pool.of(tm, chosen)
        if len(self._pools) > 4096:
            self._pools.clear()
        self._pools[key] = pool
        return pool

    def _solve(self, tm: TaskModel, cands: list[Expert], budget: Budget, epoch: int) -> tuple[str, ...]:
        assert tm.table is not None and tm.table_gate is not None
        key = (tm.task, budget, tuple(e.id for e in cands), epoch)
        ids = self._cache.get(key)
        if ids is None:
            problem = tm.table.problem(
                tm.table_gate, [e.cost() for e in cands], overhead_ms=self.settings.overhead_ms
            )
            selection = solve(problem, budget)
            self.solves += 1
            ids = selection.ids if selection.feasible else ()
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = ids
            log.debug("coarse %s %s -> %s (%d nodes)", tm.task, budget, ids, selection.nodes_explored)
        return ids

    def gate_weights(self, task: str, features: np.ndarray | None, experts: Sequence[Expert]) -> np.ndarray:
        """The request's gate weights renormalised over ``experts``."""
        if not experts:
            return np.zeros(0)
        tm = self.task_model(task)
        if tm.gate is not None and features is not None:
            return tm.gate.weights_over(features, [e.id for e in experts])
        w = np.array([e.weight for e in experts], np.float64)
        return np.asarray(w / w.sum())

    def plan(
        self,
        task: str,
        experts: Sequence[Expert],
        features: np.ndarray | None,
        budget: Budget,
        *,
        epoch: int = 0,
        busy: Mapping[str, float] | None = None,
        limit: int | None = None,
        fallback: bool = True,
    ) -> Plan:
        """Fine level: top-k of the gate within the coarse pool that fits ``budget``.

        ``experts``: those on offer (already-tried ones left out), each with its predicted cost
        now; ``busy``: device -> ms still queued there by this request; ``limit``: most experts
        to add. With ``fallback`` and nothing fitting, the cheapest candidate alone
        (feasible=False); without it an empty plan.
        """
        tm = self.task_model(task)
        cands = self.candidates(task, experts)
        k = limit if limit is not None else (tm.max_experts or self.settings.max_experts or 1 << 30)
        pool = self._pool(task, cands, budget, epoch) if k > 0 else _Pool((), None, None, None)
        weights = pool.weights(tm, features)
        by_id = {e.id: e for e in cands}
        chosen: list[Expert] = []
        picked: list[float] = []
        per_device = dict(busy or {})
        energy = 0.0
        overhead = self.settings.overhead_ms
        longest = max(per_device.values(), default=0.0)
        lat_cap = budget.latency_ms * (1 + 1e-9) if budget.latency_ms > 0 else math.inf
        e_cap = budget.energy_mj * (1 + 1e-9) if budget.energy_mj > 0 else math.inf
        for i in sorted(range(len(weights)), key=weights.__getitem__, reverse=True):
            e = by_id[pool.ids[i]]
            queued = per_device.get(e.device, 0.0) + e.latency_ms
            if max(longest, queued) + overhead <= lat_cap and energy + e.energy_mj <= e_cap:
                chosen.append(e)
                picked.append(weights[i])
                per_device[e.device] = queued
                longest = max(longest, queued)
                energy += e.energy_mj
                if len(chosen) >= k:
                    break
        if chosen:
            total = sum(picked)
            w = tuple(x / total for x in picked) if total > 0 else tuple(1.0 / len(picked) for _ in picked)
            return Plan(tuple(chosen), w, max(per_device.values()) + overhead, energy, True)
        if not fallback or not cands:
            return Plan((), (), 0.0, 0.0, False)
        first = cheapest(cands)
        lat, energy = set_cost([first], overhead, busy)
        return Plan((first,), (1.0,), lat, energy, False)


def cheapest(experts: Sequence[Expert]) -> Expert:
    """The expert to run when no set fits: least energy, then least latency."""
    return min(experts, key=lambda e: (e.energy_mj, e.latency_ms, e.id))
