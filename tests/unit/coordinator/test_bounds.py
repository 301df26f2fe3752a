"""B1-B3 and the capacity count against enumeration: every bound is below every completion it covers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesaic.coordinator.bounds import BATCH, EXACT_SIZES, Capacity, RatioBounds
from moesaic.coordinator.selection import SelectionProblem, subset_loss


def random_problem(rng: np.random.Generator, n: int, m: int) -> SelectionProblem:
    """Clustered skills; sometimes labels an expert never gives (q = 0) or a gate it never gets."""
    clusters = rng.integers(0, 3, m)
    q = np.clip(rng.uniform(0.05, 0.95, (n, 3))[:, clusters].T + rng.normal(0, 0.15, (m, n)), 0, 1)
    if rng.random() < 0.3:
        q[rng.random((m, n)) < 0.15] = 0.0
    gate = rng.dirichlet(np.ones(n) * rng.choice([0.2, 1.0, 5.0]), m)
    if rng.random() < 0.3:
        gate[:, rng.integers(0, n)] = 0.0  # floored to GATE_FLOOR
    return SelectionProblem.from_arrays(
        [f"e{i}" for i in range(n)], ["d"] * n, [1.0] * n, [1.0] * n, q=q, gate=gate
    )


def completions(chosen: list[int], cands: list[int], max_size: int):
    """Every T ⊆ cands with |T| <= max_size (T = ∅ only when chosen is not empty)."""
    for r in range(0 if chosen else 1, min(max_size, len(cands)) + 1):
        yield from itertools.combinations(cands, r)


def node(rng: np.random.Generator, problem: SelectionProblem, bounds: RatioBounds):
    """A random chosen set, candidate set and size limit, laid out in a pool of a superset."""
    perm = rng.permutation(problem.size)
    n_chosen = int(rng.integers(0, problem.size - 1))
    chosen = sorted(int(u) for u in perm[:n_chosen])
    pool_ids = np.sort(perm[n_chosen:])
    mask = rng.random(len(pool_ids)) < 0.75
    mask[rng.integers(0, len(pool_ids))] = True
    size = int(rng.integers(1, mask.sum() + 1))
    base = bounds.empty_base() + bounds.ab_t[chosen].sum(axis=0)
    return chosen, pool_ids, mask, size, base


@pytest.mark.parametrize("seed", range(8))
def test_b1_b2_b3_are_below_every_completion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, int(rng.integers(3, 9)), int(rng.integers(1, 40)))
    bounds = RatioBounds(problem.q, problem.gate)
    for _ in range(6):
        chosen, pool_ids, mask, size, base = node(rng, problem, bounds)
        pool = bounds.pool(pool_ids)
        nb = bounds.evaluate(pool, base[None], mask[None], np.array([size]))
        cands = [int(u) for u in pool_ids[mask]]
        for extra in completions(chosen, cands, size):
            loss = subset_loss(problem, [*chosen, *extra]) + 1e-12
            if extra:  # B2 covers non-empty completions (the empty one is I, an incumbent)
                assert nb.b2[0] <= loss
            assert nb.b1[0] <= loss
            for u in extra:
                assert nb.forced[0, int(np.searchsorted(pool_ids, u))] <= loss


def test_b1_is_exact_for_one_sample() -> None:
    """With one validation sample the per-sample maximum is attained."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        problem = random_problem(rng, 7, 1)
        bounds = RatioBounds(problem.q, problem.gate)
        base = bounds.empty_base() + bounds.ab_t[0]
        pool = bounds.pool(np.arange(1, 7))
        nb = bounds.evaluate(pool, base[None], np.ones((1, 6), bool), np.array([6]))
        best = min(subset_loss(problem, [0, *extra]) for extra in completions([0], list(range(1, 7)), 6))
        assert nb.b1[0] == pytest.approx(best, abs=1e-12)


