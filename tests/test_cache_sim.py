"""Expert-cache simulator against a naive pure-Python reference, plus its properties and reuse metrics."""

from __future__ import annotations

import numpy as np
import pytest

from moeserve.cache import (
    CacheStats,
    consecutive_steps,
    hit_rate_curve,
    numba_available,
    overlap_ratio,
    simulate_cache,
    step_expert_sets,
)
from moeserve.errors import MoeServeError

ENGINES = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="no numba"))]
POLICIES = ["lru", "lfu", "belady"]


def reference_simulate(sets, capacity, policy, request_starts, warm):
    """Obviously-correct simulator: Python sets, eviction by min over an explicit key.

    -> [layers, 3] (accesses, hits, compulsory misses)
    """
    steps, layers, _ = sets.shape
    starts = [int(s) for s in request_starts]
    ends = starts[1:] + [steps]
    request_end = {}
    for start, end in zip(starts, ends, strict=True):
        for t in range(start, end):
            request_end[t] = end
    out = np.zeros((layers, 3), dtype=np.int64)
    for layer in range(layers):
        needed = [{int(e) for e in sets[t, layer] if e >= 0} for t in range(steps)]
        cache, seen, last_use, count = set(), set(), {}, {}
        for t in range(steps):
            if t in starts and (t == 0 or not warm):
                cache, seen, last_use, count = set(), set(), {}, {}
            need = needed[t]
            out[layer] += (len(need), len(need & cache), len(need - seen))
            seen |= need
            for e in need:
                count[e] = count.get(e, 0) + 1
                last_use[e] = t
            cache |= need
            horizon = request_end[t] if not warm else steps
            while len(cache) > capacity:
                victim = min(
                    cache - need,
                    key=lambda e, t=t, horizon=horizon: eviction_key(
                        e, t, horizon, needed, last_use, count, policy
                    ),
                )
                cache.remove(victim)
    return out


def eviction_key(e, t, horizon, needed, last_use, count, policy):
    """Smallest key is evicted first; see docs/cache-simulation.md."""
    if policy == "lru":
        return (last_use[e], e)
    if policy == "lfu":
        return (count[e], last_use[e], e)
    next_use = next((u for u in range(t + 1, horizon) if e in needed[u]), float("inf"))
    return (-next_use, e)


def random_routing(rng, tokens, layers, experts, top_k, reuse=0.6):
    """[tokens, layers, top_k] distinct ids with skewed popularity and consecutive-token reuse."""
    popularity = rng.dirichlet(np.full(experts, 0.7), size=layers)
    routing = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        for t in range(tokens):
            if t > 0 and rng.random() < reuse:
                row = routing[t - 1, layer].copy()
                others = np.setdiff1d(np.arange(experts), row)
                row[rng.integers(top_k)] = rng.choice(others)
            else:
                row = rng.choice(experts, size=top_k, replace=False, p=popularity[layer])
            routing[t, layer] = rng.permutation(row)
    return routing


def random_case(seed):
    """A random small trace: (sets, num_experts, step request starts, capacities) covering batch sizes 1-3."""
    rng = np.random.default_rng(seed)
    experts = int(rng.choice([5, 8, 12]))
    top_k = int(rng.integers(1, 4))
    tokens = int(rng.integers(30, 70))
    routing = random_routing(rng, tokens, 3, experts, top_k)
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=int(rng.integers(0, 4)), replace=False))
    request_starts = np.r_[0, cuts].astype(np.int64)
    batch = int(rng.integers(1, 4))
    if batch == 1:
        sets, step_starts = routing, request_starts
    else:
        step_of_token, step_starts = consecutive_steps(tokens, batch, request_starts)
        sets = step_expert_sets(routing, step_of_token, experts)
    widest = int((sets >= 0).sum(axis=2).max())
    capacities = sorted({widest, min(experts, widest + 1), min(experts, widest + 3), experts})
    return sets, experts, step_starts, capacities


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(10))
def test_matches_reference(seed, policy, engine):
    sets, experts, starts, capacities = random_case(seed)
    for warm in (False, True):
        for capacity in capacities:
            stats = simulate_cache(
                sets, experts, capacity, policy, request_starts=starts, warm=warm, engine=engine
            )
            expected = reference_simulate(sets, capacity, policy, starts, warm)
            np.testing.assert_array_equal(stats.accesses, expected[:, 0])
            np.testing.assert_array_equal(stats.hits, expected[:, 1], err_msg=f"{warm=} {capacity=}")
            np.testing.assert_array_equal(stats.compulsory_misses, expected[:, 2])


