"""Expert-reuse metrics of a routing trace: consecutive-token overlap and the hit-rate curve over capacity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeserve.cache.simulate import simulate_cache, use_numba
from moeserve.errors import MoeServeError

_OVERLAP_CHUNK_TOKENS = 1 << 14


def overlap_ratio(
    routing: np.ndarray, request_starts: np.ndarray | None = None, *, engine: str = "auto"
) -> np.ndarray:
    """Mean over consecutive tokens of the same request of |E_t ∩ E_t-1| / k, per layer (ReMoE's overlap).

    routing: [tokens, layers, top_k] int, each row a set of distinct expert ids
    request_starts: [requests] int token indices (sorted, first 0); None = one request
    engine: "auto" (numba when installed), "numba" or "numpy"
    returns: [layers] float64 in [0, 1]
    """
    routing = np.asarray(routing)
    if routing.ndim != 3 or 0 in routing.shape or not np.issubdtype(routing.dtype, np.integer):
        raise MoeServeError("routing must be a non-empty integer array [tokens, layers, top_k]")
    tokens, layers, top_k = routing.shape
    continues = np.ones(tokens, dtype=bool)  # token t pairs with token t-1
    continues[0] = False
    if request_starts is not None:
        starts = np.asarray(request_starts, dtype=np.int64)
        if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= tokens:
            raise MoeServeError(
                "request_starts must be strictly increasing, start at 0 and lie within the trace"
            )
        continues[starts] = False
    pairs = int(continues.sum())
    if pairs == 0:
        raise MoeServeError("overlap ratio needs a request of at least two tokens")

    if routing.min() < 0:
        raise MoeServeError("routing holds negative expert ids")
    if use_numba(engine):
        from moeserve.cache import _numba_kernel

        shared = _numba_kernel.shared_expert_counts(routing, continues, int(routing.max()) + 1)
    else:
        shared = _shared_expert_counts(routing, continues)
    return shared / (pairs * top_k)


def _shared_expert_counts(routing: np.ndarray, continues: np.ndarray) -> np.ndarray:
    """numpy version of `_numba_kernel.shared_expert_counts`: [layers] int64."""
    tokens, layers, top_k = routing.shape
    shared = np.zeros(layers, dtype=np.int64)
    for lo in range(1, tokens, _OVERLAP_CHUNK_TOKENS):
        hi = min(lo + _OVERLAP_CHUNK_TOKENS, tokens)
        current = np.ascontiguousarray(np.moveaxis(routing[lo:hi], 2, 0))  # [top_k, chunk, layers]
        previous = np.ascontiguousarray(np.moveaxis(routing[lo - 1 : hi - 1], 2, 0))
        matches = np.zeros(current.shape[1:], dtype=np.int64)
        for i in range(top_k):
            for j in range(top_k):
                matches += current[i] == previous[j]
        shared += matches[continues[lo:hi]].sum(axis=0)
    return shared


def hit_rate_curve(
    expert_sets: np.ndarray,
    capacities: Sequence[int],
    policy: str,
    num_experts: int,
    *,
    request_starts: np.ndarray | None = None,
    warm: bool = False,
    engine: str = "auto",
) -> np.ndarray:
    """Hit rate per layer at each capacity: [len(capacities), layers] float64.

    Same inputs as `simulate_cache`; one simulation per capacity.
    """
    if len(capacities) == 0:
        raise MoeServeError("hit_rate_curve needs at least one capacity")
    return np.stack(
        [
            simulate_cache(
                expert_sets,
                num_experts,
                int(capacity),
                policy,
                request_starts=request_starts,
                warm=warm,
                engine=engine,
            ).hit_rate
            for capacity in capacities
        ]
    )
