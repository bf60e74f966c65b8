"""Expert-activation histograms and Jensen-Shannon divergence between them (pure numpy)."""

from __future__ import annotations

import numpy as np


def normalise(counts: np.ndarray) -> np.ndarray:
    """`counts: [..., experts]` -> rows summing to 1 (top-k selection frequencies)."""
    counts = counts.astype(np.float64)
    return counts / counts.sum(axis=-1, keepdims=True)


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence, base 2 (0 = identical, 1 = disjoint support).

    `p, q: [..., experts]` probability rows -> `[...]` divergences.
    """
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log2(a / m), 0.0)
        return terms.sum(axis=-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def split_halves_by_document(doc_ids: list[str], token_counts: list[int]) -> np.ndarray:
    """`half: [chunks] int` 0/1, whole documents alternately to the half with fewer tokens so far."""
    doc_tokens: dict[str, int] = {}
    for doc, n in zip(doc_ids, token_counts, strict=True):
        doc_tokens[doc] = doc_tokens.get(doc, 0) + n
    totals = [0, 0]
    side = {}
    for doc in doc_tokens:  # first-appearance order = file order
        half = int(totals[1] < totals[0])
        side[doc] = half
        totals[half] += doc_tokens[doc]
    return np.asarray([side[d] for d in doc_ids], dtype=np.int64)


def specialisation_table(domain_counts: dict[str, np.ndarray], half_counts: dict[str, np.ndarray]) -> dict:
    """JSD per layer: between different domains' histograms vs between two halves of one domain.

    `domain_counts[d]: [layers, experts]` top-k selection counts of domain d's held-out text;
    `half_counts[d]: [2, layers, experts]` the same for its two document halves.
    """
    domains = list(domain_counts)
    hist = {d: normalise(c) for d, c in domain_counts.items()}
    pairs = [(a, b) for i, a in enumerate(domains) for b in domains[i + 1:]]
    cross = {f"{a}|{b}": js_divergence_bits(hist[a], hist[b]) for a, b in pairs}  # each [layers]
    within = {d: js_divergence_bits(normalise(h[0]), normalise(h[1])) for d, h in half_counts.items()}
    cross_mean = np.mean(list(cross.values()), axis=0)
    within_mean = np.mean(list(within.values()), axis=0)
    return {
        "cross_domain_per_pair": {k: v.round(4).tolist() for k, v in cross.items()},
        "within_domain_per_domain": {k: v.round(4).tolist() for k, v in within.items()},
        "cross_domain_mean_per_layer": cross_mean.round(4).tolist(),
        "within_domain_mean_per_layer": within_mean.round(4).tolist(),
        "cross_domain_mean": round(float(cross_mean.mean()), 4),
        "within_domain_mean": round(float(within_mean.mean()), 4),
        "ratio": round(float(cross_mean.mean() / within_mean.mean()), 2),
    }
