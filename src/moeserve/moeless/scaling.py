"""Straggler detection and expert scaling (MoEless, arXiv 2603.06350, expert scaling).

A straggler is an expert whose (predicted) load is far above its layer's mean: every token of the
layer waits for it. Scaling gives such experts extra copies; a copy of an expert with load L and
c copies serves L / c tokens (engines split an expert's tokens evenly over its copies).

Why the greedy rule is optimal for "minimise the heaviest copy under a budget of N copies"
(tests/moeless/test_scaling.py checks it against brute force): let greedy stop with maximum
M = L_a / c_a. The maximum never rises while greedy runs, so whenever greedy gave expert e its
c_e-th copy (c_e > 1), L_e / (c_e - 1) was the maximum then, hence >= M. Any allocation c' with
maximum < M therefore needs c'_e >= c_e for every e (one copy fewer already reaches M), and
c'_a >= c_a + 1: it spends more than N copies. With a per-expert cap the same argument holds after
dropping capped experts, whose L_e / cap is a lower bound for every allocation.
"""

from __future__ import annotations

import numpy as np

from moeserve.defaults import STRAGGLER_THRESHOLD
from moeserve.errors import MoeServeError


def detect_stragglers(loads: np.ndarray, threshold: float = STRAGGLER_THRESHOLD) -> np.ndarray:
    """Experts whose load exceeds `threshold` x the layer mean. loads: [..., E] -> [..., E] bool."""
    if threshold <= 0:
        raise MoeServeError(f"straggler threshold must be positive, got {threshold}")
    return loads > threshold * loads.mean(-1, keepdims=True)


def replicas_under_budget(loads: np.ndarray, total_replicas: int, max_per_expert: int | None = None) -> np.ndarray:
    """Copies per expert minimising the heaviest copy, `total_replicas` copies per layer in all.

    loads: [L, E] or [E] float -> copies, same shape, int, each >= 1 and <= max_per_expert.
    Copies beyond what the cap allows are left unspent.
    """
    loads = np.asarray(loads, dtype=np.float64)
    flat = loads.reshape(-1, loads.shape[-1])
    rows, num_experts = flat.shape
    if total_replicas < num_experts:
        raise MoeServeError(f"a budget of {total_replicas} copies cannot hold {num_experts} experts")
    cap = np.inf if max_per_expert is None else max_per_expert
    if cap < 1:
        raise MoeServeError("each expert needs room for at least one copy")
    copies = np.ones((rows, num_experts), dtype=np.int64)
    row = np.arange(rows)
    for _ in range(total_replicas - num_experts):
        per_copy = np.where(copies < cap, flat / copies, -np.inf)
        heaviest = np.argmax(per_copy, axis=1)
        can_grow = np.isfinite(per_copy[row, heaviest])
        copies[row[can_grow], heaviest[can_grow]] += 1
    return copies.reshape(loads.shape)


def replicas_under_target(loads: np.ndarray, target_per_copy: np.ndarray | float,
                          max_per_expert: int | None = None) -> np.ndarray:
    """Fewest copies bringing every copy to <= target tokens (each expert independently: ceil(L / T)).

    loads: [..., E]; target_per_copy: broadcastable to [..., 1] -> copies [..., E] int, >= 1.
    Where the cap stops an expert from reaching the target it gets the cap.
    """
    target = np.asarray(target_per_copy, dtype=np.float64)
    if (target <= 0).any():
        raise MoeServeError("the per-copy load target must be positive")
    copies = np.maximum(1, np.ceil(np.asarray(loads, dtype=np.float64) / target - 1e-9)).astype(np.int64)
    return copies if max_per_expert is None else np.minimum(copies, max_per_expert)


def max_copy_load(loads: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Heaviest copy of each layer. [..., E], [..., E] -> [...]."""
    return (loads / copies).max(-1)


def replica_budget_for_cost(cost_per_s: float, expert_gb: float, price_per_gb_s: float) -> int:
    """How many expert copies a serverless budget of `cost_per_s` keeps alive."""
    if expert_gb <= 0 or price_per_gb_s <= 0:
        raise MoeServeError("a cost budget needs a positive expert size and price")
    return int(np.floor(cost_per_s / (expert_gb * price_per_gb_s) + 1e-9))
