"""Valid lower bounds on the MoE² loss of every superset of a partial expert set.

A search node is a chosen set I with candidates C. Any completion S = I ∪ U (U ⊆ C) has, per
validation sample i, the mixture label probability

    r_i(S) = (A_i + Σ_{u∈U} a_iu) / (G_i + Σ_{u∈U} b_iu),   a_iu = g_iu q_iu,  b_iu = g_iu,

with A_i = Σ_{n∈I} a_in and G_i = Σ_{n∈I} b_in, and L(S) = mean_i -log r_i(S) (the loss floors
r_i at ``PROB_FLOOR``). Three statements, each proved here, prune the search.

**B1. Per-sample maximum (fractional-ratio argument).** Let R_i = max_U r_i(I ∪ U), attained by
U* with numerator N and denominator D = N / R_i. For u in U*, removing u must not raise the
ratio: (N - a_u) / (D - b_u) <= R_i  =>  a_u >= R_i b_u  =>  q_u >= R_i. For u not in U*, adding
u must not raise it: (N + a_u) / (D + b_u) <= R_i  =>  q_u <= R_i. So U* holds every candidate
with q_u > R_i and none with q_u < R_i (candidates with q_u = R_i leave the ratio at R_i either
way): R_i is the largest ratio over the *prefixes* of the candidates sorted by q_iu descending
(and the empty extension A_i / G_i when I is not empty). Since -log is decreasing,

    L(S) >= mean_i -log R_i.                                                          (B1)

B1 lets every sample pick its own best extension, so it is loose when experts are strong on
different samples: it cannot see that a completion which helps some samples dilutes the
mixture of all the others.

**B2. Coupled cardinality bound.** Fix a completion U with |U| = j >= 1, and for each sample let
ρ_i = max(R_i, R_MIN) (any ρ_i >= R_i serves). The tangent of the convex -log at ρ_i gives
-log r >= -log ρ_i + 1 - r / ρ_i, and

    1 - r_i(S) / ρ_i = z_i(U) / (ρ_i D_i(U)),   z_i(U) = (ρ_i G_i - A_i) + Σ_{u∈U} (ρ_i b_iu - a_iu),

with D_i(U) = G_i + Σ_{u∈U} b_iu. Because ρ_i >= r_i(S), z_i(U) >= 0 for *every* U, so
replacing D_i(U) by an upper bound only lowers the term: D_i(U) <= B_ij = G_i +
min(b'_1 + (j - 1) b'_2, Σ_C b), where b'_1 >= b'_2 bound the two largest candidate b_iu (the
first and second candidates present among a pool's K largest b_iu, else the (K+1)-th largest,
which no other candidate exceeds). Sizes j >= ``EXACT_SIZES`` share the cap G_i + Σ_C b. Hence,
for every U of size j,

    M L(S) >= Σ_i -log ρ_i + c_j + Σ_{u∈U} W_ju,
    c_j = Σ_i (ρ_i G_i - A_i) / (ρ_i B_ij),   W_ju = Σ_i (ρ_i b_iu - a_iu) / (ρ_i B_ij),

which is *linear* in U with signed coefficients: an expert that helps some samples and hurts
others pays for both, so the bound couples the samples. Its minimum over |U| = j is c_j plus
the j smallest W_ju, and over every completion of the node

    L(S) >= min_{1<=j<=k} (Σ_i -log ρ_i + c_j + Σ_{j smallest} W_j) / M              (B2)

where k bounds how many candidates fit together (:class:`Capacity`). For the shared column the
running sums of the sorted W are convex in j (sorted increments), so their minimum over a range
of sizes sits at the count of negative W clipped to the range. The empty completion is I
itself, whose loss the search has already offered as an incumbent. The loss floors r at
PROB_FLOOR; where r_i(S) < PROB_FLOOR the tangent exceeds the floored loss by at most
PROB_FLOOR / ρ_i <= PROB_FLOOR / R_MIN, which B2 subtracts per sample.

**B3. Fixing candidates (reduced costs).** The same linear bound restricted to the completions
that contain a given candidate u is, for size j, c_j + W_ju plus the j - 1 smallest of the other
W_j, i.e. c_j + (sum of the j - 1 smallest W_j) + max(W_ju, j-th smallest W_j). When its minimum
over j reaches the incumbent, no better completion of the node contains u: u leaves the
candidates of the node's whole subtree, and the node's include-u child is never built.

On adversarial instances (quality correlated with cost, budgets at the knee: ``bench/selection.py
--adversarial``) B2 and B3 cut the branch-and-bound tree 5-10x against B1 alone, for two small
matrix products per node. Refinements measured and left out, as they cost more per node than
they pruned: exact caps for more than the two largest b (no fewer nodes), the best single
addition as ρ for j = 1 (-4% nodes), a second tangent point per sample (-6%), float32 running
sums for B1 (their rounding margin alone cost ~50% more nodes: many bounds land within 1e-5 of
the incumbent).

Budgets enter through the candidates: the search keeps in C only experts that still fit beside
I (energy sum, per-device latency sum), and :class:`Capacity` bounds how many of them fit
together. :meth:`RatioBounds.evaluate` computes B1-B3 for a batch of nodes at once, so numpy's
per-call cost is paid once per batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["BATCH", "EXACT_SIZES", "PROB_FLOOR", "R_MIN", "Capacity", "NodeBounds", "Pool", "RatioBounds"]

PROB_FLOOR = 1e-12
"""Mixture probabilities are floored here before the log (as in the loss itself)."""
R_MIN = 1e-3
"""B2's tangent point is at least this (conditioning of 1 / ρ); any ρ >= R is valid."""
TINY = 1e-300
"""Added to a denominator that is 0 only for the empty chosen set, where A = 0 too."""
BATCH = 32
"""Nodes bounded per pass of :meth:`RatioBounds.evaluate`, at most (see _WORK_BYTES)."""
_WORK_BYTES = 16 << 20
"""Work space of one :class:`RatioBounds`; large tables get smaller passes."""
EXACT_SIZES = 6
"""B2 gives each completion size j < this its own cap B_ij; larger sizes share the cap G + Σ_C b
(the minimum over j is almost always at j <= 3, and each exact size costs a column)."""
_LOG_R_MIN = math.log(R_MIN)
_TOP = 4
"""B2's caps read a node's two largest b from its pool's K largest per sample."""
_BIG = 1e300
"""Slope of a non-candidate: never among the j smallest (finite, so sums stay free of nan)."""


