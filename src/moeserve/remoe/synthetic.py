"""Synthetic Zipf-skewed workloads for tests and benchmarks (no real trace needed).

Prompts come from domains and, within a domain, topics. A prompt's vector is its domain centre plus a
topic offset plus noise; its activation per layer mixes a global, a domain and a topic Zipf distribution
over a random expert permutation, then varies per prompt (Dirichlet). So similar prompts really do
activate similar experts, which is the premise of SPS [III-A].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.remoe.inputs import LinearLatency, PlanHardware, PlanModel
from moeserve.units import GIB


@dataclass(frozen=True)
class SyntheticTrace:
    vectors: np.ndarray  # [P, d] float32
    prefill: np.ndarray  # [P, L, K] float32, rows sum to 1
    decode: np.ndarray  # [P, L, K] float32, rows sum to 1
    prompt_tokens: np.ndarray  # [P] int64
    output_tokens: np.ndarray  # [P] int64
    domain: np.ndarray  # [P] int64
    topic: np.ndarray  # [P] int64 (global topic id)


def zipf_rows(rng: np.random.Generator, rows: int, experts: int, s: float) -> np.ndarray:
    """rows random permutations of Zipf(s) weights over experts: [rows, K] summing to 1."""
    weights = 1.0 / np.arange(1, experts + 1) ** s
    weights /= weights.sum()
    return np.stack([weights[rng.permutation(experts)] for _ in range(rows)])


def clustered_prompt_vectors(
    rng: np.random.Generator, prompts: int, dim: int, domains: int, topics_per_domain: int
):
    """Domain centre + topic offset + noise: (vectors [P, d] float32, domain [P], topic [P])."""
    domain = rng.integers(domains, size=prompts)
    topic = domain * topics_per_domain + rng.integers(topics_per_domain, size=prompts)
    centres = rng.standard_normal((domains, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offsets = rng.standard_normal((domains * topics_per_domain, dim))
    offsets *= 0.7 / np.linalg.norm(offsets, axis=1, keepdims=True)
    noise = rng.standard_normal((prompts, dim), dtype=np.float32) * np.float32(0.5 / np.sqrt(dim))
    return (centres[domain] + offsets[topic]).astype(np.float32) + noise, domain, topic


def synthetic_trace(
    prompts: int,
    layers: int,
    experts: int,
    dim: int = 64,
    domains: int = 4,
    topics_per_domain: int = 6,
    zipf_s: float = 1.0,
    concentration: float = 300.0,
    mix: tuple[float, float, float] = (0.3, 0.3, 0.4),
    seed: int = 0,
) -> SyntheticTrace:
    rng = np.random.default_rng(seed)
    topics = domains * topics_per_domain
    vectors, domain, topic = clustered_prompt_vectors(rng, prompts, dim, domains, topics_per_domain)
    # The magnitude of a summed-embedding vector grows with the prompt; cosine ignores it.
    prompt_tokens = np.clip(rng.lognormal(np.log(200), 0.8, prompts), 8, 4096).astype(np.int64)
    output_tokens = np.clip(rng.lognormal(np.log(128), 0.6, prompts), 1, 2048).astype(np.int64)
    vectors *= np.sqrt(prompt_tokens)[:, None].astype(np.float32)
    prefill = np.empty((prompts, layers, experts), dtype=np.float32)
    decode = np.empty((prompts, layers, experts), dtype=np.float32)
    g, d, t = mix
    for layer in range(layers):
        base = zipf_rows(rng, 1, experts, zipf_s)
        by_domain = zipf_rows(rng, domains, experts, zipf_s)
        by_topic = zipf_rows(rng, topics, experts, zipf_s)
        mean = g * base + d * by_domain[domain] + t * by_topic[topic]
        for out in (prefill, decode):
            draw = rng.standard_gamma((concentration * mean).astype(np.float32), dtype=np.float32)
            out[:, layer] = draw / draw.sum(axis=1, keepdims=True)
    return SyntheticTrace(vectors, prefill, decode, prompt_tokens, output_tokens, domain, topic)


def simulate_topk_routing(rng: np.random.Generator, probs: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """Route `tokens` i.i.d. tokens, each to k distinct experts drawn by Gumbel-top-k from probs: [..., K] -> counts [..., K]."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = np.log(np.maximum(probs, 1e-300))[..., None, :] + rng.gumbel(
        size=probs.shape[:-1] + (tokens, probs.shape[-1])
    )
    chosen = np.argpartition(-scores, top_k - 1, axis=-1)[..., :top_k]
    counts = np.zeros(probs.shape, dtype=np.int64)
    flat = counts.reshape(-1, probs.shape[-1])
    chosen = chosen.reshape(flat.shape[0], -1)
    for row in range(flat.shape[0]):
        flat[row] = np.bincount(chosen[row], minlength=probs.shape[-1])
    return counts


def example_hardware(expert_mb: float = 40.0) -> PlanHardware:
    """Made-up but plausible latencies (not measurements) for a model whose experts hold `expert_mb` MB.

    CPU experts stream their weights once per call (fixed part) and cost ~2 FLOP per weight per token;
    remote functions follow T_rem(y) = 4e-3 exp(-y / 1500) + 3e-4 s per token per 40 MB expert.
    """
    scale = expert_mb / 40.0
    memory = (128.0, 512.0, 1024.0, 1769.0, 3008.0, 5000.0, 7076.0, 10240.0)
    per_token = tuple(scale * (4e-3 * np.exp(-y / 1500.0) + 3e-4) for y in memory)
    return PlanHardware(
        gpu_layer=LinearLatency(2e-4, 2e-6),
        gpu_expert=LinearLatency(5e-5 * scale, 2e-7 * scale),
        cpu_expert=LinearLatency(2e-3 * scale, 1e-4 * scale),
        cpu_layer=LinearLatency(5e-3, 5e-5),
        remote_memory_mb=memory,
        remote_s_per_token=per_token,
        remote_invoke_overhead_s=3e-3,
        network_rtt_s=1e-3,
        network_bytes_per_s=1.25e9,
        host_to_gpu_bytes_per_s=25e9,
        load_bytes_per_s=1e9,
        cold_start_base_s=2.0,
        function_overhead_mb=256.0,
    )


def deepseek_v3_geometry() -> PlanModel:
    """DeepSeek-V3's MoE shape: 58 MoE layers x 256 routed experts, top-8, fp8 experts of 3 x 7168 x 2048."""
    return PlanModel(
        layers=58,
        experts=256,
        top_k=8,
        expert_bytes=3 * 7168 * 2048,
        non_expert_bytes=17 * GIB,
        hidden_bytes_per_token=7168 * 2,
    )
