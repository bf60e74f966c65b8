"""How well SPS predicts activation on held-out prompts: mean Jensen-Shannon divergence per layer and domain.

Next to SPS (tree search) it scores the exact brute-force top-alpha, alpha random history prompts, the
global average of the history and the even activation 1/K, all with the same divergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.remoe.sps import (
    PAPER_ALPHA,
    PAPER_LEAF_SIZE,
    build_sps_tree,
    normalise_rows,
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


def similarity_weight(sims: np.ndarray, low: float, high: float) -> np.ndarray:
    """How much to trust the neighbours: 0 at mean neighbour cosine <= low, 1 at >= high, linear between.
    sims: [Q, a] -> [Q]"""
    return np.clip((sims.mean(axis=1) - low) / max(high - low, 1e-9), 0.0, 1.0)


def blend_with_prior(history_vectors: np.ndarray, history_prefill: np.ndarray, queries: np.ndarray,
                     alpha: int = PAPER_ALPHA, temperature: float = 0.05) -> np.ndarray:
    """SPS blended with the history's global average by similarity (ours): a query whose neighbours are as
    similar as a typical history prompt's (the 90th percentile of the history's own leave-one-out
    neighbour cosines) keeps SPS; one less similar than the 10th percentile gets the global average;
    linear between. Exact top-alpha neighbours. [P, d], [P, L, K], [Q, d] -> [Q, L, K]"""
    idx, sims = search_brute_force(history_vectors, queries, alpha)
    _, own = search_brute_force(history_vectors, history_vectors, alpha + 1)
    own = own[:, 1:]  # each history prompt's nearest neighbour is itself
    low, high = np.percentile(own.mean(axis=1), [10, 90])
    w = similarity_weight(sims, float(low), float(high))[:, None, None]
    prior = history_prefill.mean(axis=0, dtype=np.float64)
    return w * predict_activation(idx, sims, history_prefill, temperature) + (1 - w) * prior


def routing_neighbours(history_prefill: np.ndarray, query_first_layer: np.ndarray, alpha: int = PAPER_ALPHA,
                       temperature: float = 0.05) -> np.ndarray:
    """Once prefill starts (ours): neighbours by the prompt's own first-MoE-layer activation (cosine of the
    square roots: the Hellinger affinity) instead of its embedding, their activation predicts the rest.
    history_prefill [P, L, K], query_first_layer [Q, K] -> [Q, L, K] (layer 0 is the query's own)."""
    idx, sims = search_brute_force(np.sqrt(history_prefill[:, 0]), np.sqrt(query_first_layer), alpha)
    out = predict_activation(idx, sims, history_prefill, temperature).astype(np.float64)
    out[:, 0] = query_first_layer
    return out


def layer0_fitted_blend(candidates: Sequence[np.ndarray], query_first_layer: np.ndarray,
                        grid: int = 11) -> np.ndarray:
    """Once prefill starts (ours): per query, the convex mix of two predictions [Q, L, K] whose layer 0 is
    closest (JSD) to the query's own first-MoE-layer activation [Q, K], on a grid of weights, applied to
    every layer (layer 0 then set to the measured one). -> [Q, L, K]"""
    a, b = (np.asarray(c, dtype=np.float64) for c in candidates)
    weights = np.linspace(0.0, 1.0, grid)
    fit = np.stack([js_divergence(w * a[:, 0] + (1 - w) * b[:, 0], query_first_layer) for w in weights])  # [G, Q]
    w = weights[np.argmin(fit, axis=0)][:, None, None]
    out = w * a + (1 - w) * b
    out[:, 0] = query_first_layer
    return out


def hybrid_neighbours(history_vectors: np.ndarray, history_prefill: np.ndarray, queries: np.ndarray,
                      query_first_layer: np.ndarray, alpha: int = PAPER_ALPHA, temperature: float = 0.05) -> np.ndarray:
    """Neighbours by the mean of the embedding cosine and the first-layer routing affinity (ours). -> [Q, L, K]"""
    emb = normalise_rows(queries) @ normalise_rows(history_vectors).T
    route = normalise_rows(np.sqrt(query_first_layer)) @ normalise_rows(np.sqrt(history_prefill[:, 0])).T
    sims = 0.5 * (emb + route)
    a = min(alpha, sims.shape[1])
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :a]
    out = predict_activation(idx, np.take_along_axis(sims, idx, axis=1), history_prefill, temperature)
    out = out.astype(np.float64)
    out[:, 0] = query_first_layer
    return out