class NodeBounds(NamedTuple):
    """Bounds of a batch of T nodes (mean losses)."""

    b1: np.ndarray
    """[T] B1."""
    b2: np.ndarray
    """[T] B2 (+inf for a node without candidates)."""
    forced: np.ndarray
    """[T, C] B3 per candidate: bound over the completions containing it (+inf elsewhere)."""
    sizes: np.ndarray
    """[T] at most this many candidates fit together (also bounds every subset of them)."""
    lean: np.ndarray
    """[T, C] how much B1 leans on each candidate (the search's branching order), where asked."""

    @property
    def bound(self) -> np.ndarray:
        """[T] max(B1, B2)."""
        return np.maximum(self.b1, self.b2)


class Pool(NamedTuple):
    """Candidate experts laid out for :meth:`RatioBounds.evaluate`: the nodes of a batch draw
    their candidates from these, as masks [T, C] over ``ids``."""

    ids: np.ndarray
    """[C] expert indices."""
    a: np.ndarray
    """[C, M] a = g q."""
    b: np.ndarray
    """[C, M] b = g."""
    q: np.ndarray
    """[C, M] q."""
    q_order: np.ndarray
    """[C, M] the pool position of each sample's rank-p candidate by q."""
    a_by_q: np.ndarray
    """[C, M] a of each sample's rank-p candidate."""
    b_by_q: np.ndarray
    """[C, M] b of each sample's rank-p candidate."""
    by_b: np.ndarray
    """[<=K, M] pool positions of each sample's K largest b (K = _TOP)."""
    top_b: np.ndarray
    """[K + 1, M] those b, then the (K+1)-th largest (0 when the pool is smaller)."""


