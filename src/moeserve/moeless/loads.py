"""Expert loads per scheduling window, from routing traces and arrival times."""

from __future__ import annotations

import numpy as np

from moeserve.errors import MoeServeError


def windows_from_arrivals(arrival_s: np.ndarray, window_s: float) -> np.ndarray:
    """Scheduling window of each token: floor((t - first arrival) / window_s). [tokens] -> [tokens] int."""
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    if window_s <= 0:
        raise MoeServeError(f"window length must be positive, got {window_s}")
    if arrival_s.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.floor((arrival_s - arrival_s.min()) / window_s).astype(np.int64)


def loads_from_routing(routing: np.ndarray, window_of_token: np.ndarray, num_experts: int,
                       num_windows: int | None = None) -> np.ndarray:
    """Tokens routed to each expert in each window.

    routing: [tokens, layers, top_k] int (expert ids, -1 = no expert); window_of_token: [tokens] int
    -> loads [windows, layers, experts] float
    """
    routing = np.asarray(routing)
    window_of_token = np.asarray(window_of_token, dtype=np.int64)
    if routing.ndim != 3 or window_of_token.shape != routing.shape[:1]:
        raise MoeServeError("routing must be [tokens, layers, top_k] with one window per token")
    if routing.size and routing.max() >= num_experts:
        raise MoeServeError(f"routing names expert {int(routing.max())} but the model has {num_experts}")
    if window_of_token.size and window_of_token.min() < 0:
        raise MoeServeError("window ids must be non-negative")
    num_tokens, num_layers, top_k = routing.shape
    if num_windows is None:
        num_windows = int(window_of_token.max()) + 1 if num_tokens else 0
    window = np.broadcast_to(window_of_token[:, None, None], routing.shape)
    layer = np.broadcast_to(np.arange(num_layers)[None, :, None], routing.shape)
    used = (routing >= 0) & (window < num_windows)
    flat = (window[used] * num_layers + layer[used]) * num_experts + routing[used]
    counts = np.bincount(flat, minlength=num_windows * num_layers * num_experts)
    return counts.reshape(num_windows, num_layers, num_experts).astype(np.float64)


def shares(loads: np.ndarray) -> np.ndarray:
    """Loads normalised to sum to 1 over experts (even where a row is all zero). [..., E] -> [..., E]."""
    total = loads.sum(-1, keepdims=True)
    return np.where(total > 0, loads / np.where(total > 0, total, 1.0), 1.0 / loads.shape[-1])
