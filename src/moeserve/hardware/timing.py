"""Timing calls: the fastest of many interleaved repeats, and how far the others spread, after warm-up,
on the CPU or a CUDA device.

Load from other processes only ever adds time, so the fastest repeat is the figure a profile keeps
(the machine's cost of the work); the spread, p90 / fastest - 1, says how much load there was.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """One call's wall time over the repeats: the fastest, the median and the 90th percentile (seconds)."""

    best_s: float
    median_s: float
    p90_s: float

    @property
    def spread(self) -> float:
        """p90 / fastest - 1: 0 on a quiet machine, 1 when a tenth of the repeats took twice as long."""
        return self.p90_s / self.best_s - 1.0 if self.best_s > 0 else 0.0


def time_calls(fns: Sequence[Callable[[], object]], device: torch.device | str = "cpu", repeats: int = 20,
               warmup: int = 3, after: Sequence[Callable[[], object] | None] | None = None) -> list[Timing]:
    """Wall time of one call of each function in `fns` ([N] -> [N] timings).

    The calls are interleaved (round r times every function once) so that a burst of load from other
    processes spreads over all points instead of spoiling one. `after[i]()`, if given, runs untimed
    after every call of `fns[i]`. On CUDA each call is bracketed by CUDA events and synchronised, so
    the figure is the latency of one call (launch overhead included), not the throughput of a queue.
    """
    device = torch.device(device)
    after = list(after) if after is not None else [None] * len(fns)
    samples: list[list[float]] = [[] for _ in fns]

    def run(i: int, record: bool) -> None:
        if device.type == "cuda":
            start.record()
            fns[i]()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fns[i]()
            elapsed = time.perf_counter() - t0
        if record:
            samples[i].append(elapsed)
        if after[i] is not None:
            after[i]()

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(len(fns)):
            for _ in range(warmup):
                run(i, record=False)
        for _ in range(repeats):
            for i in range(len(fns)):
                run(i, record=True)
    return [Timing(min(s), statistics.median(s), float(np.percentile(s, 90))) for s in samples]


def time_calls_s(fns: Sequence[Callable[[], object]], device: torch.device | str = "cpu", repeats: int = 20,
                 warmup: int = 3, after: Sequence[Callable[[], object] | None] | None = None) -> list[float]:
    """The fastest wall time in seconds of one call of each function in `fns` (see `time_calls`)."""
    return [t.best_s for t in time_calls(fns, device, repeats, warmup, after)]


def time_call_s(fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 20,
                warmup: int = 3, after: Callable[[], object] | None = None) -> float:
    """The fastest wall time of one `fn()` call in seconds (see `time_calls`)."""
    return time_calls_s([fn], device, repeats, warmup, [after])[0]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads (None: leave as is), restoring the count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

