"""Expert-cache simulation on routing traces (LRU, LFU, Belady) and expert-reuse metrics."""

from moeserve.cache.online import ONLINE_POLICIES, OnlinePolicy, StepOutcome
from moeserve.cache.reuse import hit_rate_curve, overlap_ratio
from moeserve.cache.simulate import POLICIES, numba_available, simulate_cache
from moeserve.cache.stats import CacheStats
from moeserve.cache.steps import chunked_step_sets, consecutive_steps, split_step, step_expert_sets

__all__ = [
    "ONLINE_POLICIES",
    "OnlinePolicy",
    "StepOutcome",
    "chunked_step_sets",
    "split_step",
    "POLICIES",
    "CacheStats",
    "consecutive_steps",
    "hit_rate_curve",
    "numba_available",
    "overlap_ratio",
    "simulate_cache",
    "step_expert_sets",
]
