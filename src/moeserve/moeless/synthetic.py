"""Seeded synthetic expert loads: Zipf-skewed, drifting over time, correlated across layers.

The generative story (so that each predictor feature has something real to find):
- each layer has a Zipf popularity over its experts (exponent `zipf_s`, random expert order);
- prompts come in `num_topics` kinds; each kind shifts the layer's popularity (same kind, all layers),
  and each window mixes kinds in proportions that persist partly from the window before: this is
  what cross-layer statistics and prompt-level (SPS) prediction can see;
- every layer's popularity drifts slowly (an AR(1) walk per expert): this is what recent history
  sees and what a long moving average lags behind;
- inter-layer expert affinity (observed in real MoE models, e.g. ExFlow, arXiv 2401.08383): a token
  that picked expert i at layer l-1 leans to expert affine_l(i) at layer l, so this window's
  routing one layer earlier tells where its tokens go next (what cross-layer predictors use);
- a window's counts are a multinomial draw of tokens x top_k picks, with each expert's pick
  probability capped at 1 / top_k first (top-k routing picks an expert at most once per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.moeless.loads import loads_from_routing


@dataclass(frozen=True, eq=False)
class SyntheticRouting:
    """routing [tokens, L, top_k] int; window_of_token [tokens] int; loads [W, L, E] float."""

    routing: np.ndarray
    window_of_token: np.ndarray
    loads: np.ndarray


@dataclass(frozen=True, eq=False)
class _Latent:
    logits: np.ndarray  # [W, K, L, E] float32
    mixture: np.ndarray  # [W, K]
    affine: np.ndarray  # [L, E] int: affine[l, i] is the layer-l expert that layer-(l-1) expert i leans to


def _latent(rng: np.random.Generator, num_windows: int, num_layers: int, num_experts: int, num_topics: int,
            zipf_s: float, topic_spread: float, topic_persistence: float, drift_std: float,
            drift_rate: float) -> _Latent:
    ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1
    base = -zipf_s * np.log(ranks)  # [L, E]
    topic = rng.normal(0.0, topic_spread, (num_topics, num_layers, num_experts))
    keep = 1.0 - drift_rate
    drift = np.empty((num_windows, num_layers, num_experts))
    drift[0] = rng.normal(0.0, drift_std, (num_layers, num_experts))
    innovation = drift_std * np.sqrt(1.0 - keep**2)
    for w in range(1, num_windows):
        drift[w] = keep * drift[w - 1] + rng.normal(0.0, innovation, (num_layers, num_experts))
    mixture = np.empty((num_windows, num_topics))
    mixture[0] = rng.dirichlet(np.full(num_topics, 0.5))
    for w in range(1, num_windows):
        mixture[w] = topic_persistence * mixture[w - 1] + (1 - topic_persistence) * rng.dirichlet(
            np.full(num_topics, 0.5))
    logits = (base[None, None] + topic[None] + drift[:, None]).astype(np.float32)
    affine = np.argsort(rng.random((num_layers, num_experts)), axis=1)
    return _Latent(logits=logits, mixture=mixture, affine=affine)


def _tokens(tokens_per_window: int | np.ndarray, num_windows: int) -> np.ndarray:
    tokens = np.broadcast_to(np.asarray(tokens_per_window, dtype=np.int64), (num_windows,))
    if (tokens < 0).any():
        raise MoeServeError("tokens per window must be non-negative")
    return tokens


def zipf_drift_loads(num_windows: int = 96, num_layers: int = 58, num_experts: int = 256, top_k: int = 8,
                     tokens_per_window: int | np.ndarray = 4096, zipf_s: float = 0.8, num_topics: int = 8,
                     topic_spread: float = 0.5, topic_persistence: float = 0.5, drift_std: float = 0.5,
                     drift_rate: float = 0.1, affinity_share: float = 0.3, seed: int = 0) -> np.ndarray:
    """Expert token counts per window. -> loads [num_windows, num_layers, num_experts] float.

    tokens_per_window: int, or [num_windows] (e.g. from real arrival times).
    affinity_share: the share of layer l's picks that follow layer l-1's realised picks through the
        affinity map (the rest follow the layer's own popularity).
    """
    tokens = _tokens(tokens_per_window, num_windows)
    rng = np.random.default_rng(seed)
    latent = _latent(rng, num_windows, num_layers, num_experts, num_topics, zipf_s, topic_spread,
                     topic_persistence, drift_std, drift_rate)
    logits = latent.logits - latent.logits.max(-1, keepdims=True)
    per_topic = np.exp(logits)
    per_topic /= per_topic.sum(-1, keepdims=True)
    probs = np.einsum("wk,wkle->wle", latent.mixture, per_topic.astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    picks = tokens * top_k
    loads = np.zeros((num_windows, num_layers, num_experts))
    for layer in range(num_layers):
        p = probs[:, layer]
        if layer > 0 and affinity_share > 0:
            followed = np.zeros_like(p)
            followed[:, latent.affine[layer]] = loads[:, layer - 1] / np.maximum(picks[:, None], 1)
            p = (1 - affinity_share) * p + affinity_share * followed
        p = _cap_probabilities(p / p.sum(-1, keepdims=True), 1.0 / top_k)
        loads[:, layer] = np.minimum(rng.multinomial(picks, p), tokens[:, None])
    return loads


def _cap_probabilities(probs: np.ndarray, cap: float) -> np.ndarray:
    """Clip rows at `cap` and hand the excess to the uncapped entries in proportion. [..., E] -> [..., E]."""
    for _ in range(probs.shape[-1]):
        over = probs > cap
        if not over.any():
            break
        excess = np.where(over, probs - cap, 0.0).sum(-1, keepdims=True)
        probs = np.where(over, cap, probs)
        free = np.where(probs < cap, probs, 0.0)
        probs = probs + free / np.maximum(free.sum(-1, keepdims=True), 1e-300) * excess
    return probs


def zipf_drift_routing(num_windows: int = 96, num_layers: int = 58, num_experts: int = 256, top_k: int = 8,
                       tokens_per_window: int | np.ndarray = 256, zipf_s: float = 0.8, num_topics: int = 8,
                       topic_spread: float = 0.5, topic_persistence: float = 0.5, drift_std: float = 0.5,
                       drift_rate: float = 0.1, affinity_logit: float = 2.0, seed: int = 0) -> SyntheticRouting:
    """Token-level routing from the same story: each token has a topic; top_k distinct experts per layer.

    affinity_logit: gate-logit bonus at layer l for the experts affine to the token's layer l-1 picks.
    Cost grows as tokens x layers x experts; keep tokens per window modest.
    """
    if top_k > num_experts:
        raise MoeServeError(f"top_k ({top_k}) exceeds the number of experts ({num_experts})")
    tokens = _tokens(tokens_per_window, num_windows)
    rng = np.random.default_rng(seed)
    latent = _latent(rng, num_windows, num_layers, num_experts, num_topics, zipf_s, topic_spread,
                     topic_persistence, drift_std, drift_rate)
    routing = np.empty((int(tokens.sum()), num_layers, top_k), dtype=np.int64)
    window_of_token = np.repeat(np.arange(num_windows), tokens)
    start = 0
    for w in range(num_windows):
        topic_of_token = rng.choice(num_topics, size=int(tokens[w]), p=latent.mixture[w] / latent.mixture[w].sum())
        rows = np.arange(int(tokens[w]))[:, None]
        for layer in range(num_layers):
            # Gumbel top-k: the k largest of logits + Gumbel noise are a draw without replacement.
            noisy = latent.logits[w, topic_of_token, layer] + rng.gumbel(size=(int(tokens[w]), num_experts)).astype(
                np.float32)
            if layer > 0:
                noisy[rows, latent.affine[layer][routing[start:start + tokens[w], layer - 1]]] += affinity_logit
            routing[start:start + tokens[w], layer] = np.argpartition(-noisy, top_k - 1, axis=1)[:, :top_k]
        start += int(tokens[w])
    loads = loads_from_routing(routing, window_of_token, num_experts, num_windows)
    return SyntheticRouting(routing=routing, window_of_token=window_of_token, loads=loads)
