"""What one expert-cache simulation run measured, per layer and in total."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CacheStats:
    """Counts of one simulated run; every array is `[layers]`.

    A fetch is a miss (experts are loaded on demand only, no prefetching), so `fetches == misses`.
    `bytes_moved` is None unless `expert_bytes` was given; `stall_s` is None unless a bandwidth was.
    """

    policy: str
    capacity: int
    warm: bool
    accesses: np.ndarray  # [layers] int64: distinct experts needed per step, summed over steps
    hits: np.ndarray  # [layers] int64
    compulsory_misses: np.ndarray  # [layers] int64: first use in the request (cold) or stream (warm)
    bytes_moved: np.ndarray | None = None  # [layers] int64
    stall_s: np.ndarray | None = None  # [layers] float64

    @property
    def misses(self) -> np.ndarray:
        """`[layers] int64`, compulsory ones included."""
        return self.accesses - self.hits

    @property
    def fetches(self) -> np.ndarray:
        """`[layers] int64` experts loaded into the cache."""
        return self.misses

    @property
    def hit_rate(self) -> np.ndarray:
        """`[layers] float64` hits / accesses (0 for a layer with no access)."""
        return np.divide(self.hits, self.accesses, out=np.zeros(len(self.accesses)), where=self.accesses > 0)

    @property
    def overall_hit_rate(self) -> float:
        total = int(self.accesses.sum())
        return float(self.hits.sum()) / total if total else 0.0

    @property
    def total_fetches(self) -> int:
        return int(self.fetches.sum())

    @property
    def total_bytes_moved(self) -> int | None:
        return None if self.bytes_moved is None else int(self.bytes_moved.sum())

    @property
    def total_stall_s(self) -> float | None:
        return None if self.stall_s is None else float(self.stall_s.sum())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (lists per layer) for reports."""
        per_layer = {
            "accesses": self.accesses,
            "hits": self.hits,
            "misses": self.misses,
            "compulsory_misses": self.compulsory_misses,
            "hit_rate": self.hit_rate,
            "fetches": self.fetches,
            "bytes_moved": self.bytes_moved,
            "stall_s": self.stall_s,
        }
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "warm": self.warm,
            "overall_hit_rate": self.overall_hit_rate,
            "total_fetches": self.total_fetches,
            "total_bytes_moved": self.total_bytes_moved,
            "total_stall_s": self.total_stall_s,
            "per_layer": {name: None if v is None else v.tolist() for name, v in per_layer.items()},
        }
