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

**Cardinality** (at most k candidates fit the budget) and **energy knapsack** (the LP
relaxation of Σ_U E_u <= room) tighten R_i with Dinkelbach gaps; both are documented at their
functions and are valid for every lam, so the iteration only affects tightness.
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

    def refine(
        self,
        num: np.ndarray,
        den: np.ndarray,
        cands: list[int],
        k: int,
        room: float,
        ratio: np.ndarray,
        stop: float = math.inf,
    ) -> float:
        """Tighten the unconstrained ``ratio`` with |U| <= k and energy(U) <= room; returns the loss
        bound (early exit once it reaches ``stop``)."""
        lb = self.loss_of(ratio)
        r = len(cands)
        energies = self.energy[cands]
        energy_binds = float(energies.sum()) > room
        if lb >= stop or (k >= r and not energy_binds) or not np.all(den > 0):
            return lb
        if k < r:
            ratio = np.minimum(ratio, self.cardinality(num, den, cands, k))
            lb = self.loss_of(ratio)
            if lb >= stop:
                return lb
        if energy_binds:
            ratio = np.minimum(ratio, self.knapsack(num, den, cands, energies, room, num / den))
        return self.loss_of(ratio)

    def cardinality(self, num: np.ndarray, den: np.ndarray, cands: list[int], k: int) -> np.ndarray:
        """Upper bound on the ratio when |U| <= k (k < len(cands), den > 0).

        For any lam, every U with |U| <= k has num + Σa - lam (den + Σb) <= f(lam) =
        num - lam den + (sum of the k largest positive b (q - lam)), so
        ratio <= lam + max(f, 0) / den. lam starts at the best q-prefix of <= k candidates and
        takes Dinkelbach steps (the ratio of the top-k set: achievable, so lam only grows).
        """
        r = len(cands)
        b = self.b[:, cands]
        q = self.q[:, cands]
        a = b * q
        order = np.argsort(-q, axis=1, kind="stable")[:, :k]
        prefix = (num[:, None] + np.cumsum(np.take_along_axis(a, order, 1), 1)) / (
            den[:, None] + np.cumsum(np.take_along_axis(b, order, 1), 1)
        )
        lam = np.maximum(num / den, prefix.max(axis=1))
        ratio = np.full(self.m, np.inf)
        for _ in range(2):
            c = b * (q - lam[:, None])
            top = np.partition(c, r - k, axis=1)[:, r - k :]
            f = num - lam * den + np.maximum(top, 0.0).sum(axis=1)
            ratio = np.minimum(ratio, lam + np.maximum(f, 0.0) / den)
            thresh = np.maximum(top.min(axis=1), 0.0)
            take = c > thresh[:, None]
            lam = np.maximum(lam, (num + (a * take).sum(axis=1)) / (den + (b * take).sum(axis=1)))
        return ratio

    def knapsack(
        self,
        num: np.ndarray,
        den: np.ndarray,
        cands: list[int],
        costs: np.ndarray,
        cap: float,
        lam: np.ndarray,
    ) -> np.ndarray:
        """Upper bound on the ratio when Σ_U cost <= cap, via the LP (fractional) relaxation.

        For any lam, every feasible U has num + Σa - lam (den + Σb) <= F(lam), F the LP value
        of max Σ b (q - lam) under the capacity plus num - lam den; so ratio <= lam +
        max(F, 0) / den. Newton steps on the convex decreasing F move lam towards its root.
        """
        b = self.b[:, cands]
        q = self.q[:, cands]
        e = np.maximum(costs, 1e-12)
        best = np.full(self.m, np.inf)
        safe_den = np.maximum(den, 1e-300)
        for _ in range(3):
            c = b * (q - lam[:, None])
            order = np.argsort(np.where(c > 0, -c / e, np.inf), axis=1)
            cs = np.take_along_axis(c, order, axis=1)
            ps = cs > 0
            es = e[order] * ps
            prev = np.cumsum(es, axis=1) - es
            share = np.where(ps, np.clip((cap - prev) / np.maximum(es, 1e-12), 0.0, 1.0), 0.0)
            gain = (cs * share).sum(axis=1)
            mass = (np.take_along_axis(b, order, axis=1) * share).sum(axis=1)
            f = np.maximum(num - lam * den + gain, 0.0)
            best = np.minimum(best, lam + f / safe_den)
            lam = lam + f / np.maximum(den + mass, 1e-300)
        return best


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
