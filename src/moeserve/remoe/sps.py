"""Similar Prompts Searching [III-A, IV-B]: predict a prompt's expert activation from similar history prompts.

History = prompt vectors (sum of L2-normalised input-embedding rows; similarity = cosine) and their
activation matrices. A multi-fork tree is built by k-medoids (cosine similarity, k-means++-style seeding)
until leaves hold at most `leaf_size` (paper: beta = 150) prompts. A query walks best-first by similarity
to the node medoids: the first leaf reached is the greedy descent; while fewer than `alpha` (paper: 15)
candidates are collected it borrows the next most similar pending node, a sibling or an uncle. The alpha
most similar candidates are weighted by softmax(similarity / temperature) (paper: temperature 1).

Medoid update: with unit vectors the summed cosine of member i to its cluster is x_i . sum_j x_j, so the
exact k-medoid of a cluster costs O(size * dim) instead of O(size^2 * dim).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError

PAPER_TEMPERATURE = 1.0
PAPER_ALPHA = 15
PAPER_LEAF_SIZE = 150


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """[P, d] -> [P, d] float32 unit rows (zero rows stay zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise MoeServeError(f"prompt vectors must be a non-empty [prompts, dim] array, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def kmedoids_cosine(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 10):
    """k-medoids on unit rows x: [s, d] with cosine similarity; k-means++-style seeding on 1 - cosine.

    Returns (labels: [s] int64 in 0..k'-1, medoids: [k'] int64 row indices), k' <= k non-empty clusters.
    """
    s = x.shape[0]
    medoids = [int(rng.integers(s))]
    distance = np.maximum(1.0 - x @ x[medoids[0]], 0.0)
    for _ in range(1, k):
        weight = distance.astype(np.float64) ** 2
        total = weight.sum()
        if total <= 0:
            break
        pick = int(rng.choice(s, p=weight / total))
        medoids.append(pick)
        distance = np.minimum(distance, np.maximum(1.0 - x @ x[pick], 0.0))
    medoids = np.array(medoids, dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmax(x @ x[medoids].T, axis=1)
        onehot = np.zeros((s, medoids.size), dtype=x.dtype)
        onehot[np.arange(s), labels] = 1.0
        summed = (x @ (onehot.T @ x).T)[np.arange(s), labels]  # x_i . (sum of x_i's cluster)
        new = np.array(
            [int(np.flatnonzero(labels == c)[np.argmax(summed[labels == c])]) for c in np.unique(labels)]
        )
        if new.size == medoids.size and np.array_equal(new, medoids):
            break
        medoids = new
    labels = np.argmax(x @ x[medoids].T, axis=1)
    used = np.unique(labels)
    return np.searchsorted(used, labels), medoids[used]


@dataclass(frozen=True)
class SpsTree:
    """Clustering tree over unit prompt vectors. Node 0 is the root; a node's children are contiguous ids."""

    vectors: np.ndarray  # [P, d] float32 unit rows
    node_vector: np.ndarray  # [nodes, d] float32, the medoid's (or centroid's) unit vector (root: zeros)
    child_start: np.ndarray  # [nodes] int64; children of n are child_start[n] .. + child_count[n]
    child_count: np.ndarray  # [nodes] int64; 0 for a leaf
    leaf_start: np.ndarray  # [nodes] int64 into members
    leaf_count: np.ndarray  # [nodes] int64
    members: np.ndarray  # [P] int64 prompt ids, grouped by leaf

    @property
    def depth(self) -> int:
        depth, frontier = 0, [0]
        while frontier:
            depth += 1
            frontier = [
                c
                for n in frontier
                for c in range(self.child_start[n], self.child_start[n] + self.child_count[n])
            ]
        return depth


def build_sps_tree(
    prompt_vectors: np.ndarray,
    leaf_size: int = PAPER_LEAF_SIZE,
    fanout: int = 8,
    iterations: int = 10,
    seed: int = 0,
    routing: str = "medoid",
) -> SpsTree:
    """Build the k-medoids tree. prompt_vectors: [P, d]. Each split makes min(fanout, ceil(size / leaf_size)) clusters.

    routing: what a query is compared with at a node: "medoid" (paper) or "centroid", the normalised
    mean of the node's prompts (a medoid is one noisy prompt; the mean direction routes a little better).
    """
    if leaf_size < 1 or fanout < 2:
        raise MoeServeError(f"SPS needs leaf_size >= 1 and fanout >= 2, got {leaf_size} and {fanout}")
    if routing not in ("medoid", "centroid"):
        raise MoeServeError(f"SPS routing must be medoid or centroid, got {routing!r}")
    x = normalise_rows(prompt_vectors)
    rng = np.random.default_rng(seed)
    medoid_of = [-1]
    centroids: list[np.ndarray] = [np.zeros(x.shape[1], dtype=np.float32)]
    child_start, child_count, leaf_start, leaf_count = [0], [0], [0], [0]
    members: list[np.ndarray] = []
    n_members = 0
    stack = [(0, np.arange(x.shape[0], dtype=np.int64))]
    while stack:
        node, idx = stack.pop()
        if idx.size <= leaf_size:
            leaf_start[node], leaf_count[node] = n_members, idx.size
            members.append(idx)
            n_members += idx.size
            continue
        k = min(fanout, math.ceil(idx.size / leaf_size))
        labels, medoids = kmedoids_cosine(x[idx], k, rng, iterations)
        if medoids.size < 2:  # identical vectors: split arbitrarily so the tree still terminates
            labels = np.arange(idx.size) * k // idx.size
            medoids = np.array([np.flatnonzero(labels == c)[0] for c in range(k)], dtype=np.int64)
        first = len(medoid_of)
        child_start[node], child_count[node] = first, medoids.size
        for c, m in enumerate(medoids):
            medoid_of.append(int(idx[m]))
            if routing == "centroid":
                mean = x[idx[labels == c]].sum(axis=0)
                centroids.append(mean / max(float(np.linalg.norm(mean)), 1e-30))
            child_start.append(0)
            child_count.append(0)
            leaf_start.append(0)
            leaf_count.append(0)
            stack.append((first + c, idx[labels == c]))
    medoid_of = np.array(medoid_of, dtype=np.int64)
    if routing == "centroid":
        node_vector = np.stack(centroids).astype(np.float32)
    else:
        node_vector = np.zeros((medoid_of.size, x.shape[1]), dtype=np.float32)
        node_vector[1:] = x[medoid_of[1:]]
    return SpsTree(
        vectors=x,
        node_vector=node_vector,
        child_start=np.array(child_start, dtype=np.int64),
        child_count=np.array(child_count, dtype=np.int64),
        leaf_start=np.array(leaf_start, dtype=np.int64),
        leaf_count=np.array(leaf_count, dtype=np.int64),
        members=np.concatenate(members),
    )


def search_tree(tree: SpsTree, queries: np.ndarray, alpha: int = PAPER_ALPHA, probe_leaves: int = 1):
    """Approximate top-alpha by cosine. queries: [Q, d] -> (indices [Q, a] int64, sims [Q, a] float32), a = min(alpha, P).

    Visits at least `probe_leaves` leaves and enough leaves to hold alpha candidates, best-first.
    """
    q = normalise_rows(queries)
    if q.shape[1] != tree.vectors.shape[1]:
        raise MoeServeError(
            f"query vectors have dim {q.shape[1]}, the SPS history has {tree.vectors.shape[1]}"
        )
    a = min(alpha, tree.vectors.shape[0])
    out_idx = np.empty((q.shape[0], a), dtype=np.int64)
    out_sim = np.empty((q.shape[0], a), dtype=np.float32)
    for row, query in enumerate(q):
        candidates: list[np.ndarray] = []
        found, leaves = 0, 0
        heap = [(0.0, 0)]
        while heap and (found < a or leaves < probe_leaves):
            _, node = heapq.heappop(heap)
            count = tree.child_count[node]
            if count == 0:
                start = tree.leaf_start[node]
                candidates.append(tree.members[start : start + tree.leaf_count[node]])
                found += tree.leaf_count[node]
                leaves += 1
                continue
            first = tree.child_start[node]
            sims = tree.node_vector[first : first + count] @ query
            for c in range(count):
                heapq.heappush(heap, (-float(sims[c]), first + c))
        pool = np.concatenate(candidates)
        pool_sims = tree.vectors[pool] @ query
        best = _top(pool_sims, a)
        out_idx[row], out_sim[row] = pool[best], pool_sims[best]
    return out_idx, out_sim


def search_brute_force(
    prompt_vectors: np.ndarray, queries: np.ndarray, alpha: int = PAPER_ALPHA, block: int = 4096
):
    """Exact top-alpha by cosine: (indices [Q, a], sims [Q, a]), most similar first, a = min(alpha, P)."""
    x = normalise_rows(prompt_vectors)
    q = normalise_rows(queries)
    a = min(alpha, x.shape[0])
    out_idx = np.empty((q.shape[0], a), dtype=np.int64)
    out_sim = np.empty((q.shape[0], a), dtype=np.float32)
    for lo in range(0, q.shape[0], block):
        sims = q[lo : lo + block] @ x.T
        part = (
            np.argpartition(-sims, a - 1, axis=1)[:, :a]
            if a < x.shape[0]
            else np.tile(np.arange(a), (sims.shape[0], 1))
        )
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        out_idx[lo : lo + block] = np.take_along_axis(part, order, axis=1)
        out_sim[lo : lo + block] = np.take_along_axis(part_sims, order, axis=1)
    return out_idx, out_sim


def _top(sims: np.ndarray, a: int) -> np.ndarray:
    part = np.argpartition(-sims, a - 1)[:a] if a < sims.size else np.arange(sims.size)
    return part[np.argsort(-sims[part], kind="stable")]


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-alpha ids that the approximate search returned. [Q, a] each."""
    hits = [np.intersect1d(a, e).size / e.size for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits))


def softmax_weights(sims: np.ndarray, temperature: float = PAPER_TEMPERATURE) -> np.ndarray:
    """[Q, a] cosines -> [Q, a] weights summing to 1."""
    if temperature <= 0:
        raise MoeServeError(f"SPS temperature must be positive, got {temperature}")
    z = sims.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def predict_activation(
    indices: np.ndarray, sims: np.ndarray, activations: np.ndarray, temperature: float = PAPER_TEMPERATURE
):
    """Softmax-weighted sum of the neighbours' activation matrices. activations: [P, L, K] -> [Q, L, K]."""
    w = softmax_weights(sims, temperature)
    return np.einsum("qa,qalk->qlk", w, activations[indices], optimize=True).astype(np.float32)


@dataclass(frozen=True)
class SpsPredictor:
    """The per-request API: prompt vector(s) -> predicted prefill and decode activation [Q, L, K]."""

    tree: SpsTree
    prefill: np.ndarray  # [P, L, K]
    decode: np.ndarray  # [P, L, K] (the prefill matrices when the trace has no decode activation)
    alpha: int = PAPER_ALPHA
    temperature: float = PAPER_TEMPERATURE
    probe_leaves: int = 1

    @classmethod
    def build(
        cls,
        prompt_vectors: np.ndarray,
        prefill: np.ndarray,
        decode: np.ndarray | None = None,
        alpha: int = PAPER_ALPHA,
        temperature: float = PAPER_TEMPERATURE,
        leaf_size: int = PAPER_LEAF_SIZE,
        fanout: int = 8,
        seed: int = 0,
        routing: str = "medoid",
        probe_leaves: int = 1,
    ) -> SpsPredictor:
        validate_history(prompt_vectors, prefill, decode)
        tree = build_sps_tree(prompt_vectors, leaf_size=leaf_size, fanout=fanout, seed=seed, routing=routing)
        return cls(tree, prefill, prefill if decode is None else decode, alpha, temperature, probe_leaves)

    def predict(self, prompt_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx, sims = search_tree(self.tree, prompt_vectors, self.alpha, self.probe_leaves)
        return (
            predict_activation(idx, sims, self.prefill, self.temperature),
            predict_activation(idx, sims, self.decode, self.temperature),
        )


def validate_history(
    prompt_vectors: np.ndarray, prefill: np.ndarray, decode: np.ndarray | None = None
) -> None:
    """Shapes must agree: vectors [P, d], prefill (and decode) [P, L, K], P > 0."""
    if prompt_vectors.ndim != 2 or prompt_vectors.shape[0] == 0:
        raise MoeServeError("the trace has no prompts (prompt vectors must be [prompts > 0, dim])")
    if prefill.ndim != 3 or prefill.shape[0] != prompt_vectors.shape[0]:
        raise MoeServeError(
            f"prefill activation must be [prompts, layers, experts] with {prompt_vectors.shape[0]} prompts, got {prefill.shape}"
        )
    if decode is not None and decode.shape != prefill.shape:
        raise MoeServeError(f"decode activation shape {decode.shape} differs from prefill {prefill.shape}")