def test_b2_couples_samples_where_b1_cannot() -> None:
    """Two experts, each perfect on half the samples and useless on the other half: B1 lets each
    sample pick its own expert (loss 0), B2 sees that any completion dilutes half the samples."""
    q = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    p = SelectionProblem.from_arrays(["a", "b"], ["d", "d"], [1, 1], [1, 1], q=q, gate=np.ones((8, 2)))
    bounds = RatioBounds(p.q, p.gate)
    nb = bounds.evaluate(
        bounds.pool(np.arange(2)), bounds.empty_base()[None], np.ones((1, 2), bool), np.array([2])
    )
    best = min(subset_loss(p, s) for s in ([0], [1], [0, 1]))  # log 2 for both
    assert nb.b1[0] == pytest.approx(0.0, abs=1e-9)
    assert 0.3 < nb.b2[0] <= best + 1e-12


def test_batched_rows_match_single_rows() -> None:
    """A batch larger than BATCH (several passes, one pool) gives each row's own bounds."""
    rng = np.random.default_rng(3)
    problem = random_problem(rng, 10, 30)
    bounds = RatioBounds(problem.q, problem.gate)
    pool = bounds.pool(np.arange(2, 10))
    rows = BATCH + 5
    masks = rng.random((rows, 8)) < 0.6
    masks[:, 0] = True
    base = np.array(
        [
            bounds.empty_base()
            + bounds.ab_t[rng.choice(2, int(rng.integers(0, 3)), replace=False)].sum(axis=0)
            for _ in range(rows)
        ]
    )
    sizes = np.array([int(rng.integers(1, mk.sum() + 1)) for mk in masks])
    together = bounds.evaluate(pool, base, masks, sizes)
    for r in range(rows):
        alone = bounds.evaluate(pool, base[r : r + 1], masks[r : r + 1], sizes[r : r + 1])
        assert alone.b1[0] == pytest.approx(together.b1[r], abs=1e-12)
        assert alone.b2[0] == pytest.approx(together.b2[r], abs=1e-12)
        np.testing.assert_allclose(alone.forced[0], together.forced[r], atol=1e-12)


def test_sizes_above_exact_sizes_share_the_tail_column() -> None:
    """More candidates fit than EXACT_SIZES: the shared last column still bounds every size."""
    rng = np.random.default_rng(11)
    problem = random_problem(rng, EXACT_SIZES + 5, 25)
    bounds = RatioBounds(problem.q, problem.gate)
    cands = list(range(1, problem.size))
    base = bounds.empty_base() + bounds.ab_t[0]
    nb = bounds.evaluate(
        bounds.pool(np.array(cands)), base[None], np.ones((1, len(cands)), bool), np.array([len(cands)])
    )
    for extra in completions([0], cands, len(cands)):
        if len(extra) >= EXACT_SIZES:
            loss = subset_loss(problem, [0, *extra]) + 1e-12
            assert nb.b2[0] <= loss
            assert all(nb.forced[0, u - 1] <= loss for u in extra)


@pytest.mark.parametrize("seed", range(10))
def test_capacity_counts_at_least_the_largest_feasible_completion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    energy = rng.uniform(1, 10, n).round(1)
    latency = rng.uniform(1, 10, n).round(1)
    device = rng.integers(0, 3, n)
    capacity = Capacity(energy, latency, device)
    for _ in range(5):
        mask = rng.random(n) < 0.7
        dev_time = rng.uniform(0, 5, 3)
        room = float(rng.choice([np.inf, rng.uniform(0, 25)]))
        cap = float(rng.choice([np.inf, rng.uniform(5, 15)]))
        count = int(capacity.count(mask[None], dev_time[None], np.array([room]), cap)[0])
        largest = 0
        for r in range(1, mask.sum() + 1):
            for combo in itertools.combinations(np.flatnonzero(mask), r):
                times = dev_time.copy()
                np.add.at(times, device[list(combo)], latency[list(combo)])
                if energy[list(combo)].sum() <= room and (times[device[list(combo)]] <= cap).all():
                    largest = r
        assert count >= largest