@pytest.mark.parametrize("seed", range(10, 30))
def test_belady_never_below_lru_or_lfu(seed):
    sets, experts, starts, capacities = random_case(seed)
    for warm in (False, True):
        for capacity in capacities:
            hits = {
                policy: simulate_cache(
                    sets, experts, capacity, policy, request_starts=starts, warm=warm, engine="numpy"
                ).hits
                for policy in POLICIES
            }
            assert np.all(hits["belady"] >= hits["lru"]) and np.all(hits["belady"] >= hits["lfu"])


@pytest.mark.parametrize("warm", [False, True])
def test_compulsory_misses_are_distinct_first_uses(warm):
    rng = np.random.default_rng(7)
    routing = random_routing(rng, 80, 4, 10, 2)
    starts = np.array([0, 25, 26, 60])
    stats = simulate_cache(routing, 10, 3, "lru", request_starts=starts, warm=warm, engine="numpy")
    request = np.searchsorted(starts, np.arange(80), side="right") - 1
    scope = np.zeros_like(request) if warm else request
    for layer in range(4):
        pairs = np.stack([np.repeat(scope, 2), routing[:, layer].ravel()], axis=1)
        assert stats.compulsory_misses[layer] == len(np.unique(pairs, axis=0))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("policy", POLICIES)
def test_full_capacity_misses_only_first_uses(policy, engine):
    rng = np.random.default_rng(3)
    routing = random_routing(rng, 120, 3, 16, 4)
    starts = np.array([0, 40, 90])
    stats = simulate_cache(routing, 16, 16, policy, request_starts=starts, engine=engine)
    np.testing.assert_allclose(stats.hit_rate, 1 - stats.compulsory_misses / stats.accesses)
    assert np.all(stats.accesses == 120 * 4)


def test_hit_rate_curve_matches_runs_and_grows_for_stack_policies():
    rng = np.random.default_rng(11)
    routing = random_routing(rng, 150, 3, 16, 2, reuse=0.4)
    capacities = [2, 3, 4, 6, 8, 12, 16]
    for policy in ("lru", "belady"):  # stack algorithms: more capacity never hurts
        curve = hit_rate_curve(routing, capacities, policy, 16, engine="numpy")
        assert curve.shape == (len(capacities), 3)
        assert np.all(np.diff(curve, axis=0) >= 0)
        np.testing.assert_array_equal(
            curve[2], simulate_cache(routing, 16, 4, policy, engine="numpy").hit_rate
        )


@pytest.mark.parametrize("engine", ENGINES)
def test_lru_hand_trace(engine):
    # one layer, top-1, capacity 2: a b a c b -> hits: a(2nd) only; c evicts b (LRU), b misses again
    routing = np.array([0, 1, 0, 2, 1])[:, None, None]
    stats = simulate_cache(routing, 3, 2, "lru", engine=engine)
    assert stats.hits.tolist() == [1] and stats.compulsory_misses.tolist() == [3]
    belady = simulate_cache(routing, 3, 2, "belady", engine=engine)
    assert belady.hits.tolist() == [2]  # c evicts a (never used again), b hits


@pytest.mark.parametrize("engine", ENGINES)
def test_same_step_experts_are_never_evicted_and_ties_evict_lowest_id(engine):
    # step 0 uses {0, 1}; step 1 uses {2}: both 0 and 1 were used last at step 0, LRU evicts 0 (lower id)
    sets = np.array([[[0, 1]], [[2, -1]], [[1, -1]], [[0, -1]]])
    stats = simulate_cache(sets, 3, 2, "lru", engine=engine)
    assert stats.hits.tolist() == [1]  # 1 hits at step 2; 0 was evicted at step 1, so step 3 misses


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicate_ids_in_a_row_count_once(engine):
    sets = np.array([[[1, 1]], [[1, -1]]])
    stats = simulate_cache(sets, 2, 1, "lfu", engine=engine)
    assert stats.accesses.tolist() == [2] and stats.hits.tolist() == [1]


