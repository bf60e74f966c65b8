"""From a trace and profiles to a `Plan` (plan_format.py): the Remoe strategy end to end.

Deployment planning predicts a workload by the trace's average activation; per-request planning
(`prompt_vector` given) predicts it with SPS from the trace's prompts [IV-B], as Remoe does at request
arrival. Optional evaluation holds out part of the trace: SPS divergence next to its baselines, and a
replay of the held-out prompts' real routing through the plan.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from moeserve.defaults import KEEP_ALIVE_S
from moeserve.errors import MoeServeError
from moeserve.models.geometry import ModelGeometry
from moeserve.plan.ids import layer_group, remoe_function_id
from moeserve.plan.schema import ExpertFunction, MainPlan, Plan, file_sha256
from moeserve.remoe.bounds import RoutingHistory
from moeserve.remoe.cost import CostModel, Figures
from moeserve.remoe.inputs import RequestShape, Slo
from moeserve.remoe.planner import RemoePlan, replay
from moeserve.remoe.shapes import NOT_EXECUTABLE, plan_cheapest
from moeserve.remoe.sps import SpsPredictor
from moeserve.remoe.sps_eval import evaluate_sps
from moeserve.traces.format import DECODE, ExpertTrace
from moeserve.units import MIB


def trace_arrays(trace: ExpertTrace) -> dict[str, np.ndarray]:
    """Per-request arrays the planner reads: activations [R, L, E], token counts [R], vectors [R, H]."""
    if trace.num_requests == 0:
        raise MoeServeError("the trace has no requests")
    phase, off = trace["phase"], trace["request_offsets"]
    decode = np.add.reduceat((phase == DECODE).astype(np.int64), off[:-1]) if len(phase) else np.zeros(0)
    lengths = np.diff(off)
    decode = np.where(lengths > 0, decode, 0)
    prefill_act = trace["prefill_activation"].astype(np.float64)
    decode_act = trace["decode_activation"].astype(np.float64)
    # a request that stopped at once (EOS) has no decode activation: predict its decode by its prefill
    empty = decode_act.sum(-1, keepdims=True) == 0
    decode_act = np.where(empty, prefill_act, decode_act)
    return {
        "prefill": prefill_act,
        "decode": decode_act,
        "prompt_tokens": (lengths - decode).astype(np.int64),
        "output_tokens": (decode + 1).astype(np.int64),  # the first token comes out of prefill
        "vectors": trace["prompt_vectors"] if trace.has("prompt_vectors") else None,
    }


def _figures(f: Figures) -> dict:
    d = asdict(f)
    d["cost_per_1k_requests_usd"] = f.cost_usd * 1000
    return d


def to_plan(rp: RemoePlan, g: ModelGeometry, model_name: str, pricing_mb_per_vcpu: float, inputs: dict,
            keep_alive_s: float) -> Plan:
    """Translate the planner's arrays into the schema `serve` executes."""
    layers = list(g.moe_layers)
    pl = rp.split
    local = {layers[i]: [int(e) for e in np.flatnonzero(~pl.remote[i])] for i in range(len(layers))}
    functions = []
    for i, layer in enumerate(layers):
        for r in range(int(pl.replicas[i])):
            experts = [int(e) for e in np.flatnonzero(pl.replica[i] == r)]
            if experts:
                mb = int(pl.memory_mb[i])
                functions.append(ExpertFunction(id=remoe_function_id(layer, r), layer=layer, experts=experts, memory_mb=mb,
                                              vcpus=round(mb / pricing_mb_per_vcpu, 3), keep_alive_s=keep_alive_s,
                                              group=layer_group(layer)))
    main = MainPlan(device=rp.main_device, local_experts=local, expert_device=rp.expert_device,
                    gpu_memory_mb=int(np.ceil(rp.gpu_bytes / MIB)),
                    cpu_memory_mb=int(np.ceil(rp.predicted.host_bytes / MIB)))
    predicted = _figures(rp.predicted) | {"ttft_bound_s": rp.ttft_bound_s, "remote_experts_per_layer": rp.remote_count,
                                          "meets_slo": rp.predicted.meets(rp.slo), "shape": rp.shape}
    runner = rp.baselines.get(rp.runner_up) if rp.runner_up else None
    shape = {"chosen": rp.shape, "main_device": rp.main_device, "expert_device": rp.expert_device,
             "runner_up": rp.runner_up, "margin_usd": rp.margin_usd,
             "margin_ratio": runner.cost_usd / rp.predicted.cost_usd if runner and rp.predicted.cost_usd > 0 else None,
             "considered": [rp.shape, *rp.baselines]}
    return Plan(strategy="remoe", model=model_name, geometry=g.to_dict(), main=main, functions=functions,
                predicted=predicted, baselines={k: _figures(v) | {"meets_slo": v.meets(rp.slo),
                                                                  "executable": k not in NOT_EXECUTABLE}
                                                for k, v in rp.baselines.items()},
                inputs=inputs, extra={"notes": list(rp.notes), "gpu_to_cpu_price_ratio": rp.gpu_to_cpu_price_ratio,
                                      "shape": shape})


