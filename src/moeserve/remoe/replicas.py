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

from dataclasses import dataclass, replace

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.remoe.bounds import LoadBound, RoutingHistory
from moeserve.remoe.cost import CostModel, RemoteSplit, Workload, cold_start_s, memory_problem, replica_terms
from moeserve.remoe.inputs import Slo
from moeserve.remoe.lpt import lpt_partition


@dataclass(frozen=True)
class ReplicaPlan:
    split: RemoteSplit
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
        self.remote_share = workload.decode_share[layer, self.remote]
        self.order = np.argsort(-self.loads, kind="stable")  # LPT's job order, the same for every z
        self._floors: dict[int, float] = {}
        self._partitions: dict[int, tuple] = {}
        # the memory problem of this layer with every remote expert in one replica: what does not depend on
        # the partition; option() replaces the per-replica terms
        if self.remote.size:
            one = np.where(remote_row, 0, -1)[None, :].astype(np.int64)
            self.base = memory_problem(model, RemoteSplit(remote_row[None, :].copy(), one, np.zeros(1, np.int64)),
                                       self.workload, host_bytes, slo.tpot_s, np.zeros(1))

    def floor_of(self, biggest: int) -> float:
        """Smallest memory holding `biggest` experts (memoised: the replica loop asks again and again)."""
        if biggest not in self._floors:
            self._floors[biggest] = float(self.model.function_floor_mb(np.array([biggest]))[0])
        return self._floors[biggest]

    def partition(self, z: int):
        """The LPT partition over z replicas and what follows from it alone (memoised per z: the loop asks for
        the current z again with more memory): (part [R], memory floor, memory problem, worst-case tokens
        per replica [1 or N, z], their network and invocation seconds)."""
        if z in self._partitions:
            return self._partitions[z]
        model, geo, hw = self.model, self.model.geometry, self.model.hardware
        part = lpt_partition(self.loads, z, self.capacity, self.order)
        floor = self.floor_of(int(np.bincount(part, minlength=z).max()))
        replica_tokens = np.bincount(part, weights=self.loads, minlength=z)[None, :]
        fixed, invocations, hit = replica_terms(
            model, self.workload, replica_tokens, np.bincount(part, weights=self.remote_share, minlength=z)[None, :]
        )
        billed = hw.remote_invoke_overhead_s * (invocations.sum() + self.workload.request.decode_steps * hit.sum())
        problem = replace(self.base, prefill_fixed_s=fixed, prefill_tokens=replica_tokens,
                          billed_fixed_s=np.array([billed]), lower_mb=np.array([floor]))
        if self.history is None:
            tokens = self.bound.partition_upper(self.layer, self.remote, part, z, self.n, self.delta_local / z)[None, :]
        else:
            onehot = np.zeros((self.remote.size, z))
            onehot[np.arange(self.remote.size), part] = 1.0
            tokens = self.remote_counts @ onehot  # [N, z]
        cpu = model.pricing.cpu
        calls = np.maximum(np.ceil(tokens * geo.hidden_bytes_per_token / cpu.payload_limit_bytes), 1.0)
        send = 2.0 * tokens * geo.hidden_bytes_per_token / hw.network_bytes_per_s
        network = calls * (hw.network_rtt_s + hw.remote_invoke_overhead_s) + send
        self._partitions = {z: (part, floor, problem, tokens, network)} | {
            k: v for k, v in self._partitions.items() if k >= z - 1}  # the loop only moves z up
        return self._partitions[z]

    def floor_mb(self, z: int) -> float:
        return self.floor_of(int(np.ceil(self.remote.size / z)) if z else 0)

    def option(self, z: int, memory_mb: float, reoptimise: bool = False) -> _Option:
        """z replicas at memory_mb (raised to the partition's floor); reoptimise: best memory for lam instead."""
        model, geo, cpu = self.model, self.model.geometry, self.model.pricing.cpu
        replica = np.full(geo.experts, -1, dtype=np.int64)
        if z == 0:
            return _Option(replica, 0, self.gpu + self.local_worst, 0.0, 0.0)
        part, floor, problem, tokens, network = self.partition(z)
        replica[self.remote] = part
        if reoptimise:
            grid = np.arange(floor, cpu.memory_max_mb + 1, cpu.memory_step_mb, dtype=np.float64)[None, :]
            memory = int(grid[0, np.argmin(problem.lagrangian_terms(grid, self.lam)[0])])
        else:
            memory = cpu.round_memory_up(max(memory_mb, floor))
        remote = np.where(tokens > 0, network + tokens * float(model.curve(memory)), 0.0).max(axis=1)
        cost, decode = problem.cost_and_decode(np.array([[float(memory)]]))
        return _Option(replica, memory, self.gpu + np.maximum(self.local_worst, remote), float(cost[0, 0]),
                       float(decode[0, 0]))

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

    # The moves on offer, as arrays [L, 2] (slot 0: one more replica, slot 1: more memory), so that each step
    # ranks every layer's moves at once; only the moved layer's row is recomputed.
    width = 1 if history is None else history.prompt_tokens.size
    moves: list[list[tuple[int, _Option] | None]] = [[None, None] for _ in range(geo.layers)]
    valid = np.zeros((geo.layers, 2), dtype=bool)
    extra = np.zeros((geo.layers, 2))
    move_decode = np.zeros((geo.layers, 2))
    change = np.zeros((geo.layers, 2, width))  # worst-case layer time now minus after the move

    def offer(i: int, phase: int) -> None:
        row = propose(i, phase)
        moves[i] = [None, None]
        valid[i] = False
        for grow, p in row:
            slot = 0 if grow else 1
            moves[i][slot] = (grow, p)
            valid[i, slot] = True
            extra[i, slot] = p.cost - current[i].cost
            move_decode[i, slot] = p.decode_s
            change[i, slot] = current[i].worst_s - p.worst_s

    for i in range(geo.layers):
        offer(i, 1)
    total = np.sum([o.worst_s for o in current], axis=0)
    decode = np.array([o.decode_s for o in current])
    added = 0
    for phase in (1, 2):
        if phase == 2:
            valid[:, 1] = False  # phase 2 adds replicas only
        for _ in range(max_steps):
            bound_now = ttft_bound(total)
            if phase == 1 and bound_now <= slo.ttft_s:
                break
            tpot_now = gpu_decode + decode.sum()
            ok = valid & (tpot_now - decode[:, None] + move_decode <= slo.tpot_s + 1e-12)
            best, best_i = None, -1
            if phase == 1:
                # A quantile moves in steps; rank moves by the mean reduction over the prompts at or above it;
                # free reductions first, then reduction per extra dollar; ties: the lower layer, replica first.
                if history is None:
                    gain = change[..., 0]
                else:
                    gain = change[..., total >= bound_now - cold - 1e-12].mean(axis=-1)
                ok &= gain > 1e-12
                free = ok & (extra <= 0)
                pool = free if free.any() else ok
                if pool.any():
                    score = np.where(extra <= 0, gain, gain / np.where(extra > 0, extra, 1.0))
                    flat = int(np.argmax(np.where(pool, score, -np.inf)))
                    best_i, best = flat // 2, moves[flat // 2][flat % 2]
            else:
                ok &= extra < -1e-15
                flat_ok = np.flatnonzero(ok)
                for flat in flat_ok[np.argsort(extra.ravel()[flat_ok], kind="stable")]:
                    i = int(flat) // 2
                    if ttft_bound(total - change[i, int(flat) % 2]) <= slo.ttft_s + 1e-12:
                        best_i, best = i, moves[i][int(flat) % 2]
                        break
            if best is None:
                if phase == 1:
                    raise MoeServeError(
                        f"TTFT SLO {slo.ttft_s:g} s is infeasible: more replicas and memory cannot bring the "
                        f"worst-case bound ({1 - slo.delta:.0%}) below {bound_now:.3f} s"
                    )
                break
            grow, p = best
            i = best_i
            total = total - current[i].worst_s + p.worst_s
            current[i] = p
            z[i] += grow
            added += grow
            decode[i] = p.decode_s
            offer(i, phase)
            if phase == 2:
                valid[i, 1] = False
    split = RemoteSplit(
        remote.copy(),
        np.stack([o.replica for o in current]),
        np.array(
            [o.memory_mb if layers[i].remote.size else 0 for i, o in enumerate(current)], dtype=np.int64
        ),
    )
    return ReplicaPlan(split, ttft_bound(total), np.array([o.worst_s.mean() for o in current]), added)
