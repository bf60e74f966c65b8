from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.remoe.lpt import bin_loads, lpt_partition, lpt_ratio_bound, makespan, optimal_partition


def brute_force_makespan(loads, bins):
    return min(makespan(loads, np.array(a), bins) for a in itertools.product(range(bins), repeat=len(loads)))


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_reference_matches_plain_enumeration(seed):
    rng = np.random.default_rng(seed)
    loads = rng.random(int(rng.integers(1, 7)))
    bins = int(rng.integers(1, 4))
    best, assignment = optimal_partition(loads, bins)
    assert best == pytest.approx(brute_force_makespan(loads, bins))
    assert makespan(loads, assignment, bins) == pytest.approx(best)


def test_lpt_within_grahams_bound_of_the_optimum():
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(300):
        bins = int(rng.integers(2, 5))
        loads = (
            rng.random(int(rng.integers(1, 10)))
            if rng.random() < 0.5
            else rng.integers(1, 9, 9).astype(float)
        )
        assignment = lpt_partition(loads, bins)
        assert np.all((assignment >= 0) & (assignment < bins))
        assert bin_loads(loads, assignment, bins).sum() == pytest.approx(loads.sum())
        opt, _ = optimal_partition(loads, bins)
        ratios.append(makespan(loads, assignment, bins) / opt)
        assert ratios[-1] <= lpt_ratio_bound(bins) + 1e-12
    assert min(ratios) == pytest.approx(1.0) and max(ratios) > 1.0  # LPT is sometimes not optimal


@pytest.mark.parametrize("bins", [2, 3, 4])
def test_grahams_tight_instance_reaches_the_bound(bins):
    # Two jobs of each size 2z-1 .. z+1 and three of size z: LPT = 4z - 1, optimum = 3z.
    loads = np.array([v for v in range(2 * bins - 1, bins, -1) for _ in range(2)] + [bins] * 3, dtype=float)
    opt, _ = optimal_partition(loads, bins)
    assert opt == 3 * bins
    assert makespan(loads, lpt_partition(loads, bins), bins) / opt == pytest.approx(lpt_ratio_bound(bins))


def test_lpt_is_optimal_where_known():
    rng = np.random.default_rng(1)
    for _ in range(100):
        loads = rng.random(int(rng.integers(1, 8)))
        # one bin, at most one job per bin, equal loads
        assert makespan(loads, lpt_partition(loads, 1), 1) == pytest.approx(loads.sum())
        bins = loads.size + int(rng.integers(0, 3))
        assert makespan(loads, lpt_partition(loads, bins), bins) == pytest.approx(loads.max())
        equal = np.full(loads.size + 3, 0.5)
        b = int(rng.integers(1, 5))
        assert makespan(equal, lpt_partition(equal, b), b) == pytest.approx(optimal_partition(equal, b)[0])


def test_capacity_caps_jobs_per_bin_and_rejects_overflow():
    loads = np.array([10.0, 1, 1, 1, 1, 1])
    assignment = lpt_partition(loads, 2, capacity=3)
    assert np.bincount(assignment, minlength=2).max() == 3
    assert np.bincount(lpt_partition(loads, 2), minlength=2).max() == 5  # uncapped LPT piles the small jobs
    with pytest.raises(MoeServeError, match="do not fit"):
        lpt_partition(loads, 2, capacity=2)
    with pytest.raises(MoeServeError):
        lpt_partition(loads, 0)


def test_compiled_lpt_is_the_heap_rule_exactly():
    from moeserve.remoe.lpt import _compiled, lpt_heap

    kernel = _compiled()
    if kernel is None:
        pytest.skip("numba not installed: only the heap runs")
    rng = np.random.default_rng(7)
    for _ in range(300):
        m, bins = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        loads = rng.choice([0.0, 1.0, 2.0, 3.5], m) if rng.random() < 0.5 else rng.gamma(0.5, 3.0, m)  # ties
        cap = -1 if rng.random() < 0.5 else max(int(np.ceil(m / bins)), int(rng.integers(1, m + 1)))
        order = np.argsort(-loads, kind="stable")
        np.testing.assert_array_equal(kernel(loads, order, bins, cap), lpt_heap(loads, order, bins, cap))
