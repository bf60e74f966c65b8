"""Compiled LPT (numba, optional dependency): the same rule and tie-breaking as `lpt.lpt_partition`'s heap.

Jobs in the given order (largest load first, ties by lower index) each go to the least-loaded bin with
room, ties to the lower bin index. A linear scan over the bins replaces the heap: z is at most a few
hundred replicas, and the scan has no per-job allocation. Importing this raises ImportError without numba.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def lpt_assign(loads, order, bins, capacity):
    """loads [m] float64, order [m] int64 (jobs, largest first), capacity (-1: none) -> bin of each job [m]."""
    assignment = np.empty(loads.shape[0], dtype=np.int64)
    total = np.zeros(bins)
    count = np.zeros(bins, dtype=np.int64)
    for i in range(order.shape[0]):
        job = order[i]
        best = -1
        for b in range(bins):
            if capacity >= 0 and count[b] >= capacity:
                continue
            if best < 0 or total[b] < total[best]:
                best = b
        assignment[job] = best
        count[best] += 1
        total[best] += loads[job]
    return assignment