def plan_remoe_from_trace(
    trace_path: str | Path, trace: ExpertTrace, geometry: ModelGeometry, cost_model: CostModel, slo: Slo, *,
    inputs: dict, prompt_vector: np.ndarray | None = None, keep_alive_s: float = KEEP_ALIVE_S,
    history_bound: bool = True, evaluate: bool = False, seed: int = 0,
) -> tuple[Plan, dict]:
    """Plan a deployment (or one request when `prompt_vector` [H] is given). Returns the plan and a report."""
    arrays = trace_arrays(trace)
    if arrays["prefill"].shape[1:] != (cost_model.geometry.layers, cost_model.geometry.experts):
        raise MoeServeError("the trace's activation shape does not match the model: is it from another model?")
    report: dict = {}
    idx = np.arange(trace.num_requests)
    held = np.zeros(trace.num_requests, dtype=bool)
    if evaluate:
        if trace.num_requests < 10:
            raise MoeServeError("--evaluate needs at least 10 requests in the trace")
        rng = np.random.default_rng(seed)
        held[rng.choice(idx, max(2, trace.num_requests // 5), replace=False)] = True
    hist = ~held
    request = RequestShape(int(np.percentile(arrays["prompt_tokens"][hist], 95)),
                           max(1, int(round(arrays["output_tokens"][hist].mean()))))
    if prompt_vector is not None:
        if arrays["vectors"] is None:
            raise MoeServeError("per-request planning needs a trace with prompt vectors (one from moeserve profile)")
        sps = SpsPredictor.build(arrays["vectors"][hist], arrays["prefill"][hist], arrays["decode"][hist])
        share, decode = (a[0] for a in sps.predict(np.asarray(prompt_vector, np.float32)[None]))
    else:
        share = arrays["prefill"][hist].mean(axis=0)
        decode = arrays["decode"][hist].mean(axis=0)
    # the conformal bound needs at least 1/delta recorded prompts; with fewer, the analytic bound is used
    enough = int(hist.sum()) >= int(np.ceil(1 / slo.delta))
    history = RoutingHistory.from_trace(arrays["prefill"][hist], arrays["prompt_tokens"][hist]) \
        if history_bound and prompt_vector is None and enough else None
    rp = plan_cheapest(cost_model, share, decode, request, slo, history=history)
    plan = to_plan(rp, geometry, str(trace.meta.model), cost_model.pricing.cpu.mb_per_vcpu,
                   inputs | {"trace": str(trace_path), "trace_sha256": file_sha256(trace_path),
                             "request_shape": asdict(request), "slo": asdict(slo),
                             "per_request": prompt_vector is not None}, keep_alive_s)
    plan.checkpoint = {"path": str(trace.meta.model), "fingerprint": trace.meta.checkpoint_fingerprint}
    if evaluate:
        report["replay"] = _replay_report(cost_model, rp, arrays, held)
        if arrays["vectors"] is not None:
            ev = evaluate_sps(arrays["vectors"][hist], arrays["prefill"][hist], arrays["vectors"][held],
                              arrays["prefill"][held],
                              [str(trace.meta.domains[i]) for i in np.flatnonzero(held)] if trace.meta.domains else None)
            report["sps"] = {"methods": list(ev.methods), "overall_jsd": ev.overall.tolist(),
                             "per_layer_jsd": ev.per_layer.tolist(), "domains": list(ev.domains),
                             "per_domain_jsd": ev.per_domain.tolist(), "tree_recall": ev.tree_recall,
                             "held_out_prompts": int(held.sum()), "history_prompts": int(hist.sum())}
    return plan, report


def _replay_report(cost_model: CostModel, rp: RemoePlan, arrays: dict, held: np.ndarray) -> dict:
    r = replay(cost_model, rp, arrays["prefill"][held], arrays["prompt_tokens"][held],
               arrays["output_tokens"][held], arrays["decode"][held])
    return {"prompts": int(held.sum()), "ttft_met": r.ttft_met, "tpot_met": r.tpot_met, "both_met": r.both_met,
            "mean_cost_usd": float(r.cost_usd.mean()), "predicted_cost_usd": rp.predicted.cost_usd,
            "confidence": 1 - rp.slo.delta}
