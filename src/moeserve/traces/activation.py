"""Per-prompt quantities derived from routing: activation matrices and prompt vectors (Remoe III-A)."""

from __future__ import annotations

import numpy as np


def activation_matrix(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """How often each expert is chosen, normalised per layer.

    expert_ids: [tokens, layers, top_k] int -> [layers, experts] float32, each row sums to 1
    (all zeros when there are no tokens).
    """
    tokens, layers, top_k = expert_ids.shape
    counts = np.zeros((layers, num_experts), dtype=np.float64)
    if tokens:
        flat = expert_ids.astype(np.int64).transpose(1, 0, 2).reshape(layers, -1)
        offsets = (np.arange(layers, dtype=np.int64) * num_experts)[:, None]
        counts = np.bincount((flat + offsets).ravel(), minlength=layers * num_experts).reshape(layers, num_experts)
        counts = counts / (tokens * top_k)
    return counts.astype(np.float32)


def prompt_vector(token_embeddings: np.ndarray) -> np.ndarray:
    """Remoe's prompt vector: the sum of the prompt's L2-normalised input-embedding rows.

    token_embeddings: [tokens, hidden] (one row per token position) -> [hidden] float32.
    The soft cosine similarity of two prompts with 0/1 alignment vectors and the similarity matrix
    S_ij = cos(e_i, e_j) equals the plain cosine of these vectors (derivation: docs/trace-format.md).
    """
    e = np.asarray(token_embeddings, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return (e / np.maximum(norms, 1e-12)).sum(axis=0).astype(np.float32)


def soft_cosine(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> float:
    """Soft cosine a^T S b / sqrt(a^T S a * b^T S b). a, b: [n] weights; s: [n, n] similarities."""
    return float(a @ s @ b / np.sqrt((a @ s @ a) * (b @ s @ b)))
