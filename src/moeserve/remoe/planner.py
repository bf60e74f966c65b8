"""plan_remoe: the whole Remoe planner [IV] on arrays, and its baselines costed with the same model.

prediction (SPS for one request, or a trace's average for a deployment)
  -> MMP: remote experts per layer r and the main function's memory      [IV-C]  mmp.py
  -> remote experts: the r lowest-utility experts of each layer           [IV-D]  mmp.py
  -> remote memory: Lagrangian dual of the TPOT-coupled problem, rounded  [IV-D]  remote_memory.py
  -> replicas: LPT partitions and the replica-potential loop on TTFT      [IV-E]  replicas.py, lpt.py
  -> figures: TTFT (expected and worst-case bound), TPOT, cost; baselines [II]    cost.py
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.remoe.bounds import LoadBound, PredictedRoutingBound, RoutingHistory
from moeserve.remoe.cost import (
    CostModel,
    Figures,
    RemoteSplit,
    Workload,
    evaluate_all_cpu,
    evaluate_all_gpu,
    evaluate_fetch,
    evaluate_mix,
    evaluate_remoe,
    memory_problem,
    remoe_host_bytes,
)
from moeserve.remoe.inputs import RequestShape, Slo
from moeserve.remoe.lpt import lpt_partition
from moeserve.remoe.mmp import MmpResult, main_model_preallocation, select_remote_experts
from moeserve.remoe.remote_memory import MemorySolution, solve_memory
from moeserve.remoe.replicas import ReplicaPlan, plan_replicas


@dataclass(frozen=True)
class RemoePlan:
    split: RemoteSplit  # remote experts, replica partitions, memory per remote function
    remote_count: int  # r remote experts per layer (MMP)
    host_bytes: float  # main function host memory (pre-allocated for K - r local experts per layer)
    gpu_bytes: float  # main function GPU memory (non-expert modules)
    predicted: Figures  # expected TTFT / TPOT / cost of this plan on the evaluation workload
    ttft_bound_s: float  # worst-case TTFT bound at confidence 1 - delta
    slo: Slo
    mmp: MmpResult | None
    memory: MemorySolution | None  # None for a shape without remote functions chosen by remoe/shapes.py
    replicas: ReplicaPlan | None
    baselines: dict[str, Figures] = field(default_factory=dict)
    gpu_to_cpu_price_ratio: float = 0.0
    notes: tuple[str, ...] = ()
    # the deployment shape (remoe/shapes.py): plan_remoe itself always returns Remoe's split, "remoe"
    shape: str = "remoe"
    main_device: str = "gpu"  # where the non-expert modules run
    expert_device: str = "cpu"  # where the main function's own experts run
    runner_up: str | None = None  # the next cheapest shape that meets the SLOs
    margin_usd: float | None = None  # runner-up's cost per request minus this plan's


def plan_remoe(
    model: CostModel,
    prefill_share: np.ndarray,
    decode_share: np.ndarray | None,
    request: RequestShape,
    slo: Slo,
    bound: LoadBound | None = None,
    remote_count: int | None = None,
    rule: str = "min_cost",
    evaluate_on: Workload | None = None,
    baselines: bool = True,
    history: RoutingHistory | None = None,
) -> RemoePlan:
    """Plan one deployment or one request.

    prefill_share / decode_share: [L, K] predicted activation (rows sum to 1; decode defaults to prefill).
    bound: worst-case token bound (default: i.i.d. routing with the predicted shares, bounds.py).
    remote_count: fixed r (per-request planning under a deployed main function); None runs MMP.
    evaluate_on: workload the figures and baselines are computed on (default: the prediction).
    history: recorded prompts; when given, the TTFT bound is their conformal quantile (model-free,
        for deployment plans) instead of the analytic bound under `bound`'s routing model.
    """
    geo = model.geometry
    share = np.asarray(prefill_share)
    if share.ndim != 2 or share.shape != (geo.layers, geo.experts):
        raise MoeServeError(
            f"activation is {share.shape} (layers, experts) but the model profile has {(geo.layers, geo.experts)}: "
            "is the trace from another model?"
        )
    workload = Workload.from_shares(share, decode_share, request, geo.top_k)
    if bound is None:
        bound = PredictedRoutingBound.from_shares(
            workload.prefill_tokens / (request.prompt_tokens * geo.top_k), geo.top_k
        )
    notes: list[str] = []
    if remote_count is None:
        mmp = main_model_preallocation(model, workload, slo, bound, rule, history)
        candidates = mmp.candidates[:8]
    else:
        if not 0 <= remote_count <= geo.experts:
            raise MoeServeError(f"remote_count {remote_count} must lie in 0..{geo.experts}")
        mmp, candidates = None, (remote_count,)
    failure: MoeServeError | None = None
    for r in candidates:
        try:
            core = _plan_for_count(model, workload, slo, bound, r, history)
        except MoeServeError as exc:
            failure = failure or exc
            notes.append(f"r={r} rejected: {exc}")
            continue
        break
    else:
        raise failure if failure is not None else MoeServeError("no remote ratio meets the SLOs")
    split, memory, replicas, host_bytes = core
    target = workload if evaluate_on is None else evaluate_on
    predicted = replace(evaluate_remoe(model, split, target, host_bytes, slo.include_cold_start),
                        ttft_bound_s=replicas.ttft_bound_s)
    figures: dict[str, Figures] = {}
    if baselines:
        figures = {
            "all-gpu": evaluate_all_gpu(model, target, slo.include_cold_start),
            "all-cpu": evaluate_all_cpu(model, target, slo.include_cold_start),
            "mix": evaluate_mix(model, target, slo.include_cold_start),
            "fetch": evaluate_fetch(model, target, slo.include_cold_start),
            "remoe-even": _remoe_even(model, request, slo, target, rule, remote_count, history),
        }
    ratio = model.pricing.gpu_to_cpu_ratio
    if ratio < 3.0 * (1 - 1e-3):
        notes.append(
            f"GPU/CPU price ratio per GB-second is {ratio:.2f}, below the paper's assumption of >= 3"
        )
    if not memory.convex.all():
        notes.append(
            f"Theorem 2 does not hold on {int((~memory.convex).sum())} layers: their memory range starts below "
            f"2/theta2 = {memory.convex_from_mb:.0f} MB, where y * T_rem(y) is concave; solved by grid search, "
            f"duality gap {memory.relaxed_cost - memory.dual_value:.3g} USD"
        )
    return RemoePlan(
        split,
        int(split.remote.sum(axis=1).max(initial=0)),
        host_bytes,
        model.main_memory(host_bytes)[0],
        predicted,
        replicas.ttft_bound_s,
        slo,
        mmp,
        memory,
        replicas,
        figures,
        ratio,
        tuple(notes),
        main_device=model.main_device,
    )


def _plan_for_count(
    model: CostModel, workload: Workload, slo: Slo, bound: LoadBound, r: int, history: RoutingHistory | None
):
    geo = model.geometry
    remote = select_remote_experts(workload, geo.top_k, r)
    host_bytes = remoe_host_bytes(model, geo.experts - r)
    capacity = model.experts_per_function()
    z0 = np.full(geo.layers, int(np.ceil(r / capacity)) if r else 0)
    replica = np.full(remote.shape, -1, dtype=np.int64)
    for layer in range(geo.layers):
        if r:
            members = np.flatnonzero(remote[layer])
            replica[layer, members] = lpt_partition(
                workload.prefill_tokens[layer, members], int(z0[layer]), capacity
            )
    biggest = np.array([np.bincount(row[row >= 0], minlength=1).max() if r else 0 for row in replica])
    lower = model.function_floor_mb(biggest).astype(np.float64)
    start = RemoteSplit(remote, replica, np.zeros(geo.layers, np.int64))
    problem = memory_problem(model, start, workload, host_bytes, slo.tpot_s, lower)
    memory = solve_memory(problem, model.pricing.cpu)
    replicas = plan_replicas(
        model, remote, workload, memory.memory_mb, host_bytes, slo, bound, memory.multiplier, history
    )
    return replicas.split, memory, replicas, host_bytes


def _remoe_even(
    model: CostModel,
    request: RequestShape,
    slo: Slo,
    target: Workload,
    rule: str,
    remote_count: int | None,
    history,
) -> Figures:
    """Remoe planned from the even activation 1/K instead of a prediction, evaluated on the same workload."""
    geo = model.geometry
    even = np.full((geo.layers, geo.experts), 1.0 / geo.experts)
    try:
        plan = plan_remoe(model, even, None, request, slo, None, remote_count, rule, target, False, history)
    except MoeServeError as exc:
        return Figures(
            "remoe-even", np.inf, np.inf, np.inf, np.inf, np.inf, 0.0, 0.0, 0.0, False, f"infeasible: {exc}"
        )
    fig = plan.predicted
    return Figures(
        "remoe-even",
        fig.ttft_s,
        fig.tpot_s,
        fig.cost_usd,
        fig.main_usd,
        fig.remote_usd,
        fig.gpu_bytes,
        fig.host_bytes,
        fig.cold_start_s,
        fig.fits,
        fig.note,
        plan.ttft_bound_s,
    )


def evaluate_plan(model: CostModel, plan: RemoePlan, workload: Workload) -> Figures:
    """The figures of a plan's deployment shape on a workload (the cost model the shape was chosen with)."""
    cold = plan.slo.include_cold_start
    if plan.shape == "all-gpu":
        return evaluate_all_gpu(model, workload, cold)
    if plan.shape == "all-cpu":
        return evaluate_all_cpu(model, workload, cold)
    on = model.on_cpu() if plan.main_device == "cpu" else model
    return evaluate_remoe(on, plan.split, workload, plan.host_bytes, cold, plan.shape)