def test_bytes_and_stall():
    routing = np.array([0, 1, 2, 0])[:, None, None]
    stats = simulate_cache(
        routing,
        3,
        2,
        "lru",
        expert_bytes=1000,
        bandwidth_bytes_per_s=1e6,
        fetch_latency_s=1e-3,
        engine="numpy",
    )
    assert stats.fetches.tolist() == [4]
    assert stats.total_bytes_moved == 4000
    assert stats.total_stall_s == pytest.approx(4 * (1e-3 + 1e-3))
    assert isinstance(stats, CacheStats) and stats.as_dict()["per_layer"]["fetches"] == [4]
    assert simulate_cache(routing, 3, 2, "lru", engine="numpy").bytes_moved is None


def test_step_expert_sets_unions_and_pads():
    routing = np.array(
        [
            [[0, 1], [2, 3]],
            [[1, 4], [3, 2]],
            [[2, 0], [0, 1]],
        ]
    )
    sets = step_expert_sets(routing, np.array([5, 5, 9]), 5)
    assert sets.shape == (2, 2, 3)
    assert sets[0, 0].tolist() == [0, 1, 4]
    assert sets[0, 1].tolist() == [2, 3, -1]
    assert sets[1, 0].tolist() == [0, 2, -1]
    assert sets[1, 1].tolist() == [0, 1, -1]


def test_consecutive_steps_respect_requests():
    step_of_token, step_starts = consecutive_steps(7, 2, np.array([0, 3]))
    assert step_of_token.tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert step_starts.tolist() == [0, 2]


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_ratio_hand_cases(engine):
    # layer 0: {0,1} -> {1,2} -> {1,2}: overlaps 1/2, 2/2; layer 1: {0,1} -> {2,3} -> {3,0}: 0, 1/2
    routing = np.array(
        [
            [[0, 1], [0, 1]],
            [[1, 2], [2, 3]],
            [[2, 1], [3, 0]],
        ]
    )
    np.testing.assert_allclose(overlap_ratio(routing, engine=engine), [0.75, 0.25])
    # a request boundary before token 2 drops that pair
    np.testing.assert_allclose(overlap_ratio(routing, np.array([0, 2]), engine=engine), [0.5, 0.0])


@pytest.mark.parametrize("engine", ENGINES)
def test_overlap_ratio_matches_set_intersections(engine):
    rng = np.random.default_rng(5)
    routing = random_routing(rng, 90, 3, 12, 3)
    starts = np.array([0, 30, 31, 70])
    expected = np.zeros(3)
    pairs = 0
    for t in range(1, 90):
        if t in starts:
            continue
        pairs += 1
        for layer in range(3):
            expected[layer] += len(set(routing[t, layer]) & set(routing[t - 1, layer])) / 3
    np.testing.assert_allclose(overlap_ratio(routing, starts, engine=engine), expected / pairs)
    np.testing.assert_allclose(overlap_ratio(np.tile(routing[:1], (20, 1, 1)), engine=engine), [1.0] * 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity": 1},  # a step needs 2 experts
        {"capacity": 2.5},
        {"policy": "fifo"},
        {"request_starts": np.array([1, 3])},
        {"request_starts": np.array([0, 3, 3])},
        {"num_experts": 2},  # ids reach 2
        {"bandwidth_bytes_per_s": 1e9},  # no expert_bytes
        {"engine": "gpu"},
    ],
)
def test_bad_input_raises(kwargs):
    routing = np.array([[[0, 1]], [[2, 1]], [[0, 2]], [[1, 0]]])
    args = {"num_experts": 3, "capacity": 2, "policy": "lru", "engine": "numpy"} | kwargs
    with pytest.raises(MoeServeError):
        simulate_cache(routing, **args)


def test_step_expert_sets_match_set_unions_on_random_groups():
    rng = np.random.default_rng(2)
    routing = random_routing(rng, 60, 2, 9, 3)
    step_of_token = np.cumsum(rng.random(60) < 0.4) * 3  # random group sizes, gapped labels
    sets = step_expert_sets(routing, step_of_token, 9)
    labels = np.unique(step_of_token)
    assert sets.shape[0] == len(labels)
    widest = 0
    for step, label in enumerate(labels):
        for layer in range(2):
            union = sorted(set(routing[step_of_token == label, layer].ravel().tolist()))
            widest = max(widest, len(union))
            assert sets[step, layer].tolist() == union + [-1] * (sets.shape[2] - len(union))
    assert sets.shape[2] == widest
