"""Leave-one-domain-out evaluation of the load predictor: the held-out domain comes after the history."""

from __future__ import annotations

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.predictor_eval import evaluate_predictor_domain_transfer


def _routing(domains: list[str], experts_of: dict[str, np.ndarray], tokens: int, layers: int, seed: int):
    """Each request's tokens route (top-2, every layer) among its domain's experts only."""
    rng = np.random.default_rng(seed)
    rows = [np.stack([[rng.choice(experts_of[d], size=2, replace=False) for _ in range(layers)]
                      for _ in range(tokens)]) for d in domains]
    offsets = np.arange(len(domains) + 1) * tokens
    return np.concatenate(rows), offsets


def test_an_unseen_domain_is_harder_than_a_shuffled_one():
    """Domains use disjoint experts: a moving average of the history lags behind the held-out domain's
    windows (they follow the history), while shuffled requests (8 to a window) look stationary."""
    domains = [d for d in ("a", "b", "c") for _ in range(120)]
    experts_of = {"a": np.arange(0, 4), "b": np.arange(4, 8), "c": np.arange(8, 12)}
    routing, offsets = _routing(domains, experts_of, tokens=8, layers=3, seed=0)
    out = evaluate_predictor_domain_transfer(routing, offsets, domains, 12, tokens_per_window=64)
    assert out.splits == ("a", "b", "c", "within")
    assert np.all(out.wape_baseline[:3] > 1.3 * out.wape_baseline[3])  # 0.68 vs 0.47 here
    assert np.all(np.isfinite(out.ratio())) and np.all(out.wape_chosen > 0)


def test_one_domain_or_too_short_a_history_is_refused():
    routing, offsets = _routing(["a"] * 8, {"a": np.arange(4)}, 16, 2, 0)
    with pytest.raises(MoeServeError, match="at least two domains"):
        evaluate_predictor_domain_transfer(routing, offsets, ["a"] * 8, 4)
    with pytest.raises(MoeServeError, match="history windows"):
        evaluate_predictor_domain_transfer(routing, offsets, ["a", "b"] * 4, 4, tokens_per_window=64)
