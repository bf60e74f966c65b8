"""Main Model Pre-allocation [IV-C]: how many experts per layer go remote, hence the main function's memory.

The main function is deployed before requests arrive, so its host memory must hold the local experts
of any request: (K - r) per layer for r remote experts per layer. For every r in 0..K this module
computes, vectorised over r:

- a worst-case TTFT bound: the local experts (the K - r with highest predicted utility) receive at
  most the bound's tokens; the remote side is taken at its best, one expert per replica at the largest
  memory (replicas and memory are sized later, [IV-D], [IV-E]); union bound over layers and sets.
  With a routing history instead: the conformal quantile of the history prompts' TTFT under each r.
- the expected TPOT with remote functions at the largest memory (so infeasible means infeasible);
- a cost proxy: expected cost with remote functions at the memory that minimises y * T_rem(y).

Among the r meeting both SLOs, rule "min_cost" orders by the proxy, "smallest" by r (the paper picks
the smallest remote ratio b meeting the SLOs). The planner tries candidates in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.pricing.billing import relaxed_function_usd
from moeserve.remoe.bounds import LoadBound, RoutingHistory, conformal_upper
from moeserve.remoe.cost import CostModel, Workload, cold_start_s, main_usd_per_s, remoe_host_bytes
from moeserve.remoe.inputs import Slo
from moeserve.units import MIB


@dataclass(frozen=True)
class MmpResult:
    remote_count: int  # r: remote experts per layer of the first candidate
    candidates: tuple[int, ...]  # every r meeting the SLOs, in the rule's order
    ttft_bound_s: np.ndarray  # [K+1] worst-case TTFT bound per r (best-case remote side)
    tpot_s: np.ndarray  # [K+1] expected TPOT per r at the largest remote memory
    proxy_usd: np.ndarray  # [K+1] expected cost per request per r
    feasible: np.ndarray  # [K+1] bool

    @property
    def remote_ratio(self) -> float:
        return self.remote_count / (self.feasible.size - 1)


def expert_utility(workload: Workload, top_k: int) -> np.ndarray:
    """Predicted tokens per expert over the whole request, prefill + decode [IV-D]. [L, K]"""
    return workload.prefill_tokens + workload.request.decode_steps * top_k * workload.decode_share


def utility_order(workload: Workload, top_k: int) -> np.ndarray:
    """[L, K] expert ids per layer from lowest to highest utility (ties: lower id first)."""
    return np.argsort(expert_utility(workload, top_k), axis=1, kind="stable")


def select_remote_experts(workload: Workload, top_k: int, remote_count: int) -> np.ndarray:
    """[L, K] bool: the remote_count lowest-utility experts of every layer [IV-D]."""
    order = utility_order(workload, top_k)
    remote = np.zeros(order.shape, dtype=bool)
    np.put_along_axis(remote, order[:, :remote_count], True, axis=1)
    return remote


def cheapest_memory_mb(model: CostModel) -> float:
    """The memory minimising y * T_rem(y) (cost of one token-expert) on the provider's range."""
    cpu = model.pricing.cpu
    grid = np.arange(cpu.memory_min_mb, cpu.memory_max_mb + 1, max(cpu.memory_step_mb, 8), dtype=np.float64)
    return float(grid[np.argmin(grid * model.curve(grid))])


