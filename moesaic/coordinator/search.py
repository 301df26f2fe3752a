"""The exact subset search behind :func:`moesaic.coordinator.selection.solve`: branch and bound.

:class:`Search` walks the Boolean lattice of a task's expert subsets level by level from a greedy
+ local-search incumbent, pruning only with valid bounds (monotone infeasibility, B1, B2, B3 of
:mod:`moesaic.coordinator.bounds`), so the subset it keeps is a true optimum. The problem, its
costs and the brute-force reference live in :mod:`moesaic.coordinator.selection`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from moesaic.budget import Budget
from moesaic.coordinator.bounds import Capacity, NodeBounds, RatioBounds

if TYPE_CHECKING:
    from moesaic.coordinator.selection import SelectionProblem

__all__ = ["REL_TOL", "Search"]

REL_TOL = 1e-9
"""Relative tolerance of every budget comparison (a cost may exceed a limit by this share)."""


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


class Search:
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
        self.lat_cap = lat_cap + abs(budget.latency_ms) * REL_TOL  # inclusive of tolerance
        self.e_cap = e_cap + abs(budget.energy_mj) * REL_TOL
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
