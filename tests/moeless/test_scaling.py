import itertools

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.scaling import (
    detect_stragglers,
    max_copy_load,
    replica_budget_for_cost,
    replicas_under_budget,
    replicas_under_target,
)


def compositions(total: int, parts: int, cap: int):
    """All copy vectors with every entry in [1, cap] summing to at most `total` (spending is optional)."""
    for c in itertools.product(range(1, cap + 1), repeat=parts):
        if sum(c) <= total:
            yield np.array(c)


@pytest.mark.parametrize("seed", range(40))
def test_greedy_budget_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(2, 5))
    extra = int(rng.integers(0, 5))
    loads = rng.integers(0, 30, num_experts).astype(float)
    if seed % 4 == 0:
        loads[1] = loads[0]  # ties
    cap = int(rng.integers(1, 5)) if seed % 3 == 0 else extra + 1
    copies = replicas_under_budget(loads, num_experts + extra, max_per_expert=cap)
    best = min(max_copy_load(loads, c) for c in compositions(num_experts + extra, num_experts, cap))
    assert copies.sum() <= num_experts + extra
    assert copies.min() >= 1 and copies.max() <= cap
    assert max_copy_load(loads, copies) == pytest.approx(best)


def test_greedy_spends_the_whole_budget_when_uncapped_and_batches_layers():
    rng = np.random.default_rng(7)
    loads = rng.gamma(0.5, 100, size=(6, 12))
    copies = replicas_under_budget(loads, 20)
    assert copies.shape == (6, 12)
    assert (copies.sum(1) == 20).all()
    for layer in range(6):
        np.testing.assert_array_equal(copies[layer], replicas_under_budget(loads[layer], 20))


@pytest.mark.parametrize("seed", range(20))
def test_fewest_copies_under_target_is_minimal(seed):
    rng = np.random.default_rng(100 + seed)
    loads = rng.integers(0, 40, 4).astype(float)
    target = float(rng.integers(5, 20))
    copies = replicas_under_target(loads, target)
    assert (loads / copies <= target + 1e-9).all()
    feasible = [c for c in compositions(4 * 9, 4, 9) if (loads / c <= target + 1e-9).all()]
    assert copies.sum() == min(c.sum() for c in feasible)


def test_detect_stragglers_against_the_layer_mean():
    loads = np.array([[10.0, 1, 1, 0], [3, 3, 3, 3]])  # means 3 and 3
    np.testing.assert_array_equal(detect_stragglers(loads, 1.5),
                                  [[True, False, False, False], [False, False, False, False]])
    with pytest.raises(MoeServeError):
        detect_stragglers(loads, 0.0)


def test_budget_errors_and_cost_conversion():
    with pytest.raises(MoeServeError):
        replicas_under_budget(np.ones(4), 3)
    with pytest.raises(MoeServeError):
        replicas_under_target(np.ones(4), 0.0)
    # 1 GB experts at 2e-5 $/GB-s: 1e-3 $/s keeps 50 copies alive.
    assert replica_budget_for_cost(1e-3, 1.0, 2e-5) == 50
