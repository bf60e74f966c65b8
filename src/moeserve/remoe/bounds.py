"""Upper bounds on the tokens a set of experts receives in one layer under top-k routing [IV-C].

n tokens each pick k distinct experts out of K. For a set S of m experts, X_S counts (token, expert)
pairs routed into S; X_S <= n * min(k, m) always. All bounds here hold with probability >= 1 - delta
under a stated model (docs/remoe.md derives each one):

- uniform: tokens i.i.d., each picks a uniformly random k-subset. A fixed set gets a Bernstein bound with
  the hypergeometric variance; "any m experts" (the top-m order statistic) takes the better of a union
  bound over all C(K, m) sets and m times a union bound on the busiest single expert.
- predicted: tokens i.i.d. with known inclusion probabilities pi_e = P(e in a token's top-k), sum k.
  A fixed set: Bernstein with the variance bound mu * (min(k, m) - mu); any m experts: top-m of the
  per-expert Bernstein bounds taken at delta / K (union bound).
- empirical: no routing model; prompts are exchangeable with history prompts. The bound is the split-
  conformal quantile of the history's shares, i.e. the ceil((N+1)(1-delta))-th smallest of N scores.

The paper's bound sqrt(3n)/2 + n/K is `paper_bound`; it assumes uniform top-1 routing and its
confidence is 1 - exp(-3/2) = 78% for one fixed set, not 95% (docs/remoe.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moeserve.errors import MoeServeError


def bernstein_excess(tokens: np.ndarray | float, variance, max_excess, log_inv_delta) -> np.ndarray:
    """t with P(sum of `tokens` i.i.d. terms - mean >= t) <= delta by Bernstein's inequality.

    Each term has the given variance and exceeds its mean by at most max_excess:
    exp(-t^2 / (2 (n var + M t / 3))) = delta  =>  t = M L / 3 + sqrt((M L / 3)^2 + 2 n var L).
    """
    n = np.asarray(tokens, dtype=np.float64)
    third = np.asarray(max_excess, dtype=np.float64) * log_inv_delta / 3.0
    return third + np.sqrt(third**2 + 2.0 * n * np.asarray(variance, dtype=np.float64) * log_inv_delta)


def log_binomial(n: int, k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    return math.lgamma(n + 1) - lg(k + 1) - lg(n - k + 1)


def paper_bound(tokens: np.ndarray | float, experts: int, m: np.ndarray | int) -> np.ndarray:
    """The paper's MMP bound, read for a set of m experts: n m / K + sqrt(3 n) / 2 (m = 1: sqrt(3n)/2 + n/K)."""
    n = np.asarray(tokens, dtype=np.float64)
    return n * np.asarray(m, dtype=np.float64) / experts + np.sqrt(3.0 * n) / 2.0


