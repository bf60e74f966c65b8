import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.fleet import static_placement, uniform_fleet
from moeserve.moeless.simulator import (
    compare_strategies,
    eplb_schedule,
    replay,
    static_deployment_cost,
)
from moeserve.moeless.synthetic import zipf_drift_loads

FLEET = uniform_fleet(2, 2, fixed_s=0.0, per_token_s=1.0, expert_gb=1.0, cold_start_s=0.5, price_per_gb_s=1.0,
                      dispatch_s=0.1, dispatch_per_token_s=0.01, device_memory_gb=4.0)
LOADS = np.array([[[3.0, 1.0]], [[1.0, 3.0]], [[2.0, 2.0]]])  # [3 windows, 1 layer, 2 experts]


def test_static_by_hand():
    static = static_placement(1, 2, 2)
    r = replay(LOADS, np.broadcast_to(static, (3, 1, 2, 2)), FLEET, 10.0, static)
    np.testing.assert_allclose(r.layer_time_s[:, 0], [3.13, 3.13, 2.12])
    np.testing.assert_allclose(r.balancedness[:, 0], [1.5, 1.5, 1.0])
    assert r.cold_starts.sum() == 0 and r.replicas_alive.tolist() == [[2], [2], [2]]
    assert r.cost == pytest.approx(2 * 10 * 3)
    assert static_deployment_cost(FLEET, 30.0) == pytest.approx(2 * 4.0 * 30.0)


def test_replicated_by_hand():
    placements = np.array([
        [[[1, 1], [0, 1]]],  # expert 0 scales out onto device 1
        [[[1, 0], [1, 1]]],  # expert 0 scales in, expert 1 scales out onto device 0
        [[[0, 1], [1, 1]]],  # expert 0 moves from device 0 to device 1
    ])
    initial = static_placement(1, 2, 2)
    warm = replay(LOADS, placements, FLEET, 10.0, initial, prewarmed=True)
    # device tokens: [1.5, 2.5], [2.5, 1.5], [1, 3]
    np.testing.assert_allclose(warm.layer_time_s[:, 0], [2.625, 2.625, 3.13])
    np.testing.assert_allclose(warm.balancedness[:, 0], [1.25, 1.25, 1.5])
    assert warm.replicas_created[:, 0].tolist() == [1, 1, 0]
    assert warm.replicas_moved[:, 0].tolist() == [0, 0, 1]
    assert warm.cold_starts[:, 0].tolist() == [1, 1, 1]
    assert warm.cost == pytest.approx(3 * 10 * 3 + 3 * 0.5)
    cold = replay(LOADS, placements, FLEET, 10.0, initial, prewarmed=False)
    np.testing.assert_allclose(cold.layer_time_s - warm.layer_time_s, 0.5)


def test_eplb_schedule_rebalances_on_its_interval():
    loads = zipf_drift_loads(num_windows=12, num_layers=2, num_experts=16, tokens_per_window=500, seed=1)
    placed, initial = eplb_schedule(loads, 4, 4, np.arange(6, 12), history_window=3, interval=3)
    assert placed.shape == (6, 2, 16, 4) and initial.shape == (2, 16, 4)
    np.testing.assert_array_equal(placed[0], placed[1])
    np.testing.assert_array_equal(placed[0], placed[2])
    assert (placed.sum((2, 3)) == 20).all()
    with pytest.raises(MoeServeError):
        eplb_schedule(loads, 4, 4, np.arange(1, 3))


def test_compare_strategies_on_a_skewed_trace():
    loads = zipf_drift_loads(num_windows=14, num_layers=3, num_experts=32, tokens_per_window=1000, seed=2)
    fleet = uniform_fleet(8, 6, per_token_s=1e-3, expert_gb=0.1, cold_start_s=0.2, price_per_gb_s=1.0)
    windows = np.arange(10, 14)
    predicted = np.concatenate([loads[:1], loads[:-1]])  # last window as the forecast
    results = compare_strategies(loads, fleet, 8, predicted, windows, window_s=1.0, history_window=4)
    assert set(results) == {"static", "eplb", "moeless_predicted", "moeless_oracle"}
    static, eplb, oracle = results["static"], results["eplb"], results["moeless_oracle"]
    assert (static.replicas_alive == 32).all() and static.cold_starts.sum() == 0
    for r in results.values():
        assert r.layer_time_s.shape == (4, 3)
        assert (r.replicas_alive <= 40).all()
    assert oracle.balancedness.mean() <= eplb.balancedness.mean()
    assert oracle.layer_time_s.sum() < static.layer_time_s.sum()
    summary = oracle.summary()
    assert summary["cold_starts"] == oracle.cold_starts.sum()
    assert summary["moe_time_per_window_s"] == pytest.approx(oracle.layer_time_s.sum(1).mean())
