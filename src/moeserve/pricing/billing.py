"""The billing rule of serverless functions (Remoe [II]): memory x billed duration, plus a fee per request.

One rule for everything moeserve prices: the planner's predicted cost of a plan and its baselines, and
the cost `/metrics` accrues while serving.
- A CPU function invocation (remote expert function, an all-CPU deployment) of `duration_s` at
  `memory_mb` costs ceil(duration / granularity) * granularity * memory GB * USD/GB-s + USD/request.
- The main function costs its GPU and host memory's price per second (whole GPUs or GPU GB-seconds) times
  its duration, plus the GPU offering's fee per request; without GPU memory it is a CPU function.
`relaxed_function_usd` is the same rule without rounding the duration up: the smooth objective the
planner's optimisers (MMP's cost proxy, the remote-memory dual) minimise before rounding.
"""

from __future__ import annotations

import numpy as np

from moeserve.pricing.profiles import CpuFunctionPricing, Pricing
from moeserve.units import GIB


def function_usd(cpu: CpuFunctionPricing, memory_mb, duration_s, invocations=1.0):
    """`invocations` invocations of `duration_s` each at `memory_mb` (scalars or arrays, broadcast)."""
    memory_gb = np.asarray(memory_mb, dtype=np.float64) / 1024.0
    return (cpu.billed_s(duration_s) * memory_gb * cpu.usd_per_gb_second + cpu.usd_per_request) * invocations


def relaxed_function_usd(cpu: CpuFunctionPricing, memory_mb, busy_s, invocations=0.0):
    """The same rule with the billed duration not rounded: memory x busy seconds + fees."""
    return (np.asarray(memory_mb, dtype=np.float64) / 1024.0 * cpu.usd_per_gb_second * busy_s
            + cpu.usd_per_request * invocations)


def usd_per_mb_second(cpu: CpuFunctionPricing) -> float:
    """A CPU function's price per MB-second."""
    return cpu.usd_per_gb_second / 1024.0


def main_usd_per_second(pricing: Pricing, gpu_bytes: float, host_bytes: float) -> float:
    """What the main function costs per second with this much GPU and host memory."""
    if gpu_bytes > 0:
        return pricing.gpu.usd_per_second(gpu_bytes, host_bytes)
    return host_bytes / GIB * pricing.cpu.usd_per_gb_second


def main_usd(pricing: Pricing, duration_s: float, gpu_bytes: float, host_bytes: float, requests: float = 1.0) -> float:
    """The main function serving `requests` requests in `duration_s` of execution."""
    if gpu_bytes > 0:
        return pricing.gpu.usd_per_second(gpu_bytes, host_bytes) * duration_s + pricing.gpu.usd_per_request * requests
    return float(function_usd(pricing.cpu, host_bytes / (1 << 20), duration_s, 1.0)
                 + pricing.cpu.usd_per_request * (requests - 1.0))
