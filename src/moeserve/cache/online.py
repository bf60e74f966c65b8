"""The cache policies of `simulate_cache`, driven online: one layer's cache as a serving engine uses it.

The engine does not know its future, so the online policies are LRU and LFU (Belady needs the whole
trace: it stays the simulator's ceiling). The state machine is the simulator's own (`_numpy_kernel.
CacheState`, one layer), so a serving engine that sends the same steps gets the same hits, misses and
evictions as `simulate_cache(..., warm=True)` on the recorded routing (docs/expert-cache.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve import defaults
from moeserve.cache._numpy_kernel import LFU, LRU, CacheState
from moeserve.errors import MoeServeError

ONLINE_POLICIES = defaults.EXPERT_CACHE_POLICIES
_CODE = {"lru": LRU, "lfu": LFU}
# LFU keys are uses * 2^40 + step * E + id: exact while step * E < 2^40 and uses < 2^22 (int64). The
# state restarts (every resident dropped, counts cleared) every RESTART_STEPS steps to stay within that.
_FREQUENCY_SCALE = 1 << 40
RESTART_STEPS = 1 << 22


@dataclass(frozen=True)
class StepOutcome:
    """One cache step: hits and misses among the step's experts, and the residents evicted to make room."""

    hits: tuple[int, ...]
    misses: tuple[int, ...]
    evicted: tuple[int, ...]


class OnlinePolicy:
    """At most `capacity` of `num_experts` experts resident, evicted by `policy` ("lru" | "lfu")."""

    def __init__(self, num_experts: int, capacity: int, policy: str = "lru"):
        if policy not in ONLINE_POLICIES:
            raise MoeServeError(f"cache policy {policy!r} cannot run online; choose one of "
                                f"{', '.join(ONLINE_POLICIES)} (belady needs the future: it is the simulator's ceiling)")
        if not 1 <= capacity:
            raise MoeServeError("the expert cache capacity must be >= 1")
        if num_experts > _FREQUENCY_SCALE >> 22:
            raise MoeServeError(f"{num_experts} experts per layer are more than the online cache supports")
        self.num_experts, self.capacity, self.policy = num_experts, min(capacity, num_experts), policy
        self._state = CacheState(1, num_experts, self.capacity, _CODE[policy], _FREQUENCY_SCALE)
        self._t = 0

    def resident(self) -> list[int]:
        return np.flatnonzero(self._state.resident[0, :self.num_experts]).tolist()

    def is_resident(self, expert: int) -> bool:
        return bool(self._state.resident[0, expert])

    def access(self, experts) -> StepOutcome:
        """One step needing `experts` (distinct ids, at most `capacity` of them) -> what hit, missed, left."""
        ids = np.asarray(experts, dtype=np.int64).reshape(1, -1)
        if ids.size > self.capacity:
            raise MoeServeError(f"a cache step needs {ids.size} experts but at most {self.capacity} are resident")
        dropped: tuple[int, ...] = ()
        if self._t == RESTART_STEPS:
            dropped = tuple(self.resident())
            self._state.reset()
            self._t = 0
        before = self._state.resident[0].copy()
        self._state.step(self._t, ids)
        self._t += 1
        after = self._state.resident[0]
        wanted = ids[0].tolist()
        hits = tuple(e for e in wanted if before[e])
        misses = tuple(e for e in wanted if not before[e])
        evicted = tuple(np.flatnonzero(before[:self.num_experts] & ~after[:self.num_experts]).tolist())
        return StepOutcome(hits, misses, dropped + evicted)
