"""Latency and cost of one request under a Remoe split of the experts [II], and the baselines costed with the same model.

Per MoE layer: the GPU runs the non-expert part, g(tokens); the main function's CPU runs the local
experts while the layer's remote replicas run theirs in parallel, so the layer takes
g + max(local, slowest replica). A replica's time is network round trips, invocation overhead, the
hidden states sent and returned (2 * tokens * hidden bytes / bandwidth; a token routed to two experts
of one replica is counted twice, which is conservative) and tokens * T_rem(memory). A prompt whose
hidden states exceed the payload limit is sent in chunks, one invocation each, back to back.

Decode uses expectations from the decode activation share s_e: a token hits expert e k * s_e times
on average, replica r with probability 1 - (1 - s_r)^k. Remote hits of one step are costed serially
(conservative); TPOT is the mean over decode steps.

Billing (pricing/billing.py, the rule `/metrics` uses too) is memory x duration: the main function for the whole request (TTFT + steps * TPOT) at the GPU
offering's prices, each remote invocation for its own duration (rounded up to the billing granularity)
at the CPU offering's price, plus per-request fees. A cold start adds base + bytes / load speed to TTFT
(main and remote functions start in parallel); its billing is not modelled.

Workloads hold expected counts (from a prediction) or actual counts (replay). With expected counts an
expert with c expected tokens is taken as active with probability 1 - exp(-c) (Poisson), for actual
counts when c > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.pricing.billing import function_usd, main_usd, main_usd_per_second, usd_per_mb_second
from moeserve.pricing.profiles import Pricing
from moeserve.remoe.inputs import PlanHardware, PlanModel, RequestShape, Slo
from moeserve.remoe.remote_memory import MemoryProblem, RemoteLatencyCurve, fit_remote_latency
from moeserve.units import MIB


@dataclass(frozen=True)
class CostModel:
    geometry: PlanModel
    hardware: PlanHardware
    pricing: Pricing
    curve: RemoteLatencyCurve
    # where the main function's non-expert modules run: "gpu" (Remoe) or "cpu" (main function on a CPU
    # function; `hardware.gpu_layer` then holds the CPU's non-expert latency, see `on_cpu`)
    main_device: str = "gpu"
    gpu_available: bool = True  # False: no GPU to plan for (--gpu-hardware none), only CPU shapes

    @classmethod
    def build(
        cls, geometry: PlanModel, hardware: PlanHardware, pricing: Pricing, gpu_available: bool = True
    ) -> CostModel:
        curve = fit_remote_latency(np.array(hardware.remote_memory_mb), np.array(hardware.remote_s_per_token))
        return cls(geometry, hardware, pricing, curve, gpu_available=gpu_available)

    def on_cpu(self) -> CostModel:
        """The same model with the main function on a CPU function: non-expert layers at the CPU's measured
        latency, the main function billed as a CPU function holding the non-expert weights too."""
        if self.main_device == "cpu":
            return self
        return replace(self, hardware=replace(self.hardware, gpu_layer=self.hardware.cpu_layer), main_device="cpu")

    def main_memory(self, host_bytes: float) -> tuple[float, float]:
        """(GPU bytes, host bytes) of the main function whose experts etc. take `host_bytes` of host memory."""
        if self.main_device == "cpu":
            return 0.0, float(self.geometry.non_expert_bytes + host_bytes)
        return float(self.geometry.non_expert_bytes), float(host_bytes)

    def main_fits(self, host_bytes: float) -> bool:
        """Whether the main function fits its offering (GPUs, or the CPU function's memory limit)."""
        gpu, host = self.main_memory(host_bytes)
        if self.main_device == "cpu":
            return host / MIB <= self.pricing.cpu.memory_max_mb
        return self.pricing.gpu.fits(gpu)

    @property
    def expert_mb(self) -> float:
        return self.geometry.expert_bytes / MIB

    def experts_per_function(self) -> int:
        """How many experts fit one remote function at the provider's largest memory."""
        room = self.pricing.cpu.memory_max_mb - self.hardware.function_overhead_mb
        return max(int(room // self.expert_mb), 0)

    def function_floor_mb(self, experts: np.ndarray) -> np.ndarray:
        """Smallest configurable memory holding this many experts (0 experts: the provider minimum)."""
        need = np.asarray(experts) * self.expert_mb + self.hardware.function_overhead_mb
        return np.array([self.pricing.cpu.round_memory_up(v) for v in np.atleast_1d(need)], dtype=np.int64)


@dataclass(frozen=True)
class RemoteSplit:
    """Remoe's split of each layer's experts: local or remote, and which remote replica holds each (replica r
    of layer l holds the experts with replica[l] == r), with the memory of each layer's replicas."""

    remote: np.ndarray  # [L, K] bool
    replica: np.ndarray  # [L, K] int64, -1 for a local expert
    memory_mb: np.ndarray  # [L] int64, memory of each replica of the layer (0: no remote expert)

    @property
    def replicas(self) -> np.ndarray:
        return self.replica.max(axis=1, initial=-1) + 1

    @classmethod
    def all_local(cls, layers: int, experts: int) -> RemoteSplit:
        return cls(
            np.zeros((layers, experts), bool),
            np.full((layers, experts), -1, np.int64),
            np.zeros(layers, np.int64),
        )


@dataclass(frozen=True)
class Workload:
    """What a split is evaluated on: prefill token-expert pairs per expert and the decode share."""

    prefill_tokens: np.ndarray  # [L, K] float64
    decode_share: np.ndarray  # [L, K] float64, rows sum to 1
    request: RequestShape
    actual: bool = False  # True: integer counts from a replay; False: expectations from a prediction

    @classmethod
    def from_shares(
        cls, prefill_share: np.ndarray, decode_share: np.ndarray | None, request: RequestShape, top_k: int
    ) -> Workload:
        """prefill_share / decode_share: [L, K] activation matrices (rows sum to 1)."""
        pre = _rows_to_one(prefill_share)
        dec = pre if decode_share is None else _rows_to_one(decode_share)
        return cls(pre * request.prompt_tokens * top_k, dec, request)

    def active(self, counts: np.ndarray) -> np.ndarray:
        """Probability (expected) or indicator (actual) that a count is non-zero."""
        return (counts > 0).astype(np.float64) if self.actual else -np.expm1(-counts)


def _rows_to_one(share: np.ndarray) -> np.ndarray:
    share = np.asarray(share, dtype=np.float64)
    if share.ndim != 2 or not np.all(np.isfinite(share)) or np.any(share < 0):
        raise MoeServeError(
            f"activation must be a finite non-negative [layers, experts] matrix, got shape {share.shape}"
        )
    total = share.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise MoeServeError("an activation row sums to zero: every layer needs some activation")
    return share / total


@dataclass(frozen=True)
class Figures:
    """Predicted (or replayed) figures of one strategy for one request."""

    strategy: str
    ttft_s: float
    tpot_s: float
    cost_usd: float
    main_usd: float
    remote_usd: float
    gpu_bytes: float
    host_bytes: float
    cold_start_s: float
    fits: bool  # within the providers' memory limits
    note: str = ""
    ttft_bound_s: float | None = None  # worst-case TTFT at confidence 1 - delta, when one was computed

    def meets(self, slo: Slo) -> bool:
        """Expected TTFT and TPOT within the SLOs, fits the providers, and the worst-case TTFT bound (when
        known) within the TTFT SLO."""
        bound_ok = self.ttft_bound_s is None or self.ttft_bound_s <= slo.ttft_s + 1e-12
        return self.fits and bound_ok and self.ttft_s <= slo.ttft_s + 1e-12 and self.tpot_s <= slo.tpot_s + 1e-12


@dataclass(frozen=True)
class RemoteTerms:
    """Per-layer pieces of the remote side of a split (Z = most replicas of any layer)."""

    replica_tokens: np.ndarray  # [L, Z] prefill token-expert pairs
    invocations: np.ndarray  # [L, Z] expected prefill invocations (chunks for the payload limit x P(active))
    prefill_fixed_s: np.ndarray  # [L, Z] network + overhead, -inf for a replica without tokens
    replica_decode_share: np.ndarray  # [L, Z]
    decode_hit: np.ndarray  # [L, Z] P(replica invoked in one decode step)
    decode_tokens: np.ndarray  # [L] expected remote token-expert pairs per decode step
    decode_fixed_s: np.ndarray  # [L], -inf when the layer has no remote expert
    prefill_local_s: np.ndarray  # [L]
    decode_local_s: np.ndarray  # [L]
    replica_experts: np.ndarray  # [L, Z] experts per replica
    has_remote: np.ndarray  # [L] bool


def replica_terms(
    model: CostModel, workload: Workload, replica_tokens: np.ndarray, replica_share: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per replica (any shape): prefill network + invocation time (-inf for a replica without tokens), expected
    prefill invocations (payload chunks x P(active)) and P(invoked in one decode step), from its prefill
    token-expert pairs and its decode share."""
    geo, hw = model.geometry, model.hardware
    payload = replica_tokens * geo.hidden_bytes_per_token
    chunks = np.where(
        replica_tokens > 0, np.maximum(np.ceil(payload / model.pricing.cpu.payload_limit_bytes), 1.0), 0.0
    )
    send = 2.0 * payload / hw.network_bytes_per_s
    active = workload.active(replica_tokens)
    fixed = chunks * (hw.network_rtt_s + hw.remote_invoke_overhead_s) * active + send
    prefill_fixed = np.where(replica_tokens > 0, fixed, -np.inf)
    decode_hit = -np.expm1(geo.top_k * np.log1p(-np.minimum(replica_share, 1.0 - 1e-12)))
    return prefill_fixed, chunks * active, decode_hit


def remote_terms(model: CostModel, split: RemoteSplit, workload: Workload) -> RemoteTerms:
    geo, hw = model.geometry, model.hardware
    layers, experts = split.remote.shape
    if workload.prefill_tokens.shape != (layers, experts):
        raise MoeServeError(
            f"activation has {workload.prefill_tokens.shape} (layers, experts); the model has {(layers, experts)}"
        )
    z = max(int(split.replicas.max(initial=0)), 1)
    flat = np.where(split.remote, np.arange(layers)[:, None] * z + split.replica, layers * z)
    size = layers * z + 1

    def per_replica(values: np.ndarray) -> np.ndarray:
        return np.bincount(flat.ravel(), weights=values.ravel(), minlength=size)[:-1].reshape(layers, z)

    c = workload.prefill_tokens
    replica_tokens = per_replica(c)
    replica_experts = per_replica(np.ones_like(c))
    share = workload.decode_share
    replica_share = per_replica(share)
    prefill_fixed, invocations, decode_hit = replica_terms(model, workload, replica_tokens, replica_share)
    k = geo.top_k
    remote_share = np.where(split.remote, share, 0.0).sum(axis=1)
    decode_tokens = k * remote_share
    any_hit = -np.expm1(k * np.log1p(-np.minimum(remote_share, 1.0 - 1e-12)))
    decode_fixed = (
        any_hit * (hw.network_rtt_s + hw.remote_invoke_overhead_s)
        + decode_tokens * 2.0 * geo.hidden_bytes_per_token / hw.network_bytes_per_s
    )
    has_remote = split.remote.any(axis=1)
    decode_fixed = np.where(has_remote, decode_fixed, -np.inf)

    local = ~split.remote
    cpu = hw.cpu_expert
    prefill_local = np.where(local, cpu.fixed_s * workload.active(c) + cpu.per_token_s * c, 0.0).sum(axis=1)
    decode_local = (cpu.fixed_s + cpu.per_token_s) * k * np.where(local, share, 0.0).sum(axis=1)
    return RemoteTerms(
        replica_tokens,
        invocations,
        prefill_fixed,
        replica_share,
        decode_hit,
        decode_tokens,
        decode_fixed,
        prefill_local,
        decode_local,
        replica_experts,
        has_remote,
    )


def main_usd_per_s(model: CostModel, host_bytes: float) -> float:
    return main_usd_per_second(model.pricing, *model.main_memory(host_bytes))


def remoe_host_bytes(model: CostModel, local_experts: int) -> float:
    """Main function host memory pre-allocated for `local_experts` per layer [IV-C] plus runtime overhead."""
    return (
        model.geometry.layers * local_experts * model.geometry.expert_bytes
        + model.hardware.function_overhead_mb * MIB
    )


def memory_problem(
    model: CostModel,
    split: RemoteSplit,
    workload: Workload,
    host_bytes: float,
    tpot_slo_s: float,
    lower_mb: np.ndarray,
) -> MemoryProblem:
    """The remote memory sizing problem [IV-D] of this split (see remote_memory.py for its form)."""
    t = remote_terms(model, split, workload)
    hw = model.hardware
    steps = workload.request.decode_steps
    work = t.replica_tokens.sum(axis=1) + steps * t.decode_tokens
    billed_fixed = hw.remote_invoke_overhead_s * (
        t.invocations.sum(axis=1) + steps * t.decode_hit.sum(axis=1)
    )
    gpu_decode = float(model.hardware.gpu_layer(1.0)) * model.geometry.layers
    return MemoryProblem(
        curve=model.curve,
        usd_per_mb_second=usd_per_mb_second(model.pricing.cpu),
        work=np.where(t.has_remote, work, 0.0),
        billed_fixed_s=np.where(t.has_remote, billed_fixed, 0.0),
        main_usd_per_s=main_usd_per_s(model, host_bytes),
        steps=steps,
        prefill_local_s=t.prefill_local_s,
        prefill_fixed_s=t.prefill_fixed_s,
        prefill_tokens=t.replica_tokens,
        decode_local_s=t.decode_local_s,
        decode_fixed_s=t.decode_fixed_s,
        decode_tokens=t.decode_tokens,
        tpot_budget_s=tpot_slo_s - gpu_decode,
        lower_mb=np.asarray(lower_mb, dtype=np.float64),
        upper_mb=float(model.pricing.cpu.memory_max_mb),
    )


@dataclass(frozen=True)
class LayerFigures:
    prefill_s: np.ndarray  # [L] layer prefill time, GPU part included
    decode_s: np.ndarray  # [L] layer decode time
    remote_usd: np.ndarray  # [L] remote billing per request


def layer_figures(
    model: CostModel, split: RemoteSplit, workload: Workload, terms: RemoteTerms | None = None
) -> LayerFigures:
    t = remote_terms(model, split, workload) if terms is None else terms
    hw, cpu_price = model.hardware, model.pricing.cpu
    y = split.memory_mb.astype(np.float64)
    per_token = model.curve(np.maximum(y, 1.0))
    remote_prefill = (t.prefill_fixed_s + t.replica_tokens * per_token[:, None]).max(axis=1, initial=-np.inf)
    prefill = float(hw.gpu_layer(workload.request.prompt_tokens)) + np.maximum(
        t.prefill_local_s, remote_prefill
    )
    remote_decode = t.decode_fixed_s + t.decode_tokens * per_token
    decode = float(hw.gpu_layer(1.0)) + np.maximum(t.decode_local_s, remote_decode)

    o = hw.remote_invoke_overhead_s
    calls = np.maximum(t.invocations, 1e-300)
    prefill_usd = function_usd(cpu_price, y[:, None], o + t.replica_tokens / calls * per_token[:, None],
                               t.invocations).sum(axis=1)
    hit = np.maximum(t.decode_hit, 1e-300)
    hits_per_call = model.geometry.top_k * t.replica_decode_share / hit
    decode_usd = function_usd(cpu_price, y[:, None], o + hits_per_call * per_token[:, None], t.decode_hit).sum(axis=1)
    remote_usd = np.where(t.has_remote, prefill_usd + workload.request.decode_steps * decode_usd, 0.0)
    return LayerFigures(prefill, decode, remote_usd)


def cold_start_s(model: CostModel, loaded_bytes: float) -> float:
    return model.hardware.cold_start_base_s + loaded_bytes / model.hardware.load_bytes_per_s


def evaluate_remoe(
    model: CostModel,
    split: RemoteSplit,
    workload: Workload,
    host_bytes: float | None = None,
    cold_start: bool = False,
    strategy: str = "remoe",
) -> Figures:
    """Figures of a Remoe split. host_bytes: the main function's pre-allocated host memory (default:
    what its local experts need)."""
    geo = model.geometry
    terms = remote_terms(model, split, workload)
    lf = layer_figures(model, split, workload, terms)
    if host_bytes is None:
        host_bytes = remoe_host_bytes(model, 0) + (~split.remote).sum() * geo.expert_bytes
    replica_bytes = terms.replica_experts.max(initial=0.0) * geo.expert_bytes
    cold = max(
        cold_start_s(model, geo.non_expert_bytes + host_bytes),
        cold_start_s(model, replica_bytes) if replica_bytes else 0.0,
    )
    ttft_exec, tpot = float(lf.prefill_s.sum()), float(lf.decode_s.sum())
    main = _main_usd(model, host_bytes, ttft_exec + workload.request.decode_steps * tpot)
    remote = float(lf.remote_usd.sum())
    cpu = model.pricing.cpu
    fits = model.main_fits(host_bytes) and bool(np.all(split.memory_mb[terms.has_remote] <= cpu.memory_max_mb))
    too_big = (
        terms.replica_experts * model.expert_mb + model.hardware.function_overhead_mb
        > split.memory_mb[:, None] + 1e-6
    )
    fits = fits and not bool(np.any(too_big & (terms.replica_experts > 0)))
    gpu_bytes, main_host = model.main_memory(host_bytes)
    return Figures(
        strategy,
        ttft_exec + (cold if cold_start else 0.0),
        tpot,
        main + remote,
        main,
        remote,
        gpu_bytes,
        main_host,
        cold,
        fits,
    )


def _main_usd(
    model: CostModel, host_bytes: float, duration_s: float, gpu_bytes: float | None = None
) -> float:
    if gpu_bytes is None:
        gpu_bytes, host_bytes = model.main_memory(host_bytes)
    return main_usd(model.pricing, duration_s, gpu_bytes, host_bytes)


def evaluate_all_gpu(model: CostModel, workload: Workload, cold_start: bool = False) -> Figures:
    """Everything on GPUs of the GPU offering (as many as the weights need)."""
    geo, hw = model.geometry, model.hardware
    c = workload.prefill_tokens
    ge = hw.gpu_expert
    prefill = geo.layers * float(hw.gpu_layer(workload.request.prompt_tokens)) + float(
        (ge.fixed_s * workload.active(c) + ge.per_token_s * c).sum()
    )
    tpot = geo.layers * (float(hw.gpu_layer(1.0)) + geo.top_k * (ge.fixed_s + ge.per_token_s))
    gpu_bytes = geo.non_expert_bytes + geo.all_expert_bytes
    host = hw.function_overhead_mb * MIB
    cold = cold_start_s(model, gpu_bytes)
    main = _main_usd(model, host, prefill + workload.request.decode_steps * tpot, gpu_bytes)
    fits = model.pricing.gpu.fits(gpu_bytes)
    note = "" if fits else f"needs {model.pricing.gpu.gpus_needed(gpu_bytes)} GPUs, above max_gpus"
    return Figures(
        "all-gpu",
        prefill + (cold if cold_start else 0.0),
        tpot,
        main,
        main,
        0.0,
        gpu_bytes,
        host,
        cold,
        fits,
        note,
    )


def evaluate_all_cpu(model: CostModel, workload: Workload, cold_start: bool = False) -> Figures:
    """Everything in one CPU function of the CPU offering."""
    geo, hw, cpu = model.geometry, model.hardware, model.pricing.cpu
    c = workload.prefill_tokens
    ce = hw.cpu_expert
    prefill = geo.layers * float(hw.cpu_layer(workload.request.prompt_tokens)) + float(
        (ce.fixed_s * workload.active(c) + ce.per_token_s * c).sum()
    )
    tpot = geo.layers * (float(hw.cpu_layer(1.0)) + geo.top_k * (ce.fixed_s + ce.per_token_s))
    total = geo.non_expert_bytes + geo.all_expert_bytes
    memory_mb = cpu.round_memory_up(total / MIB + hw.function_overhead_mb)
    needed_mb = total / MIB + hw.function_overhead_mb
    duration = prefill + workload.request.decode_steps * tpot
    usd = float(function_usd(cpu, max(memory_mb, needed_mb), duration))
    cold = cold_start_s(model, total)
    fits = needed_mb <= cpu.memory_max_mb
    note = "" if fits else f"needs {needed_mb:.0f} MB, above the {cpu.memory_max_mb} MB function limit"
    return Figures(
        "all-cpu", prefill + (cold if cold_start else 0.0), tpot, usd, usd, 0.0, 0.0, total, cold, fits, note
    )


def evaluate_mix(model: CostModel, workload: Workload, cold_start: bool = False) -> Figures:
    """Non-expert modules on the GPU, every expert on the main function's CPU (no remote split)."""
    geo = model.geometry
    fig = evaluate_remoe(
        model,
        RemoteSplit.all_local(geo.layers, geo.experts),
        workload,
        remoe_host_bytes(model, geo.experts),
        cold_start,
        "mix",
    )
    return fig


def evaluate_fetch(model: CostModel, workload: Workload, cold_start: bool = False) -> Figures:
    """Ideal expert offloading: experts in host memory, each layer's active experts copied to the GPU just in
    time with the copy fully overlapped with compute (double buffer of one layer's experts)."""
    geo, hw = model.geometry, model.hardware
    c = workload.prefill_tokens
    ge = hw.gpu_expert
    active = workload.active(c)
    compute = float(hw.gpu_layer(workload.request.prompt_tokens)) + (
        ge.fixed_s * active + ge.per_token_s * c
    ).sum(axis=1)
    copy = active.sum(axis=1) * geo.expert_bytes / hw.host_to_gpu_bytes_per_s
    prefill = float(np.maximum(compute, copy).sum())
    step_compute = float(hw.gpu_layer(1.0)) + geo.top_k * (ge.fixed_s + ge.per_token_s)
    step_copy = geo.top_k * geo.expert_bytes / hw.host_to_gpu_bytes_per_s
    tpot = geo.layers * max(step_compute, step_copy)
    buffer_experts = int(np.ceil(active.sum(axis=1).max()))
    gpu_bytes = geo.non_expert_bytes + 2 * buffer_experts * geo.expert_bytes
    host = geo.all_expert_bytes + hw.function_overhead_mb * MIB
    cold = cold_start_s(model, geo.non_expert_bytes + geo.all_expert_bytes)
    main = _main_usd(model, host, prefill + workload.request.decode_steps * tpot, gpu_bytes)
    fits = model.pricing.gpu.fits(gpu_bytes)
    return Figures(
        "fetch", prefill + (cold if cold_start else 0.0), tpot, main, main, 0.0, gpu_bytes, host, cold, fits
    )

