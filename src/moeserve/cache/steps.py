"""Per-step expert sets: what a decoding step needs resident when several tokens are processed together."""

from __future__ import annotations

import numpy as np

from moeserve.errors import MoeServeError

# Bound on the [chunk, layers, experts] presence matrix built at once (elements).
_PRESENCE_CHUNK_ELEMENTS = 1 << 25


def step_expert_sets(routing: np.ndarray, step_of_token: np.ndarray, num_experts: int) -> np.ndarray:
    """Union of the experts of the tokens of each step, per layer.

    routing: [tokens, layers, top_k] int expert ids in [0, num_experts)
    step_of_token: [tokens] int, non-decreasing; tokens with equal values form one step (gaps are ignored:
        the k-th distinct value is step k)
    returns: [steps, layers, max_union] int64, each row sorted ascending and padded with -1 at the end;
        max_union is the largest union over all steps and layers.
    """
    routing = np.asarray(routing)
    step_of_token = np.asarray(step_of_token)
    if routing.ndim != 3 or routing.shape[0] == 0 or not np.issubdtype(routing.dtype, np.integer):
        raise MoeServeError("routing must be a non-empty integer array [tokens, layers, top_k]")
    if step_of_token.shape != (routing.shape[0],) or not np.issubdtype(step_of_token.dtype, np.integer):
        raise MoeServeError("step_of_token must be an integer array with one entry per token")
    if np.any(np.diff(step_of_token) < 0):
        raise MoeServeError("step_of_token must be non-decreasing (tokens are in serving order)")
    if routing.min() < 0 or routing.max() >= num_experts:
        raise MoeServeError(f"routing holds expert ids outside [0, {num_experts})")

    tokens, layers, _ = routing.shape
    step_first_token = np.flatnonzero(np.r_[True, step_of_token[1:] != step_of_token[:-1]])
    step_index = np.cumsum(np.r_[False, step_of_token[1:] != step_of_token[:-1]])
    steps = len(step_first_token)
    layer_index = np.arange(layers)[None, :, None]

    group_sizes = np.diff(np.r_[step_first_token, tokens])
    width_bound = min(num_experts, routing.shape[2] * int(group_sizes.max()))
    sets = np.full((steps, layers, width_bound), -1, dtype=np.int64)
    width = 0
    chunk = max(1, _PRESENCE_CHUNK_ELEMENTS // (layers * num_experts))
    for first_step in range(0, steps, chunk):
        last_step = min(first_step + chunk, steps)
        token_lo = step_first_token[first_step]
        token_hi = step_first_token[last_step] if last_step < steps else tokens
        present = np.zeros((last_step - first_step, layers, num_experts), dtype=bool)
        local_step = (step_index[token_lo:token_hi] - first_step)[:, None, None]
        present[local_step, layer_index, routing[token_lo:token_hi]] = True
        slot_of = np.cumsum(present, axis=2) - 1
        width = max(width, int(slot_of[:, :, -1].max()) + 1)
        step, layer, expert = np.nonzero(present)  # row-major: experts ascend within each (step, layer)
        sets[first_step + step, layer, slot_of[step, layer, expert]] = expert
    if width < width_bound:
        sets = np.ascontiguousarray(sets[:, :, :width])
    return sets


def consecutive_steps(
    num_tokens: int, tokens_per_step: int, request_starts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Group each request's consecutive tokens into steps of `tokens_per_step` (chunked prefill style).

    returns: (step_of_token [tokens] int64, step_request_starts [requests] int64: the step at which each
        request starts, to pass as `request_starts` with the step sets)
    """
    if tokens_per_step < 1:
        raise MoeServeError("tokens_per_step must be >= 1")
    starts = np.zeros(1, dtype=np.int64) if request_starts is None else np.asarray(request_starts, np.int64)
    ends = np.r_[starts[1:], num_tokens]
    steps_per_request = -(-(ends - starts) // tokens_per_step)
    step_request_starts = np.r_[0, np.cumsum(steps_per_request)[:-1]].astype(np.int64)
    request_of_token = np.repeat(np.arange(len(starts)), ends - starts)
    offset_in_request = np.arange(num_tokens) - starts[request_of_token]
    step_of_token = step_request_starts[request_of_token] + offset_in_request // tokens_per_step
    return step_of_token, step_request_starts


def split_step(experts: np.ndarray, capacity: int) -> list[np.ndarray]:
    """The order in which a serving engine with `capacity` residents per layer brings in one step's experts.

    experts: [n] int, the distinct experts one layer needs in one forward, ascending -> chunks of at most
    `capacity` ids, in order, each one cache step (a prefill needs more experts than fit: they stream
    through the cache a chunk at a time). `chunked_step_sets` applies the same rule to a whole trace.
    """
    return [experts[i:i + capacity] for i in range(0, len(experts), capacity)] if capacity >= 1 else []


def chunked_step_sets(expert_sets: np.ndarray, capacity: int) -> np.ndarray:
    """Step sets as an engine with `capacity` residents per layer executes them (`split_step` per row).

    expert_sets: [steps, layers, width] int (rows ascending, -1 padding: `step_expert_sets` output) ->
    [cache_steps, layers, min(width, capacity)] int64: each step becomes max over layers of
    ceil(|set| / capacity) cache steps; a layer with fewer chunks gets rows of -1 (no access), which
    change no policy's choices.
    """
    sets = np.asarray(expert_sets)
    if capacity < 1:
        raise MoeServeError("capacity must be >= 1")
    width = min(sets.shape[2], capacity)
    rows: list[np.ndarray] = []
    for step in sets:
        chunks = [split_step(row[row >= 0], capacity) for row in step]
        for c in range(max(1, max(len(ch) for ch in chunks))):
            block = np.full((sets.shape[1], width), -1, dtype=np.int64)
            for layer, ch in enumerate(chunks):
                if c < len(ch):
                    block[layer, :len(ch[c])] = ch[c]
            rows.append(block)
    return np.stack(rows)