def uniform_set_bound(tokens, experts: int, top_k: int, m, delta: float, log_sets=0.0) -> np.ndarray:
    """Bound on X_S for a fixed set of m experts under uniform top-k routing (log_sets adds a union over sets)."""
    n = np.asarray(tokens, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    k, big_k = float(top_k), float(experts)
    frac = m / big_k
    mean = k * frac
    finite_population = (big_k - k) / (big_k - 1.0) if experts > 1 else 0.0
    variance = k * frac * (1.0 - frac) * finite_population
    cap = np.minimum(k, m)
    bound = n * mean + bernstein_excess(n, variance, cap - mean, log_sets + math.log(1.0 / delta))
    return np.minimum(bound, n * cap)


def uniform_topm_bound(tokens, experts: int, top_k: int, m, delta: float) -> np.ndarray:
    """Bound on the tokens the busiest m experts receive (any m experts) under uniform top-k routing."""
    m = np.asarray(m, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    over_sets = uniform_set_bound(n, experts, top_k, m, delta / 2.0, log_sets=log_binomial(experts, m))
    p = top_k / experts
    busiest = n * p + bernstein_excess(n, p * (1.0 - p), 1.0 - p, math.log(2.0 * experts / delta))
    return np.minimum(np.minimum(over_sets, m * busiest), n * np.minimum(float(top_k), m))


def predicted_set_bound(
    tokens, inclusion: np.ndarray, members: np.ndarray, top_k: int, delta: float
) -> float:
    """Bound on X_S for a fixed set S under i.i.d. tokens with inclusion probabilities `inclusion: [K]`."""
    m = int(np.asarray(members).size)
    if m == 0:
        return 0.0
    cap = float(min(top_k, m))
    mean = float(np.clip(inclusion[members].sum(), 0.0, cap))
    # Y = |top-k ∩ S| lies in [0, cap], so E[Y^2] <= cap * E[Y] and Var(Y) <= mean * (cap - mean).
    excess = bernstein_excess(tokens, mean * (cap - mean), cap - mean, math.log(1.0 / delta))
    return float(min(tokens * mean + excess, tokens * cap))


def predicted_expert_bounds(tokens, inclusion: np.ndarray, delta_each: float) -> np.ndarray:
    """Per-expert Bernstein bounds on Binomial(n, pi_e) counts, each at confidence 1 - delta_each. [..., K]"""
    p = np.clip(np.asarray(inclusion, dtype=np.float64), 0.0, 1.0)
    bound = tokens * p + bernstein_excess(tokens, p * (1.0 - p), 1.0 - p, math.log(1.0 / delta_each))
    return np.minimum(bound, float(tokens))


def predicted_topm_bound(tokens, inclusion: np.ndarray, top_k: int, m: int, delta: float) -> float:
    """Bound on the busiest m experts' tokens: top-m of per-expert bounds at delta / K (union bound)."""
    experts = inclusion.shape[-1]
    per_expert = np.sort(predicted_expert_bounds(tokens, inclusion, delta / experts))[::-1]
    return float(min(per_expert[:m].sum(), tokens * min(top_k, m)))


def conformal_rank(samples: int, delta: float) -> int | None:
    """1-based rank j = ceil((N+1)(1-delta)) whose order statistic bounds a new exchangeable score; None if j > N."""
    j = math.ceil((samples + 1) * (1.0 - delta) - 1e-9)
    return j if j <= samples else None


def conformal_upper(scores: np.ndarray, delta: float, axis: int = 0) -> np.ndarray:
    """The conformal (1 - delta) upper bound along `axis`; +inf where too few samples for that delta."""
    n = scores.shape[axis]
    j = conformal_rank(n, delta)
    if j is None:
        shape = list(scores.shape)
        del shape[axis]
        return np.full(shape, np.inf)
    return np.take(np.partition(scores, j - 1, axis=axis), j - 1, axis=axis)


def topm_loads(counts: np.ndarray, m: int) -> np.ndarray:
    """Tokens the busiest m experts receive: counts [..., K] -> [...]."""
    if m <= 0:
        return np.zeros(counts.shape[:-1])
    k = counts.shape[-1]
    return np.partition(counts, k - m, axis=-1)[..., k - m :].sum(-1)


def coverage(loads: np.ndarray, bounds: np.ndarray) -> float:
    """Share of cases where the actual load is within its bound."""
    return float(np.mean(np.asarray(loads) <= np.asarray(bounds) + 1e-9))


class LoadBound(Protocol):
    """What the planner needs from a bound; every method returns tokens at confidence 1 - delta per call."""

    def set_upper(self, layer: int, members: np.ndarray, tokens: int, delta: float) -> float: ...

    def partition_upper(
        self, layer: int, members: np.ndarray, part: np.ndarray, bins: int, tokens: int, delta: float
    ) -> np.ndarray:
        """Bound per block of a partition of `members` (block of members[i] is part[i]): [bins]."""
        ...

    def nested_upper(self, order: np.ndarray, tokens: int, delta: float) -> np.ndarray: ...

    def expert_upper(self, tokens: int, delta: float) -> np.ndarray: ...


@dataclass(frozen=True)
class UniformRoutingBound:
    """Bounds under uniform top-k routing (the paper's model, generalised from top-1 to top-k)."""

    layers: int
    experts: int
    top_k: int

    def set_upper(self, layer: int, members: np.ndarray, tokens: int, delta: float) -> float:
        return float(uniform_set_bound(tokens, self.experts, self.top_k, np.asarray(members).size, delta))

    def partition_upper(
        self, layer: int, members: np.ndarray, part: np.ndarray, bins: int, tokens: int, delta: float
    ) -> np.ndarray:
        return uniform_set_bound(tokens, self.experts, self.top_k, np.bincount(part, minlength=bins), delta)

    def nested_upper(self, order: np.ndarray, tokens: int, delta: float) -> np.ndarray:
        """order: [L, K] -> [L, K+1], bound on the first j experts of each layer's order."""
        row = uniform_set_bound(tokens, self.experts, self.top_k, np.arange(self.experts + 1), delta)
        return np.broadcast_to(row, (order.shape[0], self.experts + 1)).copy()

    def expert_upper(self, tokens: int, delta: float) -> np.ndarray:
        one = float(uniform_set_bound(tokens, self.experts, self.top_k, 1, delta))
        return np.full((self.layers, self.experts), one)


@dataclass(frozen=True)
class PredictedRoutingBound:
    """Bounds under i.i.d. tokens routed with known inclusion probabilities `inclusion: [L, K]` (rows sum to k)."""

    inclusion: np.ndarray
    top_k: int

    @classmethod
    def from_shares(cls, shares: np.ndarray, top_k: int) -> PredictedRoutingBound:
        """shares: [L, K] rows summing to 1 (an activation matrix) -> inclusion k * share, capped at 1."""
        return cls(inclusion=np.minimum(np.asarray(shares, dtype=np.float64) * top_k, 1.0), top_k=top_k)

    def set_upper(self, layer: int, members: np.ndarray, tokens: int, delta: float) -> float:
        return predicted_set_bound(tokens, self.inclusion[layer], np.asarray(members), self.top_k, delta)

    def partition_upper(
        self, layer: int, members: np.ndarray, part: np.ndarray, bins: int, tokens: int, delta: float
    ) -> np.ndarray:
        cap = np.minimum(float(self.top_k), np.bincount(part, minlength=bins).astype(np.float64))
        mean = np.minimum(np.bincount(part, weights=self.inclusion[layer, members], minlength=bins), cap)
        excess = bernstein_excess(tokens, mean * (cap - mean), cap - mean, math.log(1.0 / delta))
        return np.minimum(tokens * mean + excess, tokens * cap)

    def nested_upper(self, order: np.ndarray, tokens: int, delta: float) -> np.ndarray:
        inc = np.take_along_axis(self.inclusion, order, axis=1)
        mean = np.concatenate([np.zeros((order.shape[0], 1)), np.cumsum(inc, axis=1)], axis=1)
        cap = np.minimum(float(self.top_k), np.arange(order.shape[1] + 1, dtype=np.float64))[None, :]
        mean = np.minimum(mean, cap)
        excess = bernstein_excess(tokens, mean * (cap - mean), cap - mean, math.log(1.0 / delta))
        return np.minimum(tokens * mean + excess, tokens * cap)

    def expert_upper(self, tokens: int, delta: float) -> np.ndarray:
        return predicted_expert_bounds(tokens, self.inclusion, delta)


@dataclass(frozen=True)
class EmpiricalRoutingBound:
    """Model-free bounds from history shares `shares: [N, L, K]` (each prompt's per-layer activation, rows sum 1).

    Valid for a new prompt exchangeable with the history; coverage is marginal over prompt lengths, since a
    share bound is scaled by n * k for a prompt of n tokens. nested_upper holds [N, L, K+1] float64 in
    memory: subsample large histories. Per-set bounds at delta / (2 L z) need N >= 2 L z / delta prompts.
    """

    shares: np.ndarray
    top_k: int

    def __post_init__(self) -> None:
        if self.shares.ndim != 3 or self.shares.shape[0] == 0:
            raise MoeServeError(
                "empirical bound needs history shares [prompts, layers, experts] with prompts > 0"
            )

    def _scale(self, share_bound: np.ndarray, tokens: int, m: np.ndarray) -> np.ndarray:
        cap = tokens * np.minimum(float(self.top_k), m)
        return np.minimum(share_bound * tokens * self.top_k, cap)

    def set_upper(self, layer: int, members: np.ndarray, tokens: int, delta: float) -> float:
        members = np.asarray(members)
        scores = self.shares[:, layer, members].sum(axis=1, dtype=np.float64)
        return float(self._scale(conformal_upper(scores, delta), tokens, np.float64(members.size)))

    def partition_upper(
        self, layer: int, members: np.ndarray, part: np.ndarray, bins: int, tokens: int, delta: float
    ) -> np.ndarray:
        onehot = np.zeros((np.asarray(members).size, bins))
        onehot[np.arange(onehot.shape[0]), part] = 1.0
        scores = self.shares[:, layer, members].astype(np.float64) @ onehot  # [N, bins]
        sizes = np.bincount(part, minlength=bins).astype(np.float64)
        return self._scale(conformal_upper(scores, delta), tokens, sizes)

    def nested_upper(self, order: np.ndarray, tokens: int, delta: float) -> np.ndarray:
        sorted_shares = np.take_along_axis(self.shares, order[None, :, :], axis=2)
        cum = np.cumsum(sorted_shares, axis=2, dtype=np.float64)
        upper = np.concatenate([np.zeros((order.shape[0], 1)), conformal_upper(cum, delta, axis=0)], axis=1)
        return self._scale(upper, tokens, np.arange(order.shape[1] + 1, dtype=np.float64)[None, :])

    def expert_upper(self, tokens: int, delta: float) -> np.ndarray:
        return self._scale(
            conformal_upper(self.shares.astype(np.float64), delta, axis=0), tokens, np.float64(1.0)
        )

    def topm_upper(self, m: int, tokens: int, delta: float) -> np.ndarray:
        """Any-m bound per layer: conformal quantile of each prompt's top-m share. [L]"""
        scores = topm_loads(self.shares.astype(np.float64), m)
        return self._scale(conformal_upper(scores, delta), tokens, np.float64(m))


@dataclass(frozen=True)
class RoutingHistory:
    """Recorded prompts (actual routing) for a model-free TTFT bound: the split-conformal quantile of the
    TTFT each history prompt would have had under the plan. For a new request exchangeable with the
    history (same length and routing distribution), TTFT <= that bound with probability >= 1 - delta;
    no routing model and no union bound over layers or replicas is involved."""

    shares: np.ndarray  # [N, L, K] float32, per-prompt activation (rows sum to 1)
    prompt_tokens: np.ndarray  # [N] float64

    @classmethod
    def from_trace(
        cls, shares: np.ndarray, prompt_tokens: np.ndarray, max_prompts: int = 512, seed: int = 0
    ) -> RoutingHistory:
        shares = np.asarray(shares)
        tokens = np.asarray(prompt_tokens, dtype=np.float64)
        if shares.ndim != 3 or shares.shape[0] == 0 or tokens.shape != (shares.shape[0],):
            raise MoeServeError(
                f"routing history needs [prompts > 0, layers, experts] shares and [prompts] tokens, got {shares.shape}"
            )
        if shares.shape[0] > max_prompts:
            pick = np.sort(np.random.default_rng(seed).choice(shares.shape[0], max_prompts, replace=False))
            shares, tokens = shares[pick], tokens[pick]
        return cls(np.ascontiguousarray(shares, dtype=np.float32), tokens)

    def counts(self, layer: int, top_k: int) -> np.ndarray:
        """Token-expert pairs per expert of one layer: [N, K] float64."""
        return self.shares[:, layer].astype(np.float64) * (self.prompt_tokens[:, None] * top_k)

    def upper(self, per_prompt: np.ndarray, delta: float) -> float:
        """Conformal (1 - delta) bound of a per-prompt quantity [N] (inf if N < 1/delta - 1)."""
        return float(conformal_upper(np.asarray(per_prompt, dtype=np.float64), delta))
