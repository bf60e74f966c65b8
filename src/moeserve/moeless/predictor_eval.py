"""The load predictor on a domain its history never saw (leave-one-domain-out), next to a within-domain split.

MoEless [§4.2] fits its layer-aware predictors on past windows; serving then meets prompts of kinds the
history did not hold. Here the requests of every other domain come first (in a seeded random order) and
make the fit and validation windows; the held-out domain's requests follow and make the test windows, each
predicted, as when serving, from every window before it. The within-domain reference shuffles all requests
together and tests on the same number of last windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.moeless.loads import loads_from_routing
from moeserve.moeless.predictors import fit_load_predictor, predict_loads, score_predictions

BASELINE = "moving_average"  # over the predictor's history window (MA(10) by default)


@dataclass(frozen=True)
class PredictorTransfer:
    """Mean WAPE over layers, chosen predictor and the moving-average baseline, per split.

    splits: the held-out domain of each row ("within" for the shuffled reference)
    wape_chosen, wape_baseline: [splits]; recall_chosen, recall_baseline: [splits] straggler recall
    """

    splits: tuple[str, ...]
    wape_chosen: np.ndarray
    wape_baseline: np.ndarray
    recall_chosen: np.ndarray
    recall_baseline: np.ndarray

    def ratio(self) -> np.ndarray:
        """Chosen / baseline WAPE per split (below 1: the predictor beats the moving average)."""
        return self.wape_chosen / self.wape_baseline


@dataclass(frozen=True)
class _Windows:
    """Requests in one order cut into windows: loads [W, L, E], routing [T, L, k] in that order, window of
    each token [T], first window of each request [R]."""

    loads: np.ndarray
    routing: np.ndarray
    window_of_token: np.ndarray
    starts: np.ndarray


def _windowed(routing: np.ndarray, offsets: np.ndarray, order: np.ndarray, tokens_per_window: int,
              num_experts: int) -> _Windows:
    rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in order])
    window = np.arange(len(rows)) // tokens_per_window
    starts = np.cumsum([0] + [offsets[r + 1] - offsets[r] for r in order[:-1]]) // tokens_per_window
    return _Windows(loads_from_routing(routing[rows], window, num_experts), routing[rows], window, starts)


def _score(w: _Windows, fit: np.ndarray, val: np.ndarray, test: np.ndarray) -> tuple[float, float, float, float]:
    loads = w.loads
    predictor = fit_load_predictor(loads, fit, val, routing=w.routing, window_of_token=w.window_of_token)
    chosen = score_predictions(predict_loads(predictor, loads), loads, test)
    base = score_predictions(predict_loads(predictor, loads, method=BASELINE), loads, test)
    return (float(chosen.wape.mean()), float(base.wape.mean()), float(np.nanmean(chosen.straggler_recall)),
            float(np.nanmean(base.straggler_recall)))


def _history_split(first_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit and validation windows before the first test window: window 0 has no history, 3/4 fit, 1/4 val."""
    history = np.arange(1, first_test)
    if len(history) < 8:
        raise MoeServeError(f"only {len(history)} history windows before the held-out requests: use shorter "
                            "windows or a longer trace")
    cut = len(history) * 3 // 4
    return history[:cut], history[cut:]


def evaluate_predictor_domain_transfer(routing: np.ndarray, offsets: np.ndarray, domains: Sequence[str],
                                       num_experts: int, tokens_per_window: int = 128,
                                       seed: int = 0) -> PredictorTransfer:
    """Leave-one-domain-out scores of the fitted load predictor against the moving average, then the
    within-domain reference. routing [T, L, k] expert ids, offsets [R + 1] request starts, domains [R]."""
    labels = np.array([str(d) for d in domains])
    names = sorted(set(labels))
    if len(names) < 2:
        raise MoeServeError("leave-one-domain-out needs requests of at least two domains")
    if len(offsets) != len(labels) + 1:
        raise MoeServeError(f"{len(offsets) - 1} requests but {len(labels)} domains")
    rng = np.random.default_rng(seed)
    rows, test_sizes = [], []
    for held in names:
        history = rng.permutation(np.flatnonzero(labels != held))
        query = rng.permutation(np.flatnonzero(labels == held))
        w = _windowed(routing, offsets, np.concatenate([history, query]), tokens_per_window, num_experts)
        first_test = int(w.starts[len(history)]) + 1  # the first window holding only held-out tokens
        test = np.arange(first_test, len(w.loads))
        rows.append(_score(w, *_history_split(first_test), test))
        test_sizes.append(len(test))
    w = _windowed(routing, offsets, rng.permutation(len(labels)), tokens_per_window, num_experts)
    first_test = len(w.loads) - int(np.mean(test_sizes))
    rows.append(_score(w, *_history_split(first_test), np.arange(first_test, len(w.loads))))
    columns = np.array(rows).T
    return PredictorTransfer(tuple(names) + ("within",), *columns)