@dataclass(frozen=True)
class Replay:
    """Actual routing of recorded prompts pushed through a plan's split (cost.py's model)."""

    ttft_s: np.ndarray  # [P]
    tpot_s: np.ndarray  # [P]
    cost_usd: np.ndarray  # [P]
    ttft_met: float  # share of prompts with TTFT <= SLO
    tpot_met: float
    both_met: float


def replay(
    model: CostModel,
    plan: RemoePlan,
    prefill_shares: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    decode_shares: np.ndarray | None = None,
) -> Replay:
    """prefill_shares / decode_shares: [P, L, K] per-prompt activation (rows sum to 1); tokens: [P]."""
    shares = np.asarray(prefill_shares)
    if shares.ndim != 3 or shares.shape[0] == 0:
        raise MoeServeError(f"replay needs [prompts > 0, layers, experts] activation, got {shares.shape}")
    k = model.geometry.top_k
    rows = []
    for i in range(shares.shape[0]):
        request = RequestShape(int(prompt_tokens[i]), int(output_tokens[i]))
        base = Workload.from_shares(
            shares[i], None if decode_shares is None else decode_shares[i], request, k
        )
        workload = Workload(base.prefill_tokens, base.decode_share, request, actual=True)
        fig = evaluate_plan(model, plan, workload)
        rows.append((fig.ttft_s, fig.tpot_s, fig.cost_usd))
    ttft, tpot, cost = (np.array(c) for c in zip(*rows, strict=True))
    ttft_ok, tpot_ok = ttft <= plan.slo.ttft_s, tpot <= plan.slo.tpot_s
    return Replay(
        ttft, tpot, cost, float(ttft_ok.mean()), float(tpot_ok.mean()), float((ttft_ok & tpot_ok).mean())
    )
