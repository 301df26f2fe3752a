"""The exact MoE² solver against brute force, its bounds, and its edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moesaic.budget import Budget
from moesaic.coordinator.search import Search
from moesaic.coordinator.selection import (
    SelectionProblem,
    brute_force,
    solve,
    subset_cost,
    subset_loss,
)


def random_problem(rng: np.random.Generator, n: int, m: int = 40, classes: int = 4) -> SelectionProblem:
    """Experts with complementary skills on clusters of samples, heterogeneous costs and devices."""
    devices = [f"d{rng.integers(0, max(1, n // 2))}" for _ in range(n)]
    clusters = rng.integers(0, 3, m)
    skill = rng.uniform(0.05, 0.95, (n, 3))
    q = np.clip(skill[:, clusters].T + rng.normal(0, 0.1, (m, n)), 0, 1)
    if rng.random() < 0.2:
        q[rng.random((m, n)) < 0.1] = 0.0  # some experts miss some labels entirely
    gate = rng.dirichlet(np.ones(n) * rng.choice([0.3, 1.0, 5.0]), m)
    if rng.random() < 0.2:
        gate[:, rng.integers(0, n)] = 0.0  # an expert the gate never trusts
    return SelectionProblem.from_arrays(
        [f"e{i}" for i in range(n)],
        devices,
        rng.uniform(1, 40, n).round(1),
        rng.uniform(1, 100, n).round(1),
        q=q,
        gate=gate,
        overhead_ms=float(rng.uniform(0, 5)),
    )


def random_budget(rng: np.random.Generator) -> Budget:
    lat = float(rng.choice([0.0, rng.uniform(5, 80)]))
    energy = float(rng.choice([0.0, rng.uniform(5, 250)]))
    return Budget(latency_ms=lat, energy_mj=energy)


@pytest.mark.parametrize("seed", range(40))
def test_solver_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(8):
        problem = random_problem(rng, int(rng.integers(1, 10)))
        budget = random_budget(rng)
        exact = solve(problem, budget)
        reference = brute_force(problem, budget)
        assert exact.feasible == reference.feasible
        assert exact.loss == pytest.approx(reference.loss, abs=1e-9)
        if exact.feasible:
            lat, energy = subset_cost(problem, exact.indices)
            assert budget.latency_ms == 0 or lat <= budget.latency_ms * (1 + 1e-9)
            assert budget.energy_mj == 0 or energy <= budget.energy_mj * (1 + 1e-9)
            assert exact.loss == pytest.approx(subset_loss(problem, exact.indices))


def test_solver_equals_brute_force_at_n14() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(3):
        problem = random_problem(rng, 14, m=60)
        budget = Budget(latency_ms=45.0, energy_mj=150.0)
        assert solve(problem, budget).loss == pytest.approx(brute_force(problem, budget).loss, abs=1e-9)


def test_mixing_beats_every_single_expert_when_strengths_complement() -> None:
    # Expert a knows samples 0-1, b knows 2-3: neither alone is good, together they are.
    q = [[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
    gate = [[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
    p = SelectionProblem.from_arrays(["a", "b"], ["gpu", "cpu"], [5, 5], [10, 10], q=q, gate=gate)
    both = solve(p, Budget(energy_mj=20))
    assert both.ids == ("a", "b") and both.feasible
    alone = solve(p, Budget(energy_mj=15))
    assert len(alone.ids) == 1 and alone.loss > both.loss


def test_latency_queues_per_device_and_overlaps_across_devices() -> None:
    q = np.full((3, 3), 0.5)
    p = SelectionProblem.from_arrays(
        ["a", "b", "c"],
        ["gpu", "gpu", "cpu"],
        [10, 10, 10],
        [1, 1, 1],
        q=q,
        gate=np.ones((3, 3)),
        overhead_ms=2,
    )
    assert subset_cost(p, [0, 2]) == (12.0, 2.0)  # different devices overlap
    assert subset_cost(p, [0, 1]) == (22.0, 2.0)  # one device queues
    assert subset_cost(p, [0, 1, 2]) == (22.0, 3.0)


def test_nothing_fits_returns_cheapest_expert_infeasible() -> None:
    p = SelectionProblem.from_arrays(
        ["big", "small"], ["gpu", "cpu"], [10, 30], [50, 5], q=[[0.9, 0.4]], gate=[[0.5, 0.5]]
    )
    result = solve(p, Budget(energy_mj=1))
    assert result.ids == ("small",) and not result.feasible
    assert brute_force(p, Budget(energy_mj=1)).ids == ("small",)


def test_single_expert_and_unbounded_budget() -> None:
    p = SelectionProblem.from_arrays(["only"], ["cpu"], [1], [1], q=[[0.5]], gate=[[1.0]])
    r = solve(p, Budget())
    assert r.ids == ("only",) and r.feasible and r.loss == pytest.approx(-math.log(0.5))


def test_overhead_alone_can_make_every_set_infeasible() -> None:
    p = SelectionProblem.from_arrays(["a"], ["cpu"], [1], [1], q=[[0.5]], gate=[[1.0]], overhead_ms=10)
    assert not solve(p, Budget(latency_ms=5)).feasible


def test_identical_experts_tie_on_value() -> None:
    q = np.tile([[0.7], [0.2]], (1, 4))
    p = SelectionProblem.from_arrays(list("abcd"), list("wxyz"), [1] * 4, [1] * 4, q=q, gate=np.ones((2, 4)))
    assert solve(p, Budget()).loss == pytest.approx(brute_force(p, Budget()).loss)


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_a_valid_lower_bound(seed: int) -> None:
    """For random partial sets I and candidates R, max(B1, B2) never exceeds the loss of any
    superset I ∪ T, T ⊆ R (T empty included)."""
    rng = np.random.default_rng(100 + seed)
    problem = random_problem(rng, 8)
    search = Search(problem, Budget())
    for _ in range(20):
        perm = rng.permutation(problem.size)
        i_size = int(rng.integers(0, problem.size))
        chosen, cands = [int(c) for c in perm[:i_size]], [int(c) for c in perm[i_size:]]
        lb = search.bound(chosen, cands)
        for r in range(0 if chosen else 1, len(cands) + 1):
            for extra in itertools.combinations(cands, r):
                assert lb <= subset_loss(problem, [*chosen, *extra]) + 1e-12


def test_bound_equals_the_best_superset_for_a_single_sample() -> None:
    """With one validation sample the per-sample maximum is attained: the bound is exact."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        problem = random_problem(rng, 7, m=1)
        search = Search(problem, Budget())
        lb = search.bound([0], list(range(1, 7)))
        best = min(
            subset_loss(problem, [0, *extra])
            for r in range(7)
            for extra in itertools.combinations(range(1, 7), r)
        )
        assert lb == pytest.approx(best, abs=1e-12)


def test_problem_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"q: expected shape"):
        SelectionProblem.from_arrays(["a"], ["cpu"], [1], [1], q=[[0.5, 0.5]], gate=[[1.0]])
    with pytest.raises(ValueError, match=r"experts\[a\].latency_ms"):
        SelectionProblem.from_arrays(["a"], ["cpu"], [-1], [1], q=[[0.5]], gate=[[1.0]])
    with pytest.raises(ValueError, match="duplicate"):
        SelectionProblem.from_arrays(["a", "a"], ["c", "c"], [1, 1], [1, 1], q=[[0.5, 0.5]], gate=[[1, 1]])


def test_pruning_explores_far_fewer_nodes_than_subsets() -> None:
    rng = np.random.default_rng(7)
    problem = random_problem(rng, 16, m=80)
    result = solve(problem, Budget(latency_ms=40, energy_mj=120))
    assert result.nodes_explored < 2**16 // 4
