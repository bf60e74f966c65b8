"""The cheapest deployment shape that meets the SLOs, among the shapes the cost model prices [II].

Remoe's split (non-expert modules on a GPU, experts on the main function's CPU, rare experts remote,
`planner.plan_remoe`) is one shape. The same cost model prices others, and on some models, prices and
SLOs one of them is cheaper while meeting the SLOs too (the demo at loose SLOs: all-CPU is ~16x cheaper
than the GPU main function). `plan_cheapest` costs every shape and returns the cheapest that meets
the SLOs, with the runner-up and the margin:

| shape | non-expert modules | main function's experts | remote functions | how |
|---|---|---|---|---|
| remoe | GPU | CPU | rare experts (MMP, dual, LPT) | plan_remoe |
| remoe-cpu | CPU function | CPU | rare experts | plan_remoe on `CostModel.on_cpu()` |
| remoe-even | GPU | CPU | planned from the even activation | plan_remoe on 1/K |
| mix | GPU | CPU, all | none | evaluate_mix |
| all-gpu | GPU | GPU, all | none | evaluate_all_gpu |
| all-cpu | CPU function | CPU, all | none | evaluate_all_cpu |
| fetch | GPU | host memory, copied to the GPU per layer | none | evaluate_fetch |

`fetch` is costed for comparison but never chosen: `moeserve serve` has no just-in-time expert copying.
"Meets the SLOs" is one rule for every shape (`Figures.meets`): expected TTFT and TPOT within the SLOs,
fits the providers' limits, and a worst-case TTFT bound within the TTFT SLO. The bound of a Remoe shape
is its planner's (analytic or conformal, planner.py); a shape without remote functions has every expert
local, so its worst case is deterministic: every expert a prompt of the planned length can reach
(min(K, n k) per layer) pays its fixed cost, and the n k token-expert pairs their per-token cost.
Without a GPU (`CostModel.gpu_available` False) only the CPU shapes (remoe-cpu, all-cpu) are planned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.remoe.bounds import LoadBound, RoutingHistory
from moeserve.remoe.cost import (
    CostModel,
    Figures,
    RemoteSplit,
    Workload,
    evaluate_all_cpu,
    evaluate_all_gpu,
    evaluate_fetch,
    evaluate_mix,
    remoe_host_bytes,
)
from moeserve.remoe.inputs import RequestShape, Slo
from moeserve.remoe.planner import RemoePlan, plan_remoe

NOT_EXECUTABLE = {"fetch": "serve has no just-in-time expert copying to the GPU"}
GPU_SHAPES = ("remoe", "remoe-even", "mix", "all-gpu", "fetch")


@dataclass(frozen=True)
class Shape:
    """One costed deployment shape: where things run, its split of the experts and its figures."""

    name: str
    main_device: str  # gpu | cpu: where the non-expert modules run
    expert_device: str  # gpu | cpu: where the main function's experts run
    split: RemoteSplit
    host_bytes: float  # the main function's pre-allocated host memory for its experts (+ runtime)
    figures: Figures  # with ttft_bound_s set
    plan: RemoePlan | None = None  # the Remoe planner's result for the Remoe shapes

    @property
    def executable(self) -> bool:
        return self.name not in NOT_EXECUTABLE


def worst_case_workload(workload: Workload, top_k: int) -> Workload:
    """The all-local worst case of `workload`'s request: every expert a prompt of n tokens can reach is
    active (all K when n k >= K, else the n k with the most predicted tokens), the n k pairs unchanged."""
    c = workload.prefill_tokens
    layers, experts = c.shape
    reach = min(experts, workload.request.prompt_tokens * top_k)
    order = np.argsort(-c, axis=1, kind="stable")[:, :reach]
    active = np.zeros(c.shape, dtype=bool)
    np.put_along_axis(active, order, True, axis=1)
    counts = np.where(active, np.maximum(c, 1e-12), 0.0)
    counts *= (c.sum(axis=1, keepdims=True) / counts.sum(axis=1, keepdims=True))
    return Workload(counts, workload.decode_share, workload.request, actual=True)


def _bounded(fig: Figures, worst: Figures) -> Figures:
    return replace(fig, ttft_bound_s=max(worst.ttft_s, fig.ttft_s))


def _local_shapes(model: CostModel, target: Workload, cold: bool) -> list[Shape]:
    geo = model.geometry
    worst = worst_case_workload(target, geo.top_k)
    local = RemoteSplit.all_local(geo.layers, geo.experts)
    shapes = [Shape("all-cpu", "cpu", "cpu", local, remoe_host_bytes(model, geo.experts),
                    _bounded(evaluate_all_cpu(model, target, cold), evaluate_all_cpu(model, worst, cold)))]
    if model.gpu_available:
        overhead = remoe_host_bytes(model, 0)
        shapes += [
            Shape("mix", "gpu", "cpu", local, remoe_host_bytes(model, geo.experts),
                  _bounded(evaluate_mix(model, target, cold), evaluate_mix(model, worst, cold))),
            Shape("all-gpu", "gpu", "gpu", local, overhead,
                  _bounded(evaluate_all_gpu(model, target, cold), evaluate_all_gpu(model, worst, cold))),
            Shape("fetch", "gpu", "cpu", local, overhead,
                  _bounded(evaluate_fetch(model, target, cold), evaluate_fetch(model, worst, cold))),
        ]
    return shapes


def _remoe_shape(name: str, expert_device: str, plan: RemoePlan) -> Shape:
    return Shape(name, plan.main_device, expert_device, plan.split, plan.host_bytes,
                 replace(plan.predicted, strategy=name), plan)


def _infeasible(name: str, exc: MoeServeError) -> Figures:
    return Figures(name, np.inf, np.inf, np.inf, np.inf, np.inf, 0.0, 0.0, 0.0, False, f"infeasible: {exc}")


def plan_cheapest(
    model: CostModel,
    prefill_share: np.ndarray,
    decode_share: np.ndarray | None,
    request: RequestShape,
    slo: Slo,
    bound: LoadBound | None = None,
    rule: str = "min_cost",
    evaluate_on: Workload | None = None,
    history: RoutingHistory | None = None,
) -> RemoePlan:
    """Cost every shape (module docstring) and return the cheapest that meets the SLOs, as a RemoePlan whose
    `shape`, `main_device`, `expert_device`, `split` and `host_bytes` describe it; every other shape is in
    `baselines`. Arguments as `plan_remoe`. No shape meeting the SLOs: the Remoe planner's error (it says
    the best achievable figure), else the cheapest miss."""
    geo = model.geometry
    gpu_model = model if model.main_device == "gpu" else replace(model, main_device="gpu")
    if not model.gpu_available:
        gpu_model = None
    cpu_model = model.on_cpu()
    workload = Workload.from_shares(prefill_share, decode_share, request, geo.top_k)
    target = workload if evaluate_on is None else evaluate_on
    cold = slo.include_cold_start
    shapes: list[Shape] = []
    failures: dict[str, Figures] = {}
    errors: list[MoeServeError] = []
    notes: list[str] = []

    def remoe(name: str, on: CostModel, share, decode) -> None:
        try:
            plan = plan_remoe(on, share, decode, request, slo, bound if share is prefill_share else None, None,
                              rule, target, False, history)
        except MoeServeError as exc:
            errors.append(exc)
            failures[name] = _infeasible(name, exc)
            return
        shapes.append(_remoe_shape(name, "cpu", plan))

    if gpu_model is not None:
        remoe("remoe", gpu_model, prefill_share, decode_share)
    if cpu_model.main_fits(remoe_host_bytes(cpu_model, 0)):
        remoe("remoe-cpu", cpu_model, prefill_share, decode_share)
    else:
        need = cpu_model.main_memory(remoe_host_bytes(cpu_model, 0))[1] / (1 << 20)
        failures["remoe-cpu"] = Figures("remoe-cpu", np.inf, np.inf, np.inf, np.inf, np.inf, 0.0, 0.0, 0.0, False,
                                        f"the non-expert modules need {need:.0f} MB, above the "
                                        f"{model.pricing.cpu.memory_max_mb} MB function limit")
    if gpu_model is not None:
        even = np.full((geo.layers, geo.experts), 1.0 / geo.experts)
        remoe("remoe-even", gpu_model, even, None)
    shapes += _local_shapes(gpu_model or cpu_model, target, cold)
    if gpu_model is None:
        notes.append("no GPU side: only the CPU shapes (remoe-cpu, all-cpu) were planned")

    # a Remoe shape whose MMP chose no remote expert is its all-local equivalent: listed once, by that name
    same = {"remoe": "mix", "remoe-cpu": "all-cpu", "remoe-even": "mix"}
    by_name = {s.name: s for s in shapes}
    for s in list(shapes):
        twin = by_name.get(same.get(s.name, ""))
        if s.plan is not None and not s.split.remote.any() and twin is not None and twin.figures.meets(slo):
            shapes.remove(s)
            notes.append(f"{s.name}: no expert is worth a remote function here (MMP chose r = 0), the same "
                         f"deployment as {twin.name}")
    eligible = sorted((s for s in shapes if s.executable and s.figures.meets(slo)), key=lambda s: s.figures.cost_usd)
    if not eligible:
        if errors:
            raise errors[0]
        best = min(shapes, key=lambda s: s.figures.ttft_s)
        raise MoeServeError(f"no deployment shape meets TTFT {slo.ttft_s:g} s and TPOT {slo.tpot_s:g} s: the fastest, "
                            f"{best.name}, gives TTFT {best.figures.ttft_s:.4f} s and TPOT {best.figures.tpot_s:.4f} s")
    chosen = eligible[0]
    runner = eligible[1] if len(eligible) > 1 else None
    for s in shapes:
        if not s.executable and s.figures.meets(slo) and s.figures.cost_usd < chosen.figures.cost_usd:
            notes.append(f"{s.name} would cost {s.figures.cost_usd / chosen.figures.cost_usd:.2f}x {chosen.name} "
                         f"but is not chosen: {NOT_EXECUTABLE[s.name]}")
    for name, fig in failures.items():
        notes.append(f"{name}: {fig.note}")
    baselines = {s.name: s.figures for s in shapes if s is not chosen} | failures
    source = chosen.plan
    notes = list(source.notes if source is not None else ()) + notes
    if source is None:
        ratio = model.pricing.gpu_to_cpu_ratio
        if ratio < 3.0 * (1 - 1e-3) and chosen.main_device == "gpu":
            notes.append(f"GPU/CPU price ratio per GB-second is {ratio:.2f}, below the paper's assumption of >= 3")
    gpu_bytes = 0.0 if chosen.main_device == "cpu" else float(chosen.figures.gpu_bytes)
    return RemoePlan(
        split=chosen.split,
        remote_count=int(chosen.split.remote.sum(axis=1).max(initial=0)),
        host_bytes=chosen.host_bytes,
        gpu_bytes=gpu_bytes,
        predicted=chosen.figures,
        ttft_bound_s=float(chosen.figures.ttft_bound_s),
        slo=slo,
        mmp=source.mmp if source is not None else None,
        memory=source.memory if source is not None else None,
        replicas=source.replicas if source is not None else None,
        baselines=baselines,
        gpu_to_cpu_price_ratio=model.pricing.gpu_to_cpu_ratio,
        notes=tuple(notes),
        shape=chosen.name,
        main_device=chosen.main_device,
        expert_device=chosen.expert_device,
        runner_up=None if runner is None else runner.name,
        margin_usd=None if runner is None else runner.figures.cost_usd - chosen.figures.cost_usd,
    )
