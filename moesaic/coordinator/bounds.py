"""Valid lower bounds on the MoE² loss of every superset of a partial expert set.

A search node is a chosen set S with candidates C. Any completion T = S ∪ U (U ⊆ C) has, per
validation sample i, the mixture label probability

    r_i(T) = (A_i + Σ_{u∈U} a_iu) / (G_i + Σ_{u∈U} b_iu),   a_iu = g_iu q_iu,  b_iu = g_iu,

with A_i = Σ_{n∈S} a_in and G_i = Σ_{n∈S} b_in. Since L(T) = mean_i -log r_i(T) and -log is
decreasing, any per-sample upper bound R_i >= r_i(T) (for all admissible U) gives the valid
bound L(T) >= mean_i -log R_i.

**Unconstrained maximum (fractional-ratio argument).** Let r* = max_U r_i(S ∪ U), attained by
U* with numerator N and denominator D = N / r*. For u in U*, removing u must not raise the
ratio: (N - a_u) / (D - b_u) <= r*  =>  a_u >= r* b_u  =>  q_u >= r*. For u not in U*, adding u
must not raise it: (N + a_u) / (D + b_u) <= r*  =>  q_u <= r*. So U* holds every candidate
with q_u > r* and none with q_u < r*; candidates with q_u = r* leave the ratio at r* either way.
Hence r* is the largest ratio over the *prefixes* of the candidates sorted by q_iu descending
(and the empty extension A_i / G_i). With S empty this is max_{u∈C} q_iu. The candidates are
sorted once per sample (:attr:`RatioBounds.order`) and masked per node, so a node costs a few
[M, N] array operations.

Budgets enter through the candidates: the search keeps in C only experts that still fit
beside S (energy sum, per-device latency sum), and :func:`max_count` bounds how many of them
fit together (0: the node is a leaf). Cardinality and energy-knapsack refinements of R_i
(Dinkelbach gaps) were measured and dropped: with the branching rule of the search they pruned
under 2% more nodes at 2-4x the cost per node.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["PROB_FLOOR", "RatioBounds", "max_count"]

PROB_FLOOR = 1e-12
"""Mixture probabilities are floored here before the log (as in the loss itself)."""


class RatioBounds:
    """Per-sample ratio bounds for one validation table (q [M, N], gate [M, N], energies [N])."""

    def __init__(self, q: np.ndarray, gate: np.ndarray, energy: np.ndarray) -> None:
        self.q = q
        self.a = gate * q
        self.b = gate
        self.m, self.n = q.shape
        self.energy = energy
        self.order = np.argsort(-q, axis=1, kind="stable")  # [M, N] experts by q descending
        rows = np.arange(self.m)[:, None]
        self.a_sorted = self.a[rows, self.order]
        self.b_sorted = self.b[rows, self.order]
        self._rows = np.arange(self.m)

    def loss_of(self, ratio: np.ndarray) -> float:
        """mean_i -log(ratio_i) with the loss's probability floor."""
        return float(-np.log(np.maximum(ratio, PROB_FLOOR)).sum() / self.m)

    def unconstrained(
        self, num: np.ndarray, den: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample max ratio over U ⊆ {mask} (see the module docstring) and its branching scores.

        Returns (ratio [M], score [N]): score_u sums, over the samples whose best extension
        contains u, u's share a_iu / numerator of that extension — how much the bound leans on u.
        """
        m = mask[self.order]  # [M, N] candidate flags in each sample's q order
        num_c = num[:, None] + np.cumsum(self.a_sorted * m, axis=1)
        den_c = den[:, None] + np.cumsum(self.b_sorted * m, axis=1)
        ratios = num_c / np.maximum(den_c, 1e-300)
        j = ratios.argmax(axis=1)
        best = ratios[self._rows, j]
        base = num / np.maximum(den, 1e-300)
        improves = best > base
        ratio = np.maximum(best, base)
        in_u = m & (np.arange(self.n)[None, :] <= j[:, None]) & improves[:, None]
        share = self.a_sorted / np.maximum(num_c[self._rows, j], 1e-300)[:, None]
        score = np.bincount(self.order[in_u], weights=share[in_u], minlength=self.n)
        return ratio, score


def max_count(
    cands: list[int],
    energies: np.ndarray,
    latencies: np.ndarray,
    device: list[int],
    dev_time: list[float],
    energy_room: float,
    latency_cap: float,
) -> int:
    """Most candidates any feasible completion can add: the cheapest first, per budget
    (energy over all candidates, latency per device queue); caps are inclusive of tolerance."""
    k = len(cands)
    if math.isfinite(energy_room):
        room, count = energy_room, 0
        for e in sorted(float(energies[c]) for c in cands):
            if e > room:
                break
            room -= e
            count += 1
        k = min(k, count)
    if math.isfinite(latency_cap):
        per_dev: dict[int, list[float]] = {}
        for c in cands:
            per_dev.setdefault(device[c], []).append(float(latencies[c]))
        count = 0
        for d, times in per_dev.items():
            room = latency_cap - dev_time[d]
            for t in sorted(times):
                if t > room:
                    break
                room -= t
                count += 1
        k = min(k, count)
    return k