def main_model_preallocation(
    model: CostModel,
    workload: Workload,
    slo: Slo,
    bound: LoadBound,
    rule: str = "min_cost",
    history: RoutingHistory | None = None,
) -> MmpResult:
    """Evaluate every r in 0..K; with a history the TTFT bound is the conformal quantile over its prompts."""
    geo, hw, cpu = model.geometry, model.hardware, model.pricing.cpu
    layers, experts, k = geo.layers, geo.experts, geo.top_k
    n, steps = workload.request.prompt_tokens, workload.request.decode_steps
    if rule not in ("min_cost", "smallest"):
        raise MoeServeError(f"unknown MMP rule {rule!r} (min_cost or smallest)")
    if model.experts_per_function() < 1:
        raise MoeServeError(f"one expert ({model.expert_mb:.0f} MB) does not fit the largest remote function")
    order = utility_order(workload, k)
    counts = np.take_along_axis(workload.prefill_tokens, order, axis=1)
    share = np.take_along_axis(workload.decode_share, order, axis=1)
    r = np.arange(experts + 1)
    cpu_e, net_per_token = hw.cpu_expert, 2.0 * geo.hidden_bytes_per_token / hw.network_bytes_per_s
    call = hw.network_rtt_s + hw.remote_invoke_overhead_s
    gpu_prefill, gpu_decode = float(hw.gpu_layer(n)), float(hw.gpu_layer(1.0))

    def cum(x: np.ndarray) -> np.ndarray:  # [L, K] -> [L, K+1], sum of the first r
        return np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x, axis=1)], axis=1)

    def chunks(tokens: np.ndarray) -> np.ndarray:
        return np.maximum(np.ceil(tokens * geo.hidden_bytes_per_token / cpu.payload_limit_bytes), 1.0)

    # Worst case (TTFT bound): local side at the bound, remote side one expert per replica, largest memory.
    fastest = float(model.curve(cpu.memory_max_mb))
    main_bytes = geo.non_expert_bytes + remoe_host_bytes(model, experts - r)
    cold = np.array([cold_start_s(model, b) for b in main_bytes]) if slo.include_cold_start else 0.0
    if history is None:
        delta_set = slo.delta / (2 * layers)
        local_bound = bound.nested_upper(order[:, ::-1], n, delta_set)[
            :, ::-1
        ]  # [L, K+1]: last K - r experts
        local_worst = cpu_e.fixed_s * np.minimum(experts - r, local_bound) + cpu_e.per_token_s * local_bound
        single = np.take_along_axis(bound.expert_upper(n, delta_set / experts), order, axis=1)
        single_max = np.concatenate([np.zeros((layers, 1)), np.maximum.accumulate(single, axis=1)], axis=1)
        remote_worst = np.where(
            r > 0, chunks(single_max) * call + single_max * (net_per_token + fastest), 0.0
        )
        ttft_bound = cold + (gpu_prefill + np.maximum(local_worst, remote_worst)).sum(axis=0)
    else:
        per_prompt = layers * hw.gpu_layer(history.prompt_tokens)[:, None] + np.zeros((1, experts + 1))
        for layer in range(layers):
            c = history.counts(layer, k)[:, order[layer]]  # [N, K], lowest utility first
            cpu_time = np.where(c > 0, cpu_e.fixed_s + cpu_e.per_token_s * c, 0.0)
            local = cum(cpu_time[:, ::-1])[:, ::-1]
            single = np.where(c > 0, chunks(c) * call + c * (net_per_token + fastest), 0.0)
            remote = np.concatenate(
                [np.zeros((c.shape[0], 1)), np.maximum.accumulate(single, axis=1)], axis=1
            )
            per_prompt += np.maximum(local, remote)
        ttft_bound = cold + conformal_upper(per_prompt, slo.delta, axis=0)

    def tpot_at(per_token: float) -> np.ndarray:
        hits = k * cum(share)
        any_hit = -np.expm1(k * np.log1p(-np.minimum(cum(share), 1.0 - 1e-12)))
        local = (cpu_e.fixed_s + cpu_e.per_token_s) * (k - hits)
        remote = np.where(r > 0, any_hit * call + hits * (net_per_token + per_token), 0.0)
        return (gpu_decode + np.maximum(local, remote)).sum(axis=0)

    tpot = tpot_at(fastest)
    feasible = (ttft_bound <= slo.ttft_s) & (tpot <= slo.tpot_s)

    # Cost proxy at the cheapest memory per token-expert.
    y = max(cheapest_memory_mb(model), float(model.function_floor_mb(np.array([1]))[0]))
    per_token = float(model.curve(y))
    active = -np.expm1(-counts)
    local_time = cum((cpu_e.fixed_s * active + cpu_e.per_token_s * counts)[:, ::-1])[:, ::-1]
    busiest = np.concatenate([np.zeros((layers, 1)), np.maximum.accumulate(counts, axis=1)], axis=1)
    remote_time = np.where(r > 0, call + busiest * (net_per_token + per_token), 0.0)
    ttft = (gpu_prefill + np.maximum(local_time, remote_time)).sum(axis=0)
    duration = ttft + steps * tpot_at(per_token)
    main = np.array([main_usd_per_s(model, b) for b in remoe_host_bytes(model, experts - r)]) * duration
    per_function = max(int((y - hw.function_overhead_mb) // model.expert_mb), 1)
    replicas = np.ceil(r / per_function)
    any_hit = -np.expm1(k * np.log1p(-np.minimum(cum(share), 1.0 - 1e-12)))
    calls = (replicas + steps * any_hit).sum(axis=0)
    work = (cum(counts) + steps * k * cum(share)).sum(axis=0)
    proxy = main + relaxed_function_usd(cpu, y, work * per_token + calls * hw.remote_invoke_overhead_s, calls)

    if not feasible.any():
        if (tpot > slo.tpot_s).all():
            raise MoeServeError(
                f"TPOT SLO {slo.tpot_s:g} s is infeasible: the best remote ratio gives {tpot.min():.4f} s per token"
            )
        best = ttft_bound[tpot <= slo.tpot_s].min()
        raise MoeServeError(
            f"TTFT SLO {slo.ttft_s:g} s is infeasible: the best worst-case bound at {1 - slo.delta:.0%} is {best:.3f} s"
        )
    ok = np.flatnonzero(feasible)
    ranked = ok[np.argsort(proxy[ok], kind="stable")] if rule == "min_cost" else ok
    return MmpResult(int(ranked[0]), tuple(int(v) for v in ranked), ttft_bound, tpot, proxy, feasible)


def host_mb(model: CostModel, remote_count: int) -> float:
    return remoe_host_bytes(model, model.geometry.experts - remote_count) / MIB
