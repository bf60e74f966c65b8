"""Pure-numpy simulator: steps in a Python loop, all layers advanced together on [layers, experts] state.

Exact and identical to `_numba_kernel.py`, but each step costs tens of microseconds of numpy calls, so a
million steps take about a minute per policy: the fallback when numba is not installed. `CacheState` is
the policy itself, one step at a time: `simulate_layers` loops over a trace with it, and the serving
engine's expert cache (`cache.online.OnlinePolicy`) drives the same object as steps happen.
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


class CacheState:
    """One expert cache per layer under one policy (docs/cache-simulation.md), advanced step by step.

    frequency_scale: LFU's key is uses * frequency_scale + step * E + id, so it must exceed every
    step * E + id that occurs (the trace simulator passes (steps + 1) * E).
    resident: [layers, E + 1] bool (column E is a dummy slot that padding writes into; never resident).
    """

    def __init__(self, layers: int, num_experts: int, capacity: int, policy: int, frequency_scale: int):
        E = num_experts
        self.E, self.capacity, self.policy, self.frequency_scale = E, capacity, policy, frequency_scale
        self.rows = np.arange(layers)[:, None]
        self.resident = np.zeros((layers, E + 1), dtype=bool)
        self.seen = np.zeros((layers, E + 1), dtype=bool)
        self.count = np.zeros((layers, E + 1), dtype=np.int64)
        self.key = np.zeros((layers, E + 1), dtype=np.int64)
        self.stamp = np.full((layers, E + 1), -1, dtype=np.int64)
        self.size = np.zeros(layers, dtype=np.int64)

    def reset(self) -> None:
        """Empty every cache (a cold request start): residents, LFU counts, first-use bookkeeping."""
        self.resident.fill(False)
        self.seen.fill(False)
        self.count.fill(0)
        self.size.fill(0)

    def step(self, t: int, ids_t: np.ndarray, next_use_t: np.ndarray | None = None) -> np.ndarray:
        """Step `t` (strictly increasing) needs `ids_t` [layers, width] int (-1 = padding; repeats count once);
        next_use_t: Belady's next step of each slot, same shape. -> [layers, 3] int64 (accesses, hits,
        compulsory misses) of this step; afterwards the step's experts are resident and at most C remain."""
        E, rows, capacity = self.E, self.rows, self.capacity
        order = np.argsort(ids_t, axis=1, kind="stable")
        ids = np.take_along_axis(ids_t, order, axis=1).astype(np.int64)
        valid = ids >= 0
        valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        step_size = valid.sum(axis=1)
        if np.any(step_size > capacity):
            raise StepTooLargeError(int(step_size.max()))
        slot = np.where(valid, ids, E)
        hit = self.resident[rows, slot] & valid
        counts = np.stack([step_size, hit.sum(axis=1), (valid & ~self.seen[rows, slot]).sum(axis=1)], axis=1)
        self.seen[rows, slot] = True
        self.stamp[rows, slot] = t

        if self.policy == LRU:
            self.key[rows, slot] = t * E + slot
        elif self.policy == LFU:
            self.count[rows, slot] += 1  # each real expert at most once per row; the dummy slot is ignored
            self.key[rows, slot] = self.count[rows, slot] * self.frequency_scale + t * E + slot
        else:
            next_step = np.take_along_axis(next_use_t, order, axis=1)
            self.key[rows, slot] = -(next_step * E + (E - 1 - slot))
        self.resident[rows, slot] = True
        self.resident[:, E] = False
        self.size += step_size - counts[:, 1]

        excess = self.size - capacity
        lanes = np.flatnonzero(excess > 0)
        if len(lanes) == 0:
            return counts
        evictable = self.resident[lanes, :E] & (self.stamp[lanes, :E] != t)
        victim_key = np.where(evictable, self.key[lanes, :E], _KEEP)
        most = int(excess[lanes].max())
        smallest = np.argpartition(victim_key, most - 1, axis=1)[:, :most]
        ranked = np.take_along_axis(smallest, np.argsort(np.take_along_axis(victim_key, smallest, 1), 1), 1)
        evict = np.arange(most)[None, :] < excess[lanes][:, None]
        self.resident[np.broadcast_to(lanes[:, None], ranked.shape)[evict], ranked[evict]] = False
        self.size[lanes] = capacity
        return counts


def simulate_layers(
    sets: np.ndarray, starts: np.ndarray, capacity: int, num_experts: int, policy: int, warm: bool
) -> np.ndarray:
    """sets: [steps, layers, width] int (-1 = padding) -> [layers, 3] int64 (accesses, hits, compulsory)."""
    steps, layers, width = sets.shape
    is_start = np.zeros(steps, dtype=bool)
    is_start[starts] = True
    next_use = _next_use(sets, is_start, warm, num_experts) if policy == BELADY else None
    state = CacheState(layers, num_experts, capacity, policy, (steps + 1) * num_experts)
    out = np.zeros((layers, 3), dtype=np.int64)
    for t in range(steps):
        if is_start[t] and (t == 0 or not warm):
            state.reset()
        out += state.step(t, sets[t], None if next_use is None else next_use[t])
    return out
