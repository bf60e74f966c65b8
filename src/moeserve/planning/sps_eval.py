"""How well SPS predicts activation on held-out prompts: mean Jensen-Shannon divergence per layer and domain.

Next to SPS (tree search) it scores the exact brute-force top-alpha, alpha random history prompts, the
global average of the history and the even activation 1/K, all with the same divergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.planning.sps import (
    PAPER_ALPHA,
    PAPER_LEAF_SIZE,
    build_sps_tree,
    predict_activation,
    recall,
    search_brute_force,
    search_tree,
    validate_history,
)
from moeserve.traces.stats import js_divergence  # noqa: F401  (re-exported: one implementation)


@dataclass(frozen=True)
class SpsEvaluation:
    methods: tuple[str, ...]
    per_layer: np.ndarray  # [methods, L] mean JSD over held-out prompts
    overall: np.ndarray  # [methods] mean over prompts and layers
    domains: tuple[str, ...]
    per_domain: np.ndarray  # [methods, domains]
    tree_recall: float  # share of the exact top-alpha that the tree search found

    def score(self, method: str) -> float:
        return float(self.overall[self.methods.index(method)])


def evaluate_sps(
    history_vectors: np.ndarray,
    history_prefill: np.ndarray,
    heldout_vectors: np.ndarray,
    heldout_prefill: np.ndarray,
    heldout_domains: Sequence[str] | None = None,
    alpha: int = PAPER_ALPHA,
    temperatures: Sequence[float] = (1.0, 0.05),
    leaf_size: int = PAPER_LEAF_SIZE,
    fanout: int = 8,
    seed: int = 0,
) -> SpsEvaluation:
    """Score every predictor on held-out prompts. history_*: [P, d] and [P, L, K]; heldout_*: [Q, d] and [Q, L, K]."""
    validate_history(history_vectors, history_prefill)
    validate_history(heldout_vectors, heldout_prefill)
    if heldout_prefill.shape[1:] != history_prefill.shape[1:]:
        raise MoeServeError(
            f"held-out activation {heldout_prefill.shape[1:]} differs from history {history_prefill.shape[1:]}"
        )
    q, layers, experts = heldout_prefill.shape
    domains = ["all"] * q if heldout_domains is None else [str(d) for d in heldout_domains]
    if len(domains) != q:
        raise MoeServeError(f"{len(domains)} domain labels for {q} held-out prompts")

    tree = build_sps_tree(history_vectors, leaf_size=leaf_size, fanout=fanout, seed=seed)
    tree_idx, tree_sims = search_tree(tree, heldout_vectors, alpha)
    exact_idx, exact_sims = search_brute_force(history_vectors, heldout_vectors, alpha)
    predictions: dict[str, np.ndarray] = {}
    for t in temperatures:
        predictions[f"sps(T={t:g})"] = predict_activation(tree_idx, tree_sims, history_prefill, t)
        predictions[f"brute-force(T={t:g})"] = predict_activation(exact_idx, exact_sims, history_prefill, t)
    rng = np.random.default_rng(seed)
    random_idx = np.stack(
        [rng.choice(history_prefill.shape[0], tree_idx.shape[1], replace=False) for _ in range(q)]
    )
    predictions["random-alpha"] = history_prefill[random_idx].mean(axis=1)
    predictions["global-average"] = np.broadcast_to(
        history_prefill.mean(axis=0, dtype=np.float64), (q, layers, experts)
    )
    predictions["even"] = np.full((1, layers, experts), 1.0 / experts)

    names = tuple(predictions)
    per_prompt = np.stack([js_divergence(predictions[n], heldout_prefill) for n in names])  # [M, Q, L]
    domain_names = tuple(sorted(set(domains)))
    labels = np.array([domain_names.index(d) for d in domains])
    per_domain = np.stack(
        [per_prompt[:, labels == i].mean(axis=(1, 2)) for i in range(len(domain_names))], axis=1
    )
    return SpsEvaluation(
        methods=names,
        per_layer=per_prompt.mean(axis=1),
        overall=per_prompt.mean(axis=(1, 2)),
        domains=domain_names,
        per_domain=per_domain,
        tree_recall=recall(tree_idx, exact_idx),
    )
