"""Planner inputs built from the project's single sources: ModelGeometry and the hardware profiles.

The planner's cost model [II] needs latencies of a few kinds of work; this module derives each one from a
measured CPU profile (`moeserve profile --hardware`) and a GPU profile (measured, or a datasheet
reference such as a100-80gb). Every derivation that is a model rather than a measurement is named here
and in docs/remoe.md.
"""

from __future__ import annotations

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.hardware.reference import roofline_expert_latency_s
from moeserve.hardware.schema import HardwareProfile
from moeserve.models.geometry import ModelGeometry
from moeserve.pricing.profiles import Pricing
from moeserve.remoe.inputs import LinearLatency, PlanHardware, PlanModel

# Remote function memory sizes sampled for the T_rem(y) fit [IV-D] (Lambda's range, 128 MB .. 10 GB).
REMOTE_MEMORY_MB = (128.0, 256.0, 512.0, 1024.0, 1769.0, 3008.0, 5307.0, 10240.0)


def plan_model(g: ModelGeometry) -> PlanModel:
    """The planner's view of a model: MoE layers only; dense layers and shared experts are non-expert."""
    return PlanModel(
        layers=g.num_moe_layers,
        experts=g.num_experts,
        top_k=g.top_k,
        expert_bytes=g.expert_bytes,
        non_expert_bytes=g.non_expert_bytes,
        hidden_bytes_per_token=int(g.hidden_size * g.bytes_per_param),
    )


def linear_latency(tokens: np.ndarray, seconds: np.ndarray) -> LinearLatency:
    """Least-squares a + b * tokens, both clipped at >= 0."""
    b, a = np.polyfit(np.asarray(tokens, float), np.asarray(seconds, float), 1)
    return LinearLatency(max(float(a), 0.0), max(float(b), 1e-12))


def plan_hardware(
    g: ModelGeometry, cpu: HardwareProfile, gpu: HardwareProfile | None, pricing: Pricing, *,
    network_rtt_s: float | None = None, network_bytes_per_s: float | None = None,
    invoke_overhead_s: float = 1e-3, cold_start_base_s: float = 1.5, load_bytes_per_s: float = 1e9,
) -> PlanHardware:
    """Derive the planner's latencies.

    - cpu_expert / cpu_layer: the CPU profile's measured expert curve (float32, most threads) and
      non-expert prefill curve, fitted a + b * tokens. The CPU profile must have been measured with the
      model's expert shape.
    - gpu_expert / gpu_layer: the GPU profile's datasheet roofline for this model's expert shape; the
      non-expert layer streams its weights once per call and does 2 FLOP per weight per token.
    - remote functions: vCPUs proportional to memory (pricing's mb_per_vcpu); one token through one
      expert costs the CPU's per-token time at a 32-token batch, divided by min(vCPUs, 1) below one vCPU
      (throttled), and sped up by the measured multi-thread ratio above.
    - network: the measured local shared-memory round trip unless given (serverless: ~1 ms).
    """
    tokens = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256], float)
    if cpu.expert is None or cpu.expert.hidden_size != g.hidden_size or \
            cpu.expert.intermediate_size != g.expert_intermediate_size:
        have = None if cpu.expert is None else (cpu.expert.hidden_size, cpu.expert.intermediate_size)
        raise MoeServeError(
            f"hardware profile {cpu.name} measured experts of shape {have}, the model's are "
            f"{(g.hidden_size, g.expert_intermediate_size)}: measure it with `moeserve profile MODEL --hardware`")
    if cpu.non_expert is None:
        raise MoeServeError(f"hardware profile {cpu.name} has no non-expert latency: measure it with "
                            "`moeserve profile MODEL --hardware`")
    cpu_threads = sorted({c.threads for c in cpu.expert.curves if c.device == "cpu"})
    one = np.array([cpu.expert_latency_s(t, threads=cpu_threads[0], device="cpu", dtype="float32") for t in tokens])
    best = np.array([cpu.expert_latency_s(t, threads=cpu_threads[-1], device="cpu", dtype="float32") for t in tokens])
    cpu_expert = linear_latency(tokens, np.minimum(one, best))
    layer_tokens = np.array([16.0, 64.0, 256.0])
    cpu_layer = linear_latency(layer_tokens, [cpu.non_expert_latency_s("prefill", n, device="cpu") for n in layer_tokens])
    if gpu is None:  # no GPU (--gpu-hardware none): the GPU fields hold the CPU's, and no GPU shape is planned
        gpu_expert, gpu_layer = cpu_expert, cpu_layer
    else:
        sheet = gpu.datasheet
        if sheet is None:
            raise MoeServeError(f"GPU profile {gpu.name} has no datasheet figures (use e.g. a100-80gb or h100-sxm)")
        dtype = g.dtype if g.dtype in ("float16", "bfloat16") else "bfloat16"
        gpu_expert = linear_latency(tokens, [roofline_expert_latency_s(t, g.hidden_size, g.expert_intermediate_size,
                                                                       dtype, sheet) for t in tokens])
        per_layer_bytes = g.non_expert_bytes / max(g.num_layers, 1)
        flops_per_token = 2 * per_layer_bytes / g.bytes_per_param
        gpu_layer = LinearLatency(max(per_layer_bytes / sheet.gpu_memory_bandwidth_bytes_per_s, 2e-5),
                                  flops_per_token / (sheet.dense_tflops.get(dtype, 100.0) * 1e12))
    mb_per_vcpu = pricing.cpu.mb_per_vcpu
    per_token_1 = float(one[5] / tokens[5])
    speedup = float(one[5] / best[5]) if len(cpu_threads) > 1 else 1.0
    remote = []
    for y in REMOTE_MEMORY_MB:
        vcpu = y / mb_per_vcpu
        if vcpu < 1:
            remote.append(per_token_1 / vcpu)
        else:
            frac = min(vcpu - 1, max(cpu_threads[-1] - 1, 1)) / max(cpu_threads[-1] - 1, 1)
            remote.append(per_token_1 / (1 + (speedup - 1) * frac))
    if cpu.transport is not None:
        sizes = np.asarray(cpu.transport.nbytes, float)
        secs = np.asarray(cpu.transport.seconds, float)
        rtt = float(secs[0]) if network_rtt_s is None else network_rtt_s
        bw = float((sizes[-1] - sizes[0]) / max(secs[-1] - secs[0], 1e-9)) if network_bytes_per_s is None \
            else network_bytes_per_s
    else:
        rtt = network_rtt_s if network_rtt_s is not None else 1e-3
        bw = network_bytes_per_s if network_bytes_per_s is not None else 1.25e9
    h2d = [c for c in ((gpu.copy if gpu is not None else None) or ()) if c.direction == "h2d" and c.pinned]
    h2d_bw = float(h2d[0].nbytes[-1] / h2d[0].seconds[-1]) if h2d else 25e9
    return PlanHardware(
        gpu_layer=gpu_layer, gpu_expert=gpu_expert, cpu_expert=cpu_expert, cpu_layer=cpu_layer,
        remote_memory_mb=REMOTE_MEMORY_MB, remote_s_per_token=tuple(remote),
        remote_invoke_overhead_s=invoke_overhead_s, network_rtt_s=rtt, network_bytes_per_s=max(bw, 1e6),
        host_to_gpu_bytes_per_s=h2d_bw, load_bytes_per_s=load_bytes_per_s, cold_start_base_s=cold_start_base_s,
    )
