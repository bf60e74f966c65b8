"""The planner's inputs that are not arrays: model geometry, hardware latencies, SLOs, one request's size.

Remoe [II] models a request as prefill (n prompt tokens through every layer) followed by decode steps
(one token each); these dataclasses hold exactly what that model needs and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError


@dataclass(frozen=True)
class PlanModel:
    """Shape of the MoE model being planned (MoE layers only; dense layers count as non-expert bytes)."""

    layers: int
    experts: int
    top_k: int
    expert_bytes: int  # one routed expert's weights
    non_expert_bytes: int  # attention, norms, gates, embeddings, shared experts, dense layers
    hidden_bytes_per_token: (
        int  # one token's hidden state as sent to a remote function (hidden * dtype bytes)
    )

    def __post_init__(self) -> None:
        if self.layers < 1 or self.experts < 1:
            raise MoeServeError(
                f"model geometry needs at least one MoE layer and expert, got {self.layers} x {self.experts}"
            )
        if not 1 <= self.top_k <= self.experts:
            raise MoeServeError(f"top_k {self.top_k} must lie in 1..{self.experts}")
        if self.expert_bytes <= 0 or self.non_expert_bytes < 0 or self.hidden_bytes_per_token <= 0:
            raise MoeServeError("model geometry byte sizes must be positive")

    @property
    def all_expert_bytes(self) -> int:
        return self.layers * self.experts * self.expert_bytes


@dataclass(frozen=True)
class LinearLatency:
    """latency_s(tokens) = fixed_s + per_token_s * tokens for tokens > 0, and 0 for no tokens."""

    fixed_s: float
    per_token_s: float

    def __call__(self, tokens: np.ndarray | float) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        return np.where(tokens > 0, self.fixed_s + self.per_token_s * tokens, 0.0)


@dataclass(frozen=True)
class PlanHardware:
    """Measured (or assumed) latencies of the machines a plan runs on.

    Remote functions: `remote_memory_mb[i]` MB of memory (vCPUs proportional to memory) process one
    token through one expert in `remote_s_per_token[i]` seconds; the planner fits
    T_rem(y) = theta1 * exp(-theta2 * y) + theta3 to these samples [IV-D].
    """

    gpu_layer: LinearLatency  # non-expert part of one MoE layer on the GPU, by tokens
    gpu_expert: LinearLatency  # one expert on the GPU (all-GPU and Fetch baselines)
    cpu_expert: LinearLatency  # one expert on the main function's CPU
    cpu_layer: LinearLatency  # non-expert part of one layer on a CPU (all-CPU baseline)
    remote_memory_mb: tuple[float, ...]
    remote_s_per_token: tuple[float, ...]
    remote_invoke_overhead_s: float  # per remote invocation, billed (request handling, deserialisation)
    network_rtt_s: float  # main function <-> remote function round trip
    network_bytes_per_s: float  # hidden-state transfer bandwidth
    host_to_gpu_bytes_per_s: float  # PCIe, for the Fetch baseline
    load_bytes_per_s: float  # weights loaded per second at a cold start
    cold_start_base_s: float  # container and runtime start, before weights load
    function_overhead_mb: float = 256.0  # runtime memory of a function besides its weights

    def __post_init__(self) -> None:
        if len(self.remote_memory_mb) != len(self.remote_s_per_token) or len(self.remote_memory_mb) < 3:
            raise MoeServeError(
                "hardware profile needs at least 3 (remote memory, latency) samples of equal count"
            )
        for name in ("network_bytes_per_s", "host_to_gpu_bytes_per_s", "load_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise MoeServeError(f"hardware profile: {name} must be positive")


@dataclass(frozen=True)
class Slo:
    """Service-level objectives: the TTFT bound holds with probability >= 1 - delta, TPOT is the mean per token."""

    ttft_s: float
    tpot_s: float
    delta: float = 0.05
    include_cold_start: bool = False

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise MoeServeError(f"SLOs must be positive, got TTFT {self.ttft_s} s and TPOT {self.tpot_s} s")
        if not 0 < self.delta < 1:
            raise MoeServeError(f"SLO confidence delta must lie in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class RequestShape:
    """One request's size: prompt tokens (prefill) and generated tokens (the first comes from prefill)."""

    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise MoeServeError(
                f"a request needs at least one prompt and one output token, got {self.prompt_tokens} and {self.output_tokens}"
            )

    @property
    def decode_steps(self) -> int:
        return self.output_tokens - 1