class RatioBounds:
    """Bounds B1-B3 for one validation table (q [M, N], gate [M, N]).

    Arrays are kept expert-major ([N, M]) so that sums over experts run along one axis,
    vectorised over the samples; a node's chosen set enters as ``base`` = (A | G), one [2M] row.
    """

    def __init__(self, q: np.ndarray, gate: np.ndarray) -> None:
        self.m, self.n = q.shape
        self.a_t = np.ascontiguousarray((gate * q).T)  # [N, M]
        self.b_t = np.ascontiguousarray(gate.T)
        self.q_t = np.ascontiguousarray(q.T)
        self.ab_t = np.hstack([self.a_t, self.b_t])  # [N, 2M]: the base row an expert adds
        self._q_order = np.argsort(-q, axis=1, kind="stable")  # [M, N]: experts by q descending
        self._cols = np.arange(self.m)
        # Work space for the large arrays of :meth:`evaluate` ([C, 2M, T], [T, M, k]), reused
        # across calls: a fresh allocation over ~128 kB is mapped from the OS, and its page
        # faults cost more than the arithmetic.
        self.batch = max(1, min(BATCH, _WORK_BYTES // (2 * 8 * self.n * 2 * self.m)))
        self._work = np.empty((2, self.batch * self.n * 2 * self.m))
        self._helped = np.empty(self.batch * self.n * self.m, bool)
        self._steps = np.arange(self.n)
        self._float_steps = np.arange(self.n, dtype=np.float64)

    def empty_base(self) -> np.ndarray:
        """The base row of the empty chosen set."""
        return np.r_[np.zeros(self.m), np.full(self.m, TINY)]

    def loss_of(self, base: np.ndarray) -> np.ndarray:
        """L of the chosen sets themselves: base [..., 2M] -> [...]."""
        m = self.m
        ratio = base[..., :m] / base[..., m:]
        return -np.log(np.maximum(ratio, PROB_FLOOR)).sum(axis=-1) / m

    def pool(self, ids: np.ndarray) -> Pool:
        """Lay out the candidates ``ids`` (increasing) for :meth:`evaluate`."""
        c = len(ids)
        position = np.full(self.n, -1)
        position[ids] = np.arange(c)
        q_order = self._q_order
        ranked = q_order[position.take(q_order) >= 0].reshape(self.m, c).T  # [C, M] experts
        flat = ranked * self.m + self._cols
        local = position.take(ranked)
        a, b, q = self.a_t.take(ids, axis=0), self.b_t.take(ids, axis=0), self.q_t.take(ids, axis=0)
        by_b = np.argsort(-b, axis=0, kind="stable")[: _TOP + 1]  # [<=K+1, M] pool positions
        top_b = np.zeros((_TOP + 1, self.m))
        top_b[: len(by_b)] = np.take_along_axis(b, by_b, axis=0)
        return Pool(ids, a, b, q, local, self.a_t.take(flat), self.b_t.take(flat), by_b[:_TOP], top_b)

    def evaluate(
        self,
        pool: Pool,
        base: np.ndarray,
        masks: np.ndarray,
        sizes: np.ndarray,
        *,
        rows: np.ndarray | None = None,
        lean: float = -math.inf,
    ) -> NodeBounds:
        """B1-B3 of T nodes: ``base`` [T, 2M] (A | G of each chosen set; or its rows ``rows``
        [T], gathered a pass at a time), ``masks`` [T, C] (their candidates, within ``pool``) and
        ``sizes`` [T] (at most this many fit together, >= 1). ``forced`` and ``lean`` come back
        over the pool, [T, C]; ``lean`` only for the nodes whose bound is below ``lean`` (the ones
        the search will expand), 0 elsewhere."""
        step = self.batch
        parts = []
        for r in range(0, len(masks), step):
            part = base[r : r + step] if rows is None else base[rows[r : r + step]]
            parts.append(self._evaluate(pool, part, masks[r : r + step], sizes[r : r + step], lean))
        if len(parts) == 1:
            return parts[0]
        return NodeBounds(*(np.concatenate(field) for field in zip(*parts, strict=True)))

    def _evaluate(
        self, pool: Pool, base: np.ndarray, masks: np.ndarray, sizes: np.ndarray, lean: float
    ) -> NodeBounds:
        """:meth:`evaluate` for at most ``batch`` nodes, in as few numpy calls as possible (on a
        busy 2-core host a call costs several microseconds). The [C, 2M] work arrays keep the
        nodes on their last axis, so a gather by rank moves T values at a time and running
        sums over ranks add whole rows. Matrix products are batched per node, so each BLAS call
        is small enough to run on one thread (a threaded call on a small matrix costs 10-20x
        more on such a host)."""
        m, c, t = self.m, len(pool.ids), len(masks)
        flags = np.ascontiguousarray(masks.T, dtype=np.float64)  # [C, T]
        num, den = base[:, :m], base[:, m:]  # [T, M]
        # B1: running sums of each sample's candidates in q order, best prefix.
        sums = self._work[0, : c * 2 * m * t].reshape(c, 2 * m, t)
        scratch = self._work[1, : c * m * t].reshape(c, m, t)
        np.take(flags, pool.q_order, axis=0, out=scratch, mode="clip")  # "clip": no checked copy
        np.multiply(scratch, pool.a_by_q[:, :, None], out=sums[:, :m])
        np.multiply(scratch, pool.b_by_q[:, :, None], out=sums[:, m:])
        sums[0] += base.T
        for p in range(1, c):
            sums[p] += sums[p - 1]
        total = (sums[-1, m:].T - den) * (1 + 1e-12)  # [T, M] Σ_C b, rounding up
        best = np.divide(sums[:, :m], sums[:, m:], out=scratch).max(axis=0)  # [M, T]
        ratio = np.maximum(best.T, num / den)
        logs = np.log(np.maximum(ratio, PROB_FLOOR))  # [T, M]
        b1 = logs.sum(axis=1) / -m
        # B2 per size j = 1..k: caps B_ij, weights 1 / (ρ B_ij), c_j and W_j.
        rho = np.maximum(ratio, R_MIN)
        base_b2 = -np.maximum(logs, _LOG_R_MIN).sum(axis=1) - m * PROB_FLOOR / R_MIN
        # Sizes j < k get their own cap; with more candidates fitting, the last column serves
        # every size j >= k with the cap G + Σ_C b (valid for all of them).
        tail = int(sizes.max()) > EXACT_SIZES
        k = EXACT_SIZES if tail else int(sizes.max())
        steps = self._steps[:k]
        # The two largest candidate b per sample, from the pool's K largest: scanning them
        # from the K-th up, the first and second present so far (ties give equal values); past
        # the K, the (K+1)-th largest bounds every other candidate.
        present = masks.T.take(pool.by_b, axis=0)  # [K, M, T]
        first = np.broadcast_to(pool.top_b[-1][:, None], (m, t))
        second = first
        for p in range(len(present) - 1, -1, -1):
            second = np.where(present[p], first, second)
            first = np.where(present[p], pool.top_b[p][:, None], first)
        first, second = np.ascontiguousarray(first.T), np.ascontiguousarray(second.T)  # [T, M]
        weight, rho_weight = self._work[:, : t * m * k].reshape(2, t, m, k)  # reuse: see __init__
        cap = np.multiply(second[..., None], self._float_steps[:k], out=weight)  # (j-1) x 2nd largest
        cap += first[..., None]
        np.minimum(cap, total[..., None], out=cap)
        if tail:
            cap[..., -1] = total
        cap += den[..., None]
        cap *= rho[..., None]
        np.reciprocal(cap, out=weight)  # [T, M, k]
        const = ((rho * den - num)[:, None, :] @ weight)[:, 0, :]  # c_j [T, k]
        np.multiply(weight, rho[..., None], out=rho_weight)
        slope = pool.b @ rho_weight - pool.a @ weight  # W [T, C, k]
        slope[~masks] = _BIG
        ranked = np.sort(slope, axis=1)
        prefix = np.cumsum(ranked, axis=1)  # [T, C, k]: sum of the p + 1 smallest
        kth = ranked[:, steps, steps]  # [T, k]: the j-th smallest W_j
        linear = prefix[:, steps, steps] + const  # c_j + the j smallest
        linear[steps >= sizes[:, None]] = np.inf  # sizes that cannot fit
        # B3: u plus the j - 1 smallest others (inf sizes stay inf).
        forced = np.maximum(slope, kth[:, None, :]) + (linear - kth)[:, None, :]
        if tail:  # sizes k..size share the last column: its prefix sums are convex in p (the
            # increments are sorted), so their minimum over p in [k-1, size-1] sits at the
            # count of negative W clipped to that range; with u forced in, p in [k-2, size-2].
            last = prefix[..., -1]
            fall = (ranked[..., -1] < 0).sum(axis=1) - 1
            fit = sizes >= k
            rows = np.arange(t)
            at = np.clip(fall, k - 1, np.maximum(sizes - 1, k - 1))
            linear[:, -1] = np.where(fit, const[:, -1] + last[rows, at], np.inf)
            at = np.clip(fall, k - 2, np.maximum(sizes - 2, k - 2))
            forced[..., -1] = slope[..., -1] + np.where(fit, const[:, -1] + last[rows, at], np.inf)[:, None]
        b2 = (base_b2 + linear.min(axis=1)) / m
        forced = (forced.min(axis=2) + base_b2[:, None]) / m
        forced[~masks] = np.inf
        leans = np.zeros(masks.shape)
        open_ = np.flatnonzero(np.maximum(b1, b2) < lean)
        if open_.size:  # how much B1 leans on each candidate: its share of each sample's best extension
            o = open_.size
            helped = self._helped[: o * c * m].reshape(o, c, m)
            np.greater(pool.q, ratio[open_, None, :], out=helped)
            helped &= masks[open_, :, None]
            share = np.multiply(helped, pool.a, out=self._work[1, : o * c * m].reshape(o, c, m))
            top = num[open_] + share.sum(axis=1)  # [O, M]
            leans[open_] = (share @ (1.0 / np.maximum(top, TINY))[..., None])[..., 0]
        return NodeBounds(b1, b2, forced, sizes, leans)


class Capacity:
    """How many more experts can fit: the cheapest candidates first, per budget.

    Energy is one knapsack over all candidates; latency is one knapsack per device queue. The
    count is an upper bound on |U| for every feasible completion U (cheapest-first packs the
    most items into a knapsack), and it errs upwards at exact ties, which keeps it safe.
    """

    def __init__(self, energy: np.ndarray, latency: np.ndarray, device: np.ndarray) -> None:
        self._e_order = np.argsort(energy, kind="stable")
        self._e_sorted = energy[self._e_order]
        self._l_order = np.lexsort((latency, device))  # by device, then latency ascending
        self._l_sorted = latency[self._l_order]
        self._l_device = device[self._l_order]
        first = np.r_[True, self._l_device[1:] != self._l_device[:-1]]
        self._group_start = np.maximum.accumulate(np.where(first, np.arange(len(device)), 0))

    def count(
        self, masks: np.ndarray, dev_time: np.ndarray, energy_room: np.ndarray, latency_cap: float
    ) -> np.ndarray:
        """[T] most candidates of each mask [T, N] that fit together in ``energy_room`` [T]
        and, per device d, in ``latency_cap - dev_time[:, d]`` ([T, D]); caps are inclusive of
        tolerance, inf where unbounded."""
        k = masks.sum(axis=1)
        if np.isfinite(energy_room).any():
            take = masks[:, self._e_order]
            total = np.cumsum(np.where(take, self._e_sorted, 0.0), axis=1)
            k = np.minimum(k, (take & (total <= _up(energy_room)[:, None])).sum(axis=1))
        if math.isfinite(latency_cap):
            take = masks[:, self._l_order]
            t = np.where(take, self._l_sorted, 0.0)
            total = np.cumsum(t, axis=1)
            before = (total - t)[:, self._group_start]  # queue time of earlier devices
            room = latency_cap - dev_time[:, self._l_device]
            k = np.minimum(k, (take & (total - before <= _up(room))).sum(axis=1))
        return k


def _up(x: np.ndarray) -> np.ndarray:
    """A cap nudged up by rounding-error size, so a count never falls below the exact one."""
    return x + 1e-9 * (np.abs(x) + 1.0)
