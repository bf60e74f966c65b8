"""Pure-numpy simulator: steps in a Python loop, all layers advanced together on [layers, experts] state.

Exact and identical to `_numba_kernel.py`, but each step costs tens of microseconds of numpy calls, so a
million steps take about a minute per policy: the fallback when numba is not installed.
"""

from __future__ import annotations

import numpy as np

LRU, LFU, BELADY = 0, 1, 2
_KEEP = np.iinfo(np.int64).max  # eviction key of an expert that may not be evicted


class StepTooLargeError(ValueError):
    pass


def _next_use(sets: np.ndarray, is_start: np.ndarray, warm: bool, num_experts: int) -> np.ndarray:
    """`[steps, layers, width] int64`: next step using the same expert in the same layer (steps = never)."""
    steps, layers, width = sets.shape
    rows = np.arange(layers)[:, None]
    next_use = np.empty(sets.shape, dtype=np.int64)
    last = np.full((layers, num_experts + 1), steps, dtype=np.int64)
    for t in range(steps - 1, -1, -1):
        slot = np.where(sets[t] >= 0, sets[t], num_experts)
        next_use[t] = last[rows, slot]
        last[rows, slot] = t
        if is_start[t] and not warm:
            last.fill(steps)
    return next_use


def simulate_layers(
    sets: np.ndarray, starts: np.ndarray, capacity: int, num_experts: int, policy: int, warm: bool
) -> np.ndarray:
    """sets: [steps, layers, width] int (-1 = padding) -> [layers, 3] int64 (accesses, hits, compulsory)."""
    steps, layers, width = sets.shape
    E = num_experts
    rows = np.arange(layers)[:, None]
    is_start = np.zeros(steps, dtype=bool)
    is_start[starts] = True
    next_use = _next_use(sets, is_start, warm, E) if policy == BELADY else None
    frequency_scale = (steps + 1) * E

    # column E is a dummy slot that padding writes into; it is never resident
    resident = np.zeros((layers, E + 1), dtype=bool)
    seen = np.zeros((layers, E + 1), dtype=bool)
    count = np.zeros((layers, E + 1), dtype=np.int64)
    key = np.zeros((layers, E + 1), dtype=np.int64)
    stamp = np.full((layers, E + 1), -1, dtype=np.int64)
    size = np.zeros(layers, dtype=np.int64)
    out = np.zeros((layers, 3), dtype=np.int64)

    for t in range(steps):
        if is_start[t] and (t == 0 or not warm):
            resident.fill(False)
            seen.fill(False)
            count.fill(0)
            size.fill(0)
        order = np.argsort(sets[t], axis=1, kind="stable")
        ids = np.take_along_axis(sets[t], order, axis=1).astype(np.int64)
        valid = ids >= 0
        valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        step_size = valid.sum(axis=1)
        if np.any(step_size > capacity):
            raise StepTooLargeError(int(step_size.max()))
        slot = np.where(valid, ids, E)
        hit = resident[rows, slot] & valid
        out[:, 0] += step_size
        out[:, 1] += hit.sum(axis=1)
        out[:, 2] += (valid & ~seen[rows, slot]).sum(axis=1)
        seen[rows, slot] = True
        stamp[rows, slot] = t

        if policy == LRU:
            key[rows, slot] = t * E + slot
        elif policy == LFU:
            count[rows, slot] += 1  # each real expert at most once per row; the dummy slot is ignored
            key[rows, slot] = count[rows, slot] * frequency_scale + t * E + slot
        else:
            next_step = np.take_along_axis(next_use[t], order, axis=1)
            key[rows, slot] = -(next_step * E + (E - 1 - slot))
        resident[rows, slot] = True
        resident[:, E] = False
        size += step_size - hit.sum(axis=1)

        excess = size - capacity
        lanes = np.flatnonzero(excess > 0)
        if len(lanes) == 0:
            continue
        evictable = resident[lanes, :E] & (stamp[lanes, :E] != t)
        victim_key = np.where(evictable, key[lanes, :E], _KEEP)
        most = int(excess[lanes].max())
        smallest = np.argpartition(victim_key, most - 1, axis=1)[:, :most]
        ranked = np.take_along_axis(smallest, np.argsort(np.take_along_axis(victim_key, smallest, 1), 1), 1)
        evict = np.arange(most)[None, :] < excess[lanes][:, None]
        resident[np.broadcast_to(lanes[:, None], ranked.shape)[evict], ranked[evict]] = False
        size[lanes] = capacity
    return out
