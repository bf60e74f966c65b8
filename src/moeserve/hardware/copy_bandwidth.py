"""Host<->GPU copy time vs size, from pinned (page-locked) and pageable host memory. CUDA only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.hardware.timing import time_call_s

DEFAULT_COPY_SIZES = (1 << 16, 1 << 20, 1 << 24, 1 << 26)  # 64 KiB .. 64 MiB


@dataclass(frozen=True)
class CopyTiming:
    """direction: h2d / d2h; nbytes: [N]; seconds: [N] median of one copy."""

    direction: str
    pinned: bool
    nbytes: tuple[int, ...]
    seconds: tuple[float, ...]


def latency_and_bandwidth(nbytes: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares line seconds = latency + nbytes / bandwidth -> (latency_s >= 0, bandwidth bytes/s).

    With one point (or a non-positive slope) the bandwidth is the largest size over its time.
    """
    n = np.asarray(nbytes, dtype=np.float64)
    s = np.asarray(seconds, dtype=np.float64)
    if len(n) >= 2:
        slope, intercept = np.polyfit(n, s, 1)
        if slope > 0:
            return max(float(intercept), 0.0), float(1.0 / slope)
    i = int(np.argmax(n))
    return 0.0, float(n[i] / s[i])


def measure_copies(device: torch.device | str = "cuda", sizes: Sequence[int] = DEFAULT_COPY_SIZES,
                   repeats: int = 10, warmup: int = 2,
                   progress: Callable[[str], None] | None = None) -> list[CopyTiming]:
    """Time host->device and device->host copies of each size, from pinned and pageable host buffers.

    Pinned copies are issued non_blocking (the DMA engine reads host memory directly); pageable ones
    are staged by the driver through its own pinned buffer, which is why they are slower.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("host<->device copies need a CUDA device")
    timings = []
    for pinned in (True, False):
        for direction in ("h2d", "d2h"):
            seconds = []
            for n in sizes:
                host = torch.empty(int(n), dtype=torch.uint8, pin_memory=pinned)
                host.fill_(1)
                gpu = torch.empty(int(n), dtype=torch.uint8, device=device)
                if direction == "h2d":
                    fn = lambda gpu=gpu, host=host, nb=pinned: gpu.copy_(host, non_blocking=nb)  # noqa: E731
                else:
                    fn = lambda gpu=gpu, host=host, nb=pinned: host.copy_(gpu, non_blocking=nb)  # noqa: E731
                seconds.append(time_call_s(fn, device, repeats, warmup))
                del host, gpu
            timings.append(CopyTiming(direction, pinned, tuple(int(n) for n in sizes), tuple(seconds)))
            if progress is not None:
                progress(f"copy {direction} {'pinned' if pinned else 'pageable'}")
    return timings
