"""Longest Processing Time first: split a layer's remote experts over z replicas by predicted load [IV-E].

LPT sorts jobs by load, largest first, and gives each to the currently least-loaded bin. Graham (1969):
its makespan is at most (4/3 - 1/(3z)) times the optimum, and it is optimal when there are at most
z jobs, one bin, or (a classical result) at most 2z jobs. `optimal_partition` is the exhaustive
reference the tests compare against.
"""

from __future__ import annotations

import heapq
import sys

import numpy as np

from moeserve.errors import MoeServeError

COMPILED_FROM_JOBS = 128  # layers with at least this many remote experts use the compiled LPT


def lpt_partition(loads: np.ndarray, bins: int, capacity: int | None = None,
                  order: np.ndarray | None = None) -> np.ndarray:
    """loads: [m] -> bin of each job [m] int64 in 0..bins-1.

    Ties go to the lower job index and the lower bin index. `capacity` caps the jobs per bin (a
    replica's memory holds only so many experts); with a cap the 4/3 guarantee no longer applies.
    `order`: the jobs by load, largest first (ties: lower index), when the caller has it already.
    """
    loads = np.asarray(loads, dtype=np.float64)
    if bins < 1:
        raise MoeServeError(f"need at least one replica, got {bins}")
    if capacity is not None and capacity * bins < loads.size:
        raise MoeServeError(f"{loads.size} experts do not fit {bins} replicas of {capacity} experts each")
    order = np.argsort(-loads, kind="stable") if order is None else order
    cap = -1 if capacity is None else int(capacity)
    # numba's compiled loop once the jobs are many (its one-time import and cache load, ~0.6 s of CPU, pays
    # off over the thousands of partitions of a large model's replica loop); the heap for small layers
    kernel = _compiled() if loads.size >= COMPILED_FROM_JOBS or "numba" in sys.modules else None
    return (kernel or lpt_heap)(loads, order, bins, cap)


def lpt_heap(loads: np.ndarray, order: np.ndarray, bins: int, capacity: int) -> np.ndarray:
    """LPT with a heap of bins (no numba): jobs in `order`, capacity -1 for none. -> bin of each job [m]."""
    assignment = np.empty(loads.size, dtype=np.int64)
    values = loads.tolist()
    heap = [(0.0, b) for b in range(bins)]
    counts = [0] * bins
    for job in order.tolist():
        while capacity >= 0 and counts[heap[0][1]] >= capacity:
            heapq.heappop(heap)  # a full bin never takes another job
        load, b = heap[0]
        assignment[job] = b
        counts[b] += 1
        heapq.heapreplace(heap, (load + values[job], b))
    return assignment


def _compiled():
    """numba's compiled LPT (`_lpt_numba.lpt_assign`), or None without numba (the heap below then runs)."""
    try:
        from moeserve.remoe._lpt_numba import lpt_assign
    except ImportError:
        return None
    return lpt_assign


def bin_loads(loads: np.ndarray, assignment: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(assignment, weights=np.asarray(loads, dtype=np.float64), minlength=bins)


def makespan(loads: np.ndarray, assignment: np.ndarray, bins: int) -> float:
    return float(bin_loads(loads, assignment, bins).max(initial=0.0))


def lpt_ratio_bound(bins: int) -> float:
    """Graham's worst-case ratio of LPT's makespan to the optimum."""
    return 4.0 / 3.0 - 1.0 / (3.0 * bins)


def optimal_partition(loads: np.ndarray, bins: int) -> tuple[float, np.ndarray]:
    """Exhaustive minimum makespan (for small cases: every set partition into <= bins blocks)."""
    loads = np.asarray(loads, dtype=np.float64)
    order = np.argsort(-loads, kind="stable")
    best = [np.inf, np.zeros(loads.size, dtype=np.int64)]
    current = np.zeros(loads.size, dtype=np.int64)
    totals = np.zeros(bins)

    def place(i: int, used: int) -> None:
        if totals.max() >= best[0]:
            return
        if i == loads.size:
            best[0] = totals.max()
            best[1] = current.copy()
            return
        job = order[i]
        for b in range(min(used + 1, bins)):  # a new bin only as the next unused one: no symmetric repeats
            totals[b] += loads[job]
            current[job] = b
            place(i + 1, max(used, b + 1))
            totals[b] -= loads[job]

    place(0, 0)
    return float(best[0]), best[1]
