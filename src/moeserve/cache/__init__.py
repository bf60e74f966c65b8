"""Expert-cache simulation on routing traces (LRU, LFU, Belady) and expert-reuse metrics."""

from moeserve.cache.reuse import hit_rate_curve, overlap_ratio
from moeserve.cache.simulate import POLICIES, numba_available, simulate_cache
from moeserve.cache.stats import CacheStats
from moeserve.cache.steps import consecutive_steps, step_expert_sets

__all__ = [
    "POLICIES",
    "CacheStats",
    "consecutive_steps",
    "hit_rate_curve",
    "numba_available",
    "overlap_ratio",
    "simulate_cache",
    "step_expert_sets",
]