@dataclass(frozen=True)
class DomainTransfer:
    """Leave-one-domain-out: for each domain, history = the other domains' prompts, queries = its prompts.
    JSD (bits) on MoE layers 1.. (layer 0 is known once prefill starts), per method and held-out domain."""

    methods: tuple[str, ...]
    domains: tuple[str, ...]
    per_domain: np.ndarray  # [methods, domains]
    overall: np.ndarray  # [methods] mean over all held-out prompts

    def ratio(self, method: str, to: str = "global-average") -> float:
        return float(self.overall[self.methods.index(method)] / self.overall[self.methods.index(to)])


def evaluate_domain_transfer(vectors: np.ndarray, prefill: np.ndarray, domains: Sequence[str],
                             alpha: int = PAPER_ALPHA, temperature: float = 0.05,
                             within: float | None = None, seed: int = 0) -> DomainTransfer:
    """Leave-one-domain-out scores (or, with `within` = a share, one random held-out split across all domains,
    the within-domain reference). vectors [P, d], prefill [P, L, K], domains [P]."""
    validate_history(vectors, prefill)
    labels = np.array([str(d) for d in domains])
    names = tuple(sorted(set(labels)))
    if within is not None:
        rng = np.random.default_rng(seed)
        held = np.zeros(len(labels), dtype=bool)
        held[rng.choice(len(labels), max(2, int(round(within * len(labels)))), replace=False)] = True
        splits = [(~held, held)]
    else:
        if len(names) < 2:
            raise MoeServeError("leave-one-domain-out needs prompts of at least two domains")
        splits = [(labels != d, labels == d) for d in names]
    scores: dict[str, list[np.ndarray]] = {}
    held_labels = []
    for hist, query in splits:
        hv, hp, qv, qp = vectors[hist], prefill[hist], vectors[query], prefill[query]
        idx, sims = search_brute_force(hv, qv, alpha)
        tree = build_sps_tree(hv, seed=seed)
        tidx, tsims = search_tree(tree, qv, alpha)
        preds = {
            "global-average": np.broadcast_to(hp.mean(axis=0, dtype=np.float64), qp.shape),
            "sps(T=1)": predict_activation(tidx, tsims, hp, 1.0),
            f"sps(T={temperature:g})": predict_activation(tidx, tsims, hp, temperature),
            f"brute-force(T={temperature:g})": predict_activation(idx, sims, hp, temperature),
            "sps+prior by similarity": blend_with_prior(hv, hp, qv, alpha, temperature),
            "first-layer routing neighbours": routing_neighbours(hp, qp[:, 0], alpha, temperature),
            "embedding+routing neighbours": hybrid_neighbours(hv, hp, qv, qp[:, 0], alpha, temperature),
        }
        sps = preds[f"sps(T={temperature:g})"]
        preds["sps+prior, weight fitted on layer 0"] = layer0_fitted_blend((sps, preds["global-average"]), qp[:, 0])

        for name, p in preds.items():
            scores.setdefault(name, []).append(js_divergence(p, qp)[:, 1:].mean(axis=1))  # [Q]
        held_labels.append(labels[query])
    methods = tuple(scores)
    per_prompt = np.stack([np.concatenate(scores[m]) for m in methods])  # [M, Q]
    lab = np.concatenate(held_labels)
    present = tuple(d for d in names if (lab == d).any())
    per_domain = np.stack([per_prompt[:, lab == d].mean(axis=1) for d in present], axis=1)
    return DomainTransfer(methods, present, per_domain, per_prompt.mean(axis=1))
