"""The devices that host expert replicas, and what a placement costs on them.

A placement is `replicas [layers, experts, devices] int`: how many copies of expert e sit on device d.
Engines split an expert's tokens evenly over its copies (SGLang and vLLM dispatch by token index
modulo the copy count), so a copy of an expert with load L and c copies serves L / c tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError


@dataclass(frozen=True, eq=False)
class DeviceFleet:
    """Devices (GPUs, or CPU expert workers on a GPU-less host) and their cost model.

    capacity_experts: [devices] int   how many expert replicas fit in a device's memory
    fixed_s:          [devices] float latency curve intercept: seconds per expert invocation
    per_token_s:      [devices] float latency curve slope: seconds per token through one expert
    A copy serving t > 0 tokens takes `fixed_s + per_token_s * t` on its device; an idle copy takes 0.
    """

    capacity_experts: np.ndarray
    fixed_s: np.ndarray
    per_token_s: np.ndarray
    expert_gb: float = 0.0  # memory of one expert's weights
    cold_start_s: float = 0.0  # loading an expert onto a device that does not hold it
    price_per_gb_s: float = 0.0  # serverless billing: memory x time alive
    dispatch_s: float = 0.0  # all-to-all latency per layer, fixed part
    dispatch_per_token_s: float = 0.0  # all-to-all, per token received by the busiest device
    device_memory_gb: float = 0.0  # whole-device memory a static deployment pays for

    def __post_init__(self) -> None:
        cap = np.asarray(self.capacity_experts, dtype=np.int64).reshape(-1)
        n = cap.shape[0]
        fixed = np.broadcast_to(np.asarray(self.fixed_s, dtype=np.float64), (n,)).copy()
        slope = np.broadcast_to(np.asarray(self.per_token_s, dtype=np.float64), (n,)).copy()
        if n == 0:
            raise MoeServeError("a device fleet needs at least one device")
        if (cap < 1).any():
            raise MoeServeError("every device must hold at least one expert")
        if (fixed < 0).any() or (slope < 0).any() or (slope + fixed <= 0).any():
            raise MoeServeError("latency curves must be non-negative and not identically zero")
        scalars = (self.expert_gb, self.cold_start_s, self.price_per_gb_s, self.dispatch_s,
                   self.dispatch_per_token_s, self.device_memory_gb)
        if min(scalars) < 0:
            raise MoeServeError("fleet sizes, times and prices must be non-negative")
        object.__setattr__(self, "capacity_experts", cap)
        object.__setattr__(self, "fixed_s", fixed)
        object.__setattr__(self, "per_token_s", slope)

    @property
    def num_devices(self) -> int:
        return int(self.capacity_experts.shape[0])


def uniform_fleet(num_devices: int, capacity_experts: int, fixed_s: float = 0.0, per_token_s: float = 1.0,
                  **costs: float) -> DeviceFleet:
    """`num_devices` identical devices; `costs` are the scalar fields of DeviceFleet."""
    if num_devices < 1:
        raise MoeServeError(f"need at least one device, got {num_devices}")
    return DeviceFleet(
        capacity_experts=np.full(num_devices, capacity_experts),
        fixed_s=np.full(num_devices, fixed_s),
        per_token_s=np.full(num_devices, per_token_s),
        **costs,
    )


def replica_loads(replicas: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """Tokens one copy of each expert serves.

    replicas: [..., experts, devices] int; loads: [..., experts] float -> [..., experts] float
    """
    counts = replicas.sum(-1)
    return np.where(counts > 0, loads / np.maximum(counts, 1), 0.0)


def device_loads(replicas: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """Tokens each device processes. replicas: [..., E, D]; loads: [..., E] -> [..., D]."""
    per_copy = replica_loads(replicas, loads)
    return np.einsum("...ed,...e->...d", replicas.astype(np.float64), per_copy)


def device_times(replicas: np.ndarray, loads: np.ndarray, fleet: DeviceFleet) -> np.ndarray:
    """Seconds each device spends on one MoE layer's experts. [..., E, D], [..., E] -> [..., D]."""
    per_copy = replica_loads(replicas, loads)
    rep = replicas.astype(np.float64)
    invocations = np.einsum("...ed,...e->...d", rep, (per_copy > 0).astype(np.float64))
    tokens = np.einsum("...ed,...e->...d", rep, per_copy)
    return invocations * fleet.fixed_s + tokens * fleet.per_token_s


def balancedness(dev_loads: np.ndarray) -> np.ndarray:
    """Max device load / mean device load (1.0 is perfect). [..., D] -> [...]."""
    mean = dev_loads.mean(-1)
    return np.where(mean > 0, dev_loads.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def static_placement(num_layers: int, num_experts: int, num_devices: int) -> np.ndarray:
    """Plain expert parallelism: one copy per expert, contiguous blocks per device. -> [L, E, D] int."""
    if num_experts % num_devices:
        raise MoeServeError(f"{num_experts} experts do not split evenly over {num_devices} devices")
    device_of_expert = np.arange(num_experts) // (num_experts // num_devices)
    one = np.zeros((num_experts, num_devices), dtype=np.int64)
    one[np.arange(num_experts), device_of_expert] = 1
    return np.broadcast_to(one, (num_layers, num_experts, num_devices)).copy()
