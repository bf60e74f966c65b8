from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moeserve.remoe.bounds import (
    EmpiricalRoutingBound,
    PredictedRoutingBound,
    UniformRoutingBound,
    bernstein_excess,
    conformal_rank,
    conformal_upper,
    coverage,
    paper_bound,
    predicted_set_bound,
    predicted_topm_bound,
    topm_loads,
    uniform_set_bound,
    uniform_topm_bound,
)
from moeserve.remoe.synthetic import simulate_topk_routing, synthetic_trace

K, TOP_K, N, DELTA = 16, 4, 120, 0.1


@pytest.fixture(scope="module")
def uniform_counts():
    rng = np.random.default_rng(0)
    return simulate_topk_routing(rng, np.full((1500, K), 1.0 / K), N, TOP_K)  # [trials, K]


@pytest.fixture(scope="module")
def skewed():
    rng = np.random.default_rng(1)
    probs = 1.0 / np.arange(1, K + 1) ** 1.2
    probs = probs[rng.permutation(K)] / probs.sum()
    inclusion = simulate_topk_routing(rng, probs[None, :], 400_000, TOP_K)[0] / 400_000  # P(e in top-k)
    counts = simulate_topk_routing(rng, np.tile(probs, (1500, 1)), N, TOP_K)
    return inclusion, counts


def test_bernstein_excess_inverts_the_tail():
    for n, var, m, delta in [(100, 0.2, 1.0, 0.05), (1000, 1.5, 4.0, 1e-4), (10, 0.0, 2.0, 0.1)]:
        t = float(bernstein_excess(n, var, m, math.log(1 / delta)))
        assert math.exp(-(t**2) / (2 * (n * var + m * t / 3))) == pytest.approx(delta)


def test_each_simulated_token_routes_to_k_distinct_experts(uniform_counts):
    assert np.all(uniform_counts.sum(axis=1) == N * TOP_K)
    assert uniform_counts.max() <= N


def test_topm_loads_equal_max_over_all_sets():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 30, size=(5, 7))
    for m in range(8):
        expected = [
            max((sum(row[list(s)]) for s in itertools.combinations(range(7), m)), default=0) for row in counts
        ]
        assert np.array_equal(topm_loads(counts, m), expected)


@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_uniform_bounds_cover_simulated_routing(uniform_counts, m):
    fixed = uniform_counts[:, :m].sum(axis=1)
    set_bound = float(uniform_set_bound(N, K, TOP_K, m, DELTA))
    assert coverage(fixed, set_bound) >= 1 - DELTA
    top = topm_loads(uniform_counts, m)
    any_bound = float(uniform_topm_bound(N, K, TOP_K, m, DELTA))
    assert coverage(top, any_bound) >= 1 - DELTA
    assert any_bound >= set_bound  # "any m experts" is the harder event
    if m < K:
        assert any_bound < N * min(TOP_K, m)  # not the trivial bound
    else:
        assert any_bound == N * TOP_K == top.max()


def test_papers_bound_fails_under_top_k_routing(uniform_counts):
    # n m / K + sqrt(3n)/2 ignores k: under top-4 routing a set of m experts averages n k m / K tokens.
    for m in (1, 4):
        fixed = uniform_counts[:, :m].sum(axis=1)
        assert coverage(fixed, paper_bound(N, K, m)) < 0.05
        assert coverage(fixed, uniform_set_bound(N, K, TOP_K, m, DELTA)) >= 1 - DELTA
    # Hoeffding with t = sqrt(3n)/2 gives exp(-2 t^2 / n) = exp(-1.5): 78%, not 95%.
    assert 1 - math.exp(-2 * (math.sqrt(3 * N) / 2) ** 2 / N) == pytest.approx(1 - math.exp(-1.5))


def test_predicted_bounds_cover_skewed_routing(skewed):
    inclusion, counts = skewed
    assert inclusion.sum() == pytest.approx(TOP_K, abs=1e-6)
    popular = np.argsort(-inclusion)[:3]
    bound = predicted_set_bound(N, inclusion, popular, TOP_K, DELTA)
    assert coverage(counts[:, popular].sum(axis=1), bound) >= 1 - DELTA
    for m in (1, 2, 6):
        top = topm_loads(counts, m)
        b = predicted_topm_bound(N, inclusion, TOP_K, m, DELTA)
        assert coverage(top, b) >= 1 - DELTA
        # The uniform model is wrong for skewed routing: its any-m bound under-covers the busiest expert.
    assert coverage(topm_loads(counts, 1), uniform_topm_bound(N, K, TOP_K, 1, DELTA)) < 0.5


def test_conformal_rank_and_marginal_coverage():
    assert conformal_rank(99, 0.1) == 90
    assert conformal_rank(9, 0.05) is None
    scores = np.arange(99.0)[::-1]
    assert conformal_upper(scores, 0.1) == 89.0
    assert np.isinf(conformal_upper(np.arange(9.0), 0.05))
    rng = np.random.default_rng(3)
    draws = rng.lognormal(size=(3000, 40))
    hits = draws[:, -1] <= conformal_upper(draws[:, :-1], 0.2, axis=1)
    assert hits.mean() >= 0.8 - 3 * math.sqrt(0.16 / 3000)


def test_empirical_bound_covers_held_out_prompts():
    trace = synthetic_trace(1200, 2, 12, seed=4)
    history, held_out = trace.prefill[:800], trace.prefill[800:]
    bound = EmpiricalRoutingBound(history, top_k=1)
    members = np.array([0, 3, 5])
    share_bound = bound.set_upper(1, members, tokens=1, delta=0.1)
    assert coverage(held_out[:, 1, members].sum(axis=1), share_bound) >= 0.9 - 0.05
    any3 = bound.topm_upper(3, tokens=1, delta=0.1)
    assert coverage(topm_loads(held_out, 3), any3[None, :]) >= 0.9 - 0.05


@pytest.mark.parametrize("kind", ["uniform", "predicted", "empirical"])
def test_set_nested_partition_and_expert_bounds_agree(kind):
    trace = synthetic_trace(300, 3, 10, seed=5)
    if kind == "uniform":
        bound = UniformRoutingBound(3, 10, 3)
    elif kind == "predicted":
        bound = PredictedRoutingBound.from_shares(trace.prefill.mean(axis=0), 3)
    else:
        bound = EmpiricalRoutingBound(trace.prefill, 3)
    rng = np.random.default_rng(6)
    order = np.stack([rng.permutation(10) for _ in range(3)])
    nested = bound.nested_upper(order, 50, 0.05)
    experts = bound.expert_upper(50, 0.05)
    for layer in range(3):
        for j in range(11):
            assert nested[layer, j] == pytest.approx(bound.set_upper(layer, order[layer, :j], 50, 0.05))
        for e in range(10):
            assert experts[layer, e] == pytest.approx(bound.set_upper(layer, np.array([e]), 50, 0.05))
        members = np.array([1, 2, 4, 7, 9])
        part = np.array([0, 1, 0, 2, 1])
        blocks = bound.partition_upper(layer, members, part, 3, 50, 0.05)
        for b in range(3):
            assert blocks[b] == pytest.approx(bound.set_upper(layer, members[part == b], 50, 0.05))
        if kind == "empirical":  # a quantile of a growing sum grows
            assert np.all(np.diff(nested[layer]) >= -1e-12)
