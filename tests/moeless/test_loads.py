import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.loads import loads_from_routing, shares, windows_from_arrivals
from moeserve.moeless.synthetic import zipf_drift_loads, zipf_drift_routing


def test_windows_from_arrivals():
    np.testing.assert_array_equal(windows_from_arrivals(np.array([10.0, 10.4, 11.0, 12.9]), 1.0), [0, 0, 1, 2])
    with pytest.raises(MoeServeError):
        windows_from_arrivals(np.array([0.0]), 0.0)


def test_loads_from_routing_by_hand():
    routing = np.array([
        [[0, 1], [2, -1]],
        [[1, 2], [2, 0]],
        [[0, 2], [1, 2]],
    ])  # [tokens 3, layers 2, top_k 2]
    loads = loads_from_routing(routing, np.array([0, 0, 1]), num_experts=3)
    np.testing.assert_array_equal(loads, [
        [[1, 2, 1], [1, 0, 2]],
        [[1, 0, 1], [0, 1, 1]],
    ])
    with pytest.raises(MoeServeError):
        loads_from_routing(routing, np.array([0, 0, 1]), num_experts=2)


def test_shares_of_an_empty_row_are_even():
    np.testing.assert_allclose(shares(np.array([[2.0, 6.0], [0.0, 0.0]])), [[0.25, 0.75], [0.5, 0.5]])


def test_zipf_generator_is_seeded_skewed_and_drifts():
    a = zipf_drift_loads(num_windows=40, num_layers=3, num_experts=64, tokens_per_window=2000, seed=4)
    b = zipf_drift_loads(num_windows=40, num_layers=3, num_experts=64, tokens_per_window=2000, seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (40, 3, 64)
    assert (a <= 2000).all()
    assert np.allclose(a.sum(2), 2000 * 8, rtol=0.01)
    s = shares(a)
    assert (s.max(2) * 64).mean() > 4  # hottest expert well above the mean
    near = np.abs(s[1:] - s[:-1]).sum(2).mean()
    far = np.abs(s[20:] - s[:-20]).sum(2).mean()
    assert far > 1.2 * near  # drift: windows far apart differ more


def test_routing_generator_picks_distinct_experts():
    trace = zipf_drift_routing(num_windows=4, num_layers=3, num_experts=16, top_k=4, tokens_per_window=50, seed=2)
    assert trace.routing.shape == (200, 3, 4)
    picks = np.sort(trace.routing, axis=2)
    assert (np.diff(picks, axis=2) > 0).all()
    np.testing.assert_array_equal(trace.loads, loads_from_routing(trace.routing, trace.window_of_token, 16, 4))
