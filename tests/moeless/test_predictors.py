import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.predictors import (
    fit_load_predictor,
    history_shares,
    predict_loads,
    score_predictions,
    transition_matrices,
)
from moeserve.moeless.synthetic import zipf_drift_loads, zipf_drift_routing


def test_history_predictors_by_hand():
    loads = np.array([[[3.0, 1.0]], [[1.0, 1.0]], [[0.0, 4.0]]])  # [3 windows, 1 layer, 2 experts]
    np.testing.assert_allclose(history_shares(loads, "last")[:, 0], [[0.5, 0.5], [0.75, 0.25], [0.5, 0.5]])
    # pooled counts of the last two windows: window 2 sees 3+1, 1+1 -> 4/6, 2/6
    np.testing.assert_allclose(history_shares(loads, "moving_average", 2)[2, 0], [4 / 6, 2 / 6])
    # ema with alpha 0.5: 0.5*[.75,.25] + 0.5*[.5,.5] = [.625,.375]; then 0.5*[.5,.5] + 0.5*that
    np.testing.assert_allclose(history_shares(loads, "ema", alpha=0.5)[2, 0], [0.5625, 0.4375])
    with pytest.raises(MoeServeError):
        history_shares(loads, "median")


def test_transition_matrices_by_hand():
    routing = np.array([[[0], [1]], [[0], [0]], [[1], [1]]])  # 3 tokens, 2 layers, top_k 1
    t = transition_matrices(routing, 3, smoothing=0.0)
    np.testing.assert_allclose(t[1], [[0.5, 0.5, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(t[0], np.eye(3))


def test_scores_by_hand():
    true = np.array([[[6.0, 1, 1, 0]]])  # mean 2: expert 0 is the only straggler at 1.5x
    pred = np.array([[[2.0, 4, 1, 1]]])
    s = score_predictions(pred, true, np.array([0]))
    np.testing.assert_allclose(s.wape, [(4 + 3 + 0 + 1) / 8])
    np.testing.assert_allclose(s.straggler_recall, [0.0])  # the top predicted expert is 1, not 0
    s = score_predictions(true, true, np.array([0]))
    np.testing.assert_allclose(s.wape, [0.0])
    np.testing.assert_allclose(s.straggler_recall, [1.0])


@pytest.fixture(scope="module")
def drifting():
    loads = zipf_drift_loads(num_windows=60, num_layers=6, num_experts=32, tokens_per_window=2000, seed=3)
    return loads, np.arange(4, 34), np.arange(34, 44), np.arange(44, 60)


def test_fitted_predictor_beats_the_moving_window_average(drifting):
    loads, fit, val, test = drifting
    predictor = fit_load_predictor(loads, fit, val, history_window=10)
    assert len(predictor.choice) == 6 and set(predictor.choice) <= set(predictor.names)
    ours = score_predictions(predict_loads(predictor, loads), loads, test)
    baseline = score_predictions(predict_loads(predictor, loads, method="moving_average"), loads, test)
    assert (ours.wape < baseline.wape).sum() >= 4
    assert np.nanmean(ours.straggler_recall) >= np.nanmean(baseline.straggler_recall)
    # predicted loads keep each window's known pick count
    np.testing.assert_allclose(predict_loads(predictor, loads).sum(2), loads.sum(2))


def test_predictions_are_causal(drifting):
    loads, fit, val, _ = drifting
    predictor = fit_load_predictor(loads, fit, val)
    changed = loads.copy()
    changed[50, 3:] = changed[50, 3:, ::-1]  # window 50, layers 3.. change
    changed[51:] *= 2.0
    for method in (None, "cross_layer"):
        before = predict_loads(predictor, loads, method=method)
        after = predict_loads(predictor, changed, method=method)
        np.testing.assert_allclose(after[:50], before[:50])
        np.testing.assert_allclose(after[50, :4], before[50, :4])  # layer 3 is first seen by layer 4
    # the cross-layer predictor of layer 4 does read layer 3 of the same window
    assert not np.allclose(after[50, 4], before[50, 4])


def test_an_informative_feature_gets_chosen(drifting):
    loads, fit, val, test = drifting
    rng = np.random.default_rng(0)
    pregate = loads * rng.uniform(0.9, 1.1, loads.shape)  # pre-gating that is nearly right
    predictor = fit_load_predictor(loads, fit, val, pregate=pregate)
    assert all(c in ("pregate", "blend") for c in predictor.choice)
    with_gate = score_predictions(predict_loads(predictor, loads, pregate=pregate), loads, test)
    assert with_gate.wape.max() < 0.1
    with pytest.raises(MoeServeError):
        predict_loads(predictor, loads, method="pregate")  # the feature is needed at predict time too


def test_transitions_help_when_layers_are_affine():
    trace = zipf_drift_routing(num_windows=40, num_layers=4, num_experts=16, top_k=2, tokens_per_window=400,
                               affinity_logit=4.0, drift_std=0.2, seed=5)
    fit, val, test = np.arange(2, 24), np.arange(24, 30), np.arange(30, 40)
    predictor = fit_load_predictor(trace.loads, fit, val, routing=trace.routing,
                                   window_of_token=trace.window_of_token)
    assert "transition" in predictor.names
    transition = score_predictions(predict_loads(predictor, trace.loads, method="transition"), trace.loads, test)
    history = score_predictions(predict_loads(predictor, trace.loads, method="ema_fast"), trace.loads, test)
    assert (transition.wape[1:] < history.wape[1:]).all()


def test_fit_rejects_bad_splits(drifting):
    loads, fit, val, _ = drifting
    with pytest.raises(MoeServeError):
        fit_load_predictor(loads, fit, fit[:3])
    with pytest.raises(MoeServeError):
        fit_load_predictor(loads[..., 0], fit, val)
