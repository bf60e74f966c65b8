import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.eplb import eplb_phy2log
from moeserve.moeless.export import replicas_from_phy2log
from moeserve.moeless.fleet import DeviceFleet, balancedness, device_loads, device_times, uniform_fleet
from moeserve.moeless.placement import new_copies, place_replicas
from moeserve.moeless.planner import plan_moeless
from moeserve.moeless.scaling import replicas_under_budget


def zipf_loads(rng, layers, experts, tokens, skew):
    p = np.arange(1, experts + 1) ** -skew
    return np.stack([rng.multinomial(tokens, rng.permutation(p / p.sum())) for _ in range(layers)]).astype(float)


@pytest.mark.parametrize("seed", range(8))
def test_never_worse_than_eplb_at_the_same_budget(seed):
    rng = np.random.default_rng(seed)
    num_experts = 64
    num_devices = [4, 8, 16][seed % 3]
    extra = num_devices * int(rng.integers(0, 3))
    loads = zipf_loads(rng, 6, num_experts, int(rng.integers(200, 5000)), rng.uniform(0.6, 1.4))
    headroom = seed % 2  # 0: same memory as EPLB, 1: one spare slot per device
    fleet = uniform_fleet(num_devices, (num_experts + extra) // num_devices + headroom)
    eplb = replicas_from_phy2log(eplb_phy2log(loads, num_experts + extra, num_devices), num_experts, num_devices)
    plan = plan_moeless(loads, fleet, extra)
    ours, theirs = balancedness(device_loads(plan.replicas, loads)), balancedness(device_loads(eplb, loads))
    assert (ours <= theirs + 1e-9).all()
    assert (plan.replicas.sum((1, 2)) <= num_experts + extra).all()


@pytest.mark.parametrize("seed", range(5))
def test_capacities_and_copies_are_respected(seed):
    rng = np.random.default_rng(50 + seed)
    capacity = rng.integers(3, 12, size=6)
    fleet = DeviceFleet(capacity_experts=capacity, fixed_s=rng.uniform(0, 1e-3, 6), per_token_s=rng.uniform(1e-4, 4e-4, 6))
    loads = rng.gamma(0.4, 100, size=(4, 24))
    copies = replicas_under_budget(loads, int(min(capacity.sum(), 24 + 10)))
    replicas = place_replicas(loads, copies, fleet)
    np.testing.assert_array_equal(replicas.sum(2), copies)
    assert (replicas.sum(1) <= capacity).all()
    too_many = np.full((4, 24), int(capacity.sum()) // 24 + 1)
    with pytest.raises(MoeServeError):
        place_replicas(loads, too_many, fleet)


def test_slow_device_gets_less_work():
    # Device 1 is twice as slow: the best split gives device 0 two experts, device 1 one (8 s each).
    fleet = DeviceFleet(capacity_experts=np.array([3, 3]), fixed_s=np.zeros(2), per_token_s=np.array([1.0, 2.0]))
    loads = np.array([[4.0, 4.0, 4.0]])
    replicas = place_replicas(loads, np.ones((1, 3), dtype=int), fleet)
    np.testing.assert_allclose(device_times(replicas, loads, fleet), [[8.0, 8.0]])


def test_fixed_cost_per_invocation_counts():
    # With 1 s per invocation and 0 per token, time is the number of busy copies: 2 and 2.
    fleet = uniform_fleet(2, 4, fixed_s=1.0, per_token_s=0.0)
    loads = np.array([[5.0, 1.0, 1.0, 1.0, 0.0]])
    replicas = place_replicas(loads, np.ones((1, 5), dtype=int), fleet)
    np.testing.assert_allclose(np.sort(device_times(replicas, loads, fleet)[0]), [2.0, 2.0])


def test_churn_penalty_reduces_new_copies():
    rng = np.random.default_rng(11)
    num_experts, num_devices, extra = 32, 8, 8
    fleet = uniform_fleet(num_devices, (num_experts + extra) // num_devices + 2, per_token_s=1e-3)
    before = zipf_loads(rng, 8, num_experts, 4000, 1.0)
    after = np.maximum(before * rng.lognormal(0, 0.3, size=before.shape), 0)
    previous = plan_moeless(before, fleet, extra).replicas
    free = plan_moeless(after, fleet, extra, previous=previous, churn_penalty_s=0.0)
    sticky = plan_moeless(after, fleet, extra, previous=previous, churn_penalty_s=0.05)
    moved_free, moved_sticky = new_copies(free.replicas, previous), new_copies(sticky.replicas, previous)
    assert moved_sticky.sum() < moved_free.sum()
    assert (moved_sticky <= moved_free).sum() >= 6
    # Same loads and a large penalty: nothing moves.
    again = plan_moeless(before, fleet, extra, previous=previous, churn_penalty_s=10.0)
    assert new_copies(again.replicas, previous).sum() == 0


def test_two_copies_may_share_a_device():
    # One huge expert and many light ones on 2 devices with 3 copies of it: the balanced answer puts
    # two of its copies on one device (2/3 vs 1/3 + the light ones).
    fleet = uniform_fleet(2, 8)
    loads = np.array([[90.0] + [5.0] * 6])
    plan = plan_moeless(loads, fleet, extra_replicas=2)
    np.testing.assert_array_equal(plan.copies[0, 0], 3)
    np.testing.assert_allclose(np.sort(device_loads(plan.replicas, loads)[0]), [60.0, 60.0])


def test_straggler_only_mode_spends_less():
    rng = np.random.default_rng(5)
    loads = zipf_loads(rng, 3, 32, 3000, 1.2)
    fleet = uniform_fleet(8, 12)
    full = plan_moeless(loads, fleet, 40)
    lean = plan_moeless(loads, fleet, 40, scale_stragglers_only=True, straggler_threshold=2.0)
    assert (lean.copies.sum(1) <= full.copies.sum(1)).all()
    assert (loads / lean.copies <= 2.0 * loads.mean(1, keepdims=True) + 1e-9).all()


@pytest.mark.parametrize("seed", range(4))
def test_equal_share_seed_is_eplbs_packing(seed):
    # Without local search the plan is the better of its seeds, one of which is EPLB's packing of
    # the same copies, so it can already not lose to EPLB on any layer.
    rng = np.random.default_rng(200 + seed)
    num_experts, num_devices, extra = 48, 8, 16
    loads = zipf_loads(rng, 10, num_experts, 3000, 1.0)
    copies = replicas_under_budget(loads, num_experts + extra)
    fleet = uniform_fleet(num_devices, (num_experts + extra) // num_devices)
    seeds_only = place_replicas(loads, copies, fleet, max_steps=0)
    eplb = replicas_from_phy2log(eplb_phy2log(loads, num_experts + extra, num_devices), num_experts, num_devices)
    np.testing.assert_array_equal(eplb.sum(2), copies)
    ours, theirs = device_loads(seeds_only, loads).max(1), device_loads(eplb, loads).max(1)
    assert (ours <= theirs + 1e-9).all()


def test_replanning_with_churn_respects_capacities_and_copies():
    rng = np.random.default_rng(9)
    capacity = np.array([4, 6, 6, 9, 9, 12])
    fleet = DeviceFleet(capacity_experts=capacity, fixed_s=np.zeros(6), per_token_s=np.array([1, 1, 1, 2, 2, 2.0]))
    loads = zipf_loads(rng, 5, 30, 3000, 1.1)
    previous = plan_moeless(loads, fleet, 10).replicas
    shifted = loads[:, rng.permutation(30)]
    plan = plan_moeless(shifted, fleet, 10, previous=previous, churn_penalty_s=5.0)
    np.testing.assert_array_equal(plan.replicas.sum(2), plan.copies)
    assert (plan.replicas.sum(1) <= capacity).all()
    fresh = plan_moeless(shifted, fleet, 10)
    assert new_copies(plan.replicas, previous).sum() < new_copies(fresh.replicas, previous).sum()
