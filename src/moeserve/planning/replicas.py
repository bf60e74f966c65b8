"""Replicas [IV-E]: split each layer's remote experts over z_l replicas (LPT by predicted prefill load)
and add replicas greedily by their "potential".

Replicas change prefill only (a decode token touches at most k experts), so the loop is driven by the
worst-case TTFT bound (the paper's text says TPOT here; it can only mean TTFT):

1. while the bound exceeds the TTFT SLO, make the move with the largest bound reduction per extra cost
   (free reductions first): one more replica for a layer or, our addition for layers where replicas no
   longer help, 25% more memory for its replicas; no move reduces the bound -> the SLO is infeasible;
2. then, while one more replica lowers the expected cost (faster prefill shortens the main function's
   billed time; a smaller partition lets memory, re-optimised with the TPOT multiplier, drop) without
   breaking either SLO, add the best such replica.

TTFT bound, two kinds:
- analytic (a LoadBound): the layer's local experts and each replica take their set bound at
  delta / (2 L) and delta / (2 L z_l), so all sets of all layers hold together with prob >= 1 - delta;
- history (a RoutingHistory): per recorded prompt the TTFT under the plan, and its conformal quantile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.planning.bounds import LoadBound, RoutingHistory
from moeserve.planning.cost import CostModel, Placement, Workload, cold_start_s, memory_problem
from moeserve.planning.inputs import Slo
from moeserve.planning.lpt import lpt_partition


@dataclass(frozen=True)
class ReplicaPlan:
    placement: Placement
    ttft_bound_s: float  # worst-case TTFT at confidence 1 - delta
    layer_bound_s: np.ndarray  # [L] worst-case layer prefill time (analytic) or its history mean
    added: int  # replicas added by the potential loop


@dataclass(frozen=True)
class _Option:
    replica: np.ndarray  # [K] replica id or -1
    memory_mb: int
    worst_s: np.ndarray  # [1] analytic layer bound, or [N] layer time of each history prompt
    cost: float  # F_l at memory_mb (USD per request)
    decode_s: float


class _Layer:
    """Evaluates one layer with z replicas: LPT partition, memory, worst-case prefill time, cost."""

    def __init__(
        self,
        model: CostModel,
        workload: Workload,
        remote_row,
        layer,
        host_bytes,
        slo: Slo,
        bound,
        history,
        lam,
    ):
        geo, hw = model.geometry, model.hardware
        self.model, self.layer, self.bound, self.history, self.lam = model, layer, bound, history, lam
        self.remote = np.flatnonzero(remote_row)
        self.local = np.flatnonzero(~remote_row)
        self.loads = workload.prefill_tokens[layer, self.remote]
        self.workload = Workload(
            workload.prefill_tokens[layer : layer + 1],
            workload.decode_share[layer : layer + 1],
            workload.request,
            workload.actual,
        )
        self.host_bytes, self.tpot_slo_s = host_bytes, slo.tpot_s
        self.n = workload.request.prompt_tokens
        self.delta_local = slo.delta / (2 * geo.layers)
        cpu_e = hw.cpu_expert
        if history is None:
            tokens = bound.set_upper(layer, self.local, self.n, self.delta_local) if self.local.size else 0.0
            self.local_worst = np.array(
                [cpu_e.fixed_s * min(self.local.size, tokens) + cpu_e.per_token_s * tokens]
            )
            self.gpu = np.array([float(hw.gpu_layer(self.n))])
        else:
            counts = history.counts(layer, geo.top_k)  # [N, K]
            self.remote_counts = np.ascontiguousarray(counts[:, self.remote])
            local = counts[:, self.local]
            self.local_worst = np.where(local > 0, cpu_e.fixed_s + cpu_e.per_token_s * local, 0.0).sum(axis=1)
            self.gpu = hw.gpu_layer(history.prompt_tokens)
        self.capacity = model.experts_per_function()
        self.min_replicas = int(np.ceil(self.remote.size / self.capacity)) if self.remote.size else 0

    def floor_mb(self, z: int) -> float:
        biggest = int(np.ceil(self.remote.size / z)) if z else 0
        return float(self.model.function_floor_mb(np.array([biggest]))[0])

    def option(self, z: int, memory_mb: float, reoptimise: bool = False) -> _Option:
        """z replicas at memory_mb (raised to the partition's floor); reoptimise: best memory for lam instead."""
        model, geo, hw, cpu = self.model, self.model.geometry, self.model.hardware, self.model.pricing.cpu
        replica = np.full(geo.experts, -1, dtype=np.int64)
        if z == 0:
            return _Option(replica, 0, self.gpu + self.local_worst, 0.0, 0.0)
        part = lpt_partition(self.loads, z, self.capacity)
        replica[self.remote] = part
        biggest = int(np.bincount(part, minlength=z).max())
        floor = float(model.function_floor_mb(np.array([biggest]))[0])
        placement = Placement(self.remote_mask()[None, :], replica[None, :], np.zeros(1, np.int64))
        problem = memory_problem(
            model, placement, self.workload, self.host_bytes, self.tpot_slo_s, np.array([floor])
        )
        if reoptimise:
            grid = np.arange(floor, cpu.memory_max_mb + 1, cpu.memory_step_mb, dtype=np.float64)[None, :]
            memory = int(grid[0, np.argmin(problem.lagrangian_terms(grid, self.lam)[0])])
        else:
            memory = cpu.round_memory_up(max(memory_mb, floor))
        if self.history is None:
            tokens = self.bound.partition_upper(
                self.layer, self.remote, part, z, self.n, self.delta_local / z
            )[None, :]
        else:
            onehot = np.zeros((self.remote.size, z))
            onehot[np.arange(self.remote.size), part] = 1.0
            tokens = self.remote_counts @ onehot  # [N, z]
        calls = np.maximum(np.ceil(tokens * geo.hidden_bytes_per_token / cpu.payload_limit_bytes), 1.0)
        send = 2.0 * tokens * geo.hidden_bytes_per_token / hw.network_bytes_per_s
        per_replica = (
            calls * (hw.network_rtt_s + hw.remote_invoke_overhead_s)
            + send
            + tokens * float(model.curve(memory))
        )
        remote = np.where(tokens > 0, per_replica, 0.0).max(axis=1)
        y = np.array([[float(memory)]])
        return _Option(
            replica,
            memory,
            self.gpu + np.maximum(self.local_worst, remote),
            float(problem.cost(y)[0, 0]),
            float(problem.decode_s(y)[0, 0]),
        )

    def remote_mask(self) -> np.ndarray:
        mask = np.zeros(self.model.geometry.experts, dtype=bool)
        mask[self.remote] = True
        return mask


def plan_replicas(
    model: CostModel,
    remote: np.ndarray,
    workload: Workload,
    memory_mb: np.ndarray,
    host_bytes: float,
    slo: Slo,
    bound: LoadBound,
    multiplier: float,
    history: RoutingHistory | None = None,
    memory_growth: float = 1.25,
    max_steps: int = 100_000,
) -> ReplicaPlan:
    """remote: [L, K] bool; memory_mb: [L] from the memory solution; multiplier: its TPOT multiplier lam*."""
    geo, cpu = model.geometry, model.pricing.cpu
    layers = [
        _Layer(model, workload, remote[i], i, host_bytes, slo, bound, history, multiplier)
        for i in range(geo.layers)
    ]
    z = np.array([layer.min_replicas for layer in layers], dtype=np.int64)
    current = [layer.option(int(z[i]), float(memory_mb[i])) for i, layer in enumerate(layers)]
    gpu_decode = float(model.hardware.gpu_layer(1.0)) * geo.layers
    cold = cold_start_s(model, geo.non_expert_bytes + host_bytes) if slo.include_cold_start else 0.0

    def ttft_bound(total: np.ndarray) -> float:
        return cold + (float(total[0]) if history is None else history.upper(total, slo.delta))

    def propose(i: int, phase: int) -> list[tuple[int, _Option]]:
        """Moves for layer i: one more replica (memory re-optimised when the partition floor binds) and,
        in phase 1, more memory for the same replicas."""
        layer, now, moves = layers[i], current[i], []
        if layer.remote.size == 0:
            return moves
        if z[i] < layer.remote.size:
            binding = now.memory_mb <= layer.floor_mb(int(z[i])) + cpu.memory_step_mb
            moves.append((1, layer.option(int(z[i]) + 1, now.memory_mb, reoptimise=binding)))
        if phase == 1 and now.memory_mb < cpu.memory_max_mb:
            moves.append((0, layer.option(int(z[i]), min(now.memory_mb * memory_growth, cpu.memory_max_mb))))
        return moves

    proposals = [propose(i, 1) for i in range(geo.layers)]
    total = np.sum([o.worst_s for o in current], axis=0)
    decode = np.array([o.decode_s for o in current])
    added = 0
    for phase in (1, 2):
        if phase == 2:
            proposals = [[m for m in moves if m[0]] for moves in proposals]
        for _ in range(max_steps):
            bound_now = ttft_bound(total)
            if phase == 1 and bound_now <= slo.ttft_s:
                break
            tpot_now = gpu_decode + decode.sum()
            candidates = []
            for i, moves in enumerate(proposals):
                for grow, p in moves:
                    extra = p.cost - current[i].cost
                    if tpot_now - decode[i] + p.decode_s > slo.tpot_s + 1e-12 or (
                        phase == 2 and extra >= -1e-15
                    ):
                        continue
                    candidates.append((extra, i, grow, p))
            best = None
            if phase == 1:
                # A quantile moves in steps; rank moves by the mean over the prompts at or above it.
                tail = slice(None) if history is None else total >= bound_now - cold - 1e-12
                best_key = None
                for extra, i, grow, p in candidates:
                    gain = float(total[tail].mean() - (total - current[i].worst_s + p.worst_s)[tail].mean())
                    if gain <= 1e-12:
                        continue
                    key = (extra <= 0, gain if extra <= 0 else gain / extra)
                    if best_key is None or key > best_key:
                        best, best_key = (i, grow, p), key
            else:
                for _extra, i, grow, p in sorted(candidates, key=lambda c: c[0]):
                    if ttft_bound(total - current[i].worst_s + p.worst_s) <= slo.ttft_s + 1e-12:
                        best = (i, grow, p)
                        break
            if best is None:
                if phase == 1:
                    raise MoeServeError(
                        f"TTFT SLO {slo.ttft_s:g} s is infeasible: more replicas and memory cannot bring the "
                        f"worst-case bound ({1 - slo.delta:.0%}) below {bound_now:.3f} s"
                    )
                break
            i, grow, p = best
            total = total - current[i].worst_s + p.worst_s
            current[i] = p
            z[i] += grow
            added += grow
            decode[i] = p.decode_s
            proposals[i] = propose(i, phase)
    placement = Placement(
        remote.copy(),
        np.stack([o.replica for o in current]),
        np.array(
            [o.memory_mb if layers[i].remote.size else 0 for i, o in enumerate(current)], dtype=np.int64
        ),
    )
    return ReplicaPlan(placement, ttft_bound(total), np.array([o.worst_s.mean() for o in current]), added)
