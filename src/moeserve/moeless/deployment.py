"""From a trace to a MoEless plan (plan_format.py), with EPLB measured on the same loads.

Requests of the trace are given real arrival times (the Azure LLM conversation trace, in order),
tokens are grouped into scheduling windows of `window_s`, and per-window expert loads [W, L, E] feed
the layer-aware predictor, the replica planner and the replay of all strategies (docs/moeless.md).
"""

from __future__ import annotations

import math

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.models.geometry import ModelGeometry
from moeserve.moeless.eplb import eplb_phy2log
from moeserve.moeless.export import location_map, replicas_from_phy2log
from moeserve.moeless.fleet import (
    DeviceFleet,
    balancedness,
    device_loads,
    device_times,
    static_placement,
    uniform_fleet,
)
from moeserve.moeless.loads import loads_from_routing, windows_from_arrivals
from moeserve.moeless.planner import plan_moeless, plan_moeless_hierarchical
from moeserve.moeless.predictors import fit_load_predictor, predict_loads, score_predictions
from moeserve.moeless.simulator import compare_strategies
from moeserve.plan.ids import device_function_id
from moeserve.plan.schema import ExpertFunction, MainPlan, Plan, file_sha256
from moeserve.traces.format import ExpertTrace
from moeserve.units import MIB, gib

MIN_WINDOWS = 6  # fit, validation and test windows for the predictor (deployment plan below)
WANT_WINDOWS = 10  # a trace spanning fewer windows of the asked length gets shorter windows
MIN_WINDOW_S = 1e-3


def fleet_for(g: ModelGeometry, devices: int, extra_replicas: int, fixed_s: float, per_token_s: float,
              price_per_gb_s: float, cold_start_s: float = 1.5) -> DeviceFleet:
    """Identical expert workers with EPLB's slots per device, (experts + extra) / devices (rounded up), so
    MoEless and EPLB are compared at the same slots and budget."""
    capacity = math.ceil((g.num_experts + extra_replicas) / devices)
    return uniform_fleet(devices, capacity, fixed_s=fixed_s, per_token_s=per_token_s, expert_gb=gib(g.expert_bytes),
                         cold_start_s=cold_start_s, price_per_gb_s=price_per_gb_s)


def window_loads(trace: ExpertTrace, arrival_s: np.ndarray, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Loads [W, L, E] and each token's window, request r arriving at arrival_s[r % len(arrival_s)]."""
    offsets = trace["request_offsets"]
    r = trace.num_requests
    arrival = np.asarray(arrival_s, float)[np.arange(r) % len(arrival_s)]
    arrival = arrival + np.floor(np.arange(r) / len(arrival_s)) * (arrival_s[-1] + window_s)
    token_arrival = np.repeat(arrival, np.diff(offsets))
    window_of_token = windows_from_arrivals(token_arrival, window_s)
    return loads_from_routing(trace["expert_ids"].astype(np.int64), window_of_token, trace.meta.num_experts), \
        window_of_token


def plan_moeless_from_trace(
    trace_path, trace: ExpertTrace, g: ModelGeometry, fleet: DeviceFleet, extra_replicas: int,
    arrival_s: np.ndarray, window_s: float, keep_alive_s: float, inputs: dict,
) -> tuple[Plan, dict]:
    notes: list[str] = []
    loads, window_of_token = window_loads(trace, arrival_s, window_s)
    asked = window_s
    while loads.shape[0] < WANT_WINDOWS and window_s / 2 >= MIN_WINDOW_S:  # a short trace: shorter windows
        window_s /= 2
        loads, window_of_token = window_loads(trace, arrival_s, window_s)
    w = loads.shape[0]
    if w < MIN_WINDOWS:
        raise MoeServeError(f"the trace's {trace.num_requests} requests span only {w} scheduling windows even of "
                            f"{window_s:g} s; need >= {MIN_WINDOWS} (profile more prompts)")
    if window_s != asked:
        notes.append(f"the trace spans fewer than {WANT_WINDOWS} windows of {asked:g} s: scheduling window "
                     f"shortened to {window_s:g} s ({w} windows)")
    slots = g.num_experts + extra_replicas
    if slots % fleet.num_devices:
        raise MoeServeError(f"{g.num_experts} experts + {extra_replicas} extra replicas do not split evenly over "
                            f"{fleet.num_devices} devices, as EPLB needs: use --replica-budget "
                            f"{extra_replicas + fleet.num_devices - slots % fleet.num_devices}")
    fit, val, test = np.arange(1, int(w * 0.6)), np.arange(int(w * 0.6), int(w * 0.8)), np.arange(int(w * 0.8), w)
    predictor = fit_load_predictor(loads, fit, val, routing=trace["expert_ids"].astype(np.int64),
                                   window_of_token=window_of_token)
    predicted = predict_loads(predictor, loads)
    baseline = predict_loads(predictor, loads, method="moving_average")
    ours, theirs = score_predictions(predicted, loads, test), score_predictions(baseline, loads, test)
    target = predicted[-1]  # the prediction for the latest window is what the plan deploys
    mp = plan_moeless(target, fleet, extra_replicas)
    eplb = replicas_from_phy2log(eplb_phy2log(target, g.num_experts + extra_replicas, fleet.num_devices),
                                 g.num_experts, fleet.num_devices)
    true_last = loads[-1]
    replay = compare_strategies(loads, fleet, extra_replicas, predicted, test, window_s)
    token_model = _token_model_comparison(loads[1:], fleet, g, extra_replicas)
    hierarchical = _hierarchical_comparison(loads[1:], fleet, g, extra_replicas)
    layers = list(g.moe_layers)
    functions = [
        ExpertFunction(id=device_function_id(layer, d), layer=layer, experts=[int(e) for e in np.flatnonzero(mp.replicas[i, :, d])],
                     memory_mb=int(math.ceil(mp.replicas[i, :, d].sum() * g.expert_bytes / MIB)) + 1,
                     keep_alive_s=keep_alive_s, group=f"d{d}")
        for i, layer in enumerate(layers) for d in range(fleet.num_devices) if mp.replicas[i, :, d].any()
    ]
    lmap = location_map(mp.replicas)
    report = {
        "windows": int(w), "window_s": window_s, "devices": fleet.num_devices, "extra_replicas": extra_replicas,
        "balancedness_planned": {
            "moeless": float(balancedness(device_loads(mp.replicas, target)).mean()),
            "eplb": float(balancedness(device_loads(eplb, target)).mean()),
            "static": float(balancedness(device_loads(_static(g, fleet.num_devices), target)).mean()),
        },
        "bottleneck_time_planned_s": {  # the slowest device's expert time per layer, summed over layers
            "moeless": float(device_times(mp.replicas, target, fleet).max(-1).sum()),
            "eplb": float(device_times(eplb, target, fleet).max(-1).sum()),
        },
        "balancedness_latest_true": {
            "moeless": float(balancedness(device_loads(mp.replicas, true_last)).mean()),
            "eplb": float(balancedness(device_loads(eplb, true_last)).mean()),
        },
        "slots_per_device": int(fleet.capacity_experts.max()),
        "notes": notes,
        "token_model_every_window": token_model,
        "hierarchical": hierarchical,
        "predictor": {"choice": list(predictor.choice), "wape": ours.wape.tolist(),
                      "wape_moving_average": theirs.wape.tolist(),
                      "straggler_recall": np.nan_to_num(ours.straggler_recall, nan=-1).tolist(),
                      "straggler_recall_moving_average": np.nan_to_num(theirs.straggler_recall, nan=-1).tolist()},
        "replay": {name: r.summary() for name, r in replay.items()},
    }
    main = MainPlan(device="gpu", local_experts={layer: [] for layer in layers}, expert_device="none")
    plan = Plan(strategy="moeless", model=str(trace.meta.model), geometry=g.to_dict(), main=main, functions=functions,
                predicted=report["replay"]["moeless_predicted"], baselines={k: v for k, v in report["replay"].items()
                                                                            if k != "moeless_predicted"},
                inputs=inputs | {"trace": str(trace_path), "trace_sha256": file_sha256(trace_path)},
                extra={"expert_location": lmap.to_json_dict(), "report": report, "notes": notes},
                checkpoint={"path": str(trace.meta.model), "fingerprint": trace.meta.checkpoint_fingerprint})
    return plan, report


def _token_model_comparison(loads: np.ndarray, fleet: DeviceFleet, g: ModelGeometry, extra: int) -> dict:
    """MoEless vs EPLB on the same load matrices under the pure token model (time = tokens, no fixed
    per-call cost): per window and layer, balancedness = max device tokens / mean. loads: [W, L, E]."""
    token_fleet = uniform_fleet(fleet.num_devices, int(fleet.capacity_experts.max()), fixed_s=0.0, per_token_s=1.0)
    ours, theirs = [], []
    for window in loads:
        if window.sum() == 0:
            continue
        ours.append(balancedness(device_loads(plan_moeless(window, token_fleet, extra).replicas, window)))
        eplb = replicas_from_phy2log(eplb_phy2log(window, g.num_experts + extra, fleet.num_devices),
                                     g.num_experts, fleet.num_devices)
        theirs.append(balancedness(device_loads(eplb, window)))
    ours, theirs = np.array(ours), np.array(theirs)  # [W, L]
    return {"cases": int(ours.size), "moeless_worse": int((ours > theirs + 1e-9).sum()),
            "moeless_better": int((ours < theirs - 1e-9).sum()), "moeless_mean": float(ours.mean()),
            "eplb_mean": float(theirs.mean())}


def _hierarchical_comparison(loads: np.ndarray, fleet: DeviceFleet, g: ModelGeometry, extra: int) -> dict | None:
    """Node-first MoEless vs EPLB's hierarchical mode, same loads, slots and budget, pure token model, on
    two nodes (None when the devices, groups or slots do not split over two)."""
    nodes, devices, experts = 2, fleet.num_devices, g.num_experts
    groups = next((q for q in (2 * nodes, nodes) if experts % q == 0), 0)
    if devices % nodes or not groups or (experts + extra) % devices:
        return None
    token_fleet = uniform_fleet(devices, (experts + extra) // devices, fixed_s=0.0, per_token_s=1.0)
    ours, theirs = [], []
    for window in loads:
        if window.sum() == 0:
            continue
        plan = plan_moeless_hierarchical(window, token_fleet, extra, nodes, groups)
        ours.append(balancedness(device_loads(plan.replicas, window)))
        eplb = replicas_from_phy2log(eplb_phy2log(window, experts + extra, devices, nodes, groups), experts, devices)
        theirs.append(balancedness(device_loads(eplb, window)))
    ours, theirs = np.array(ours), np.array(theirs)
    return {"nodes": nodes, "groups": groups, "cases": int(ours.size),
            "moeless_worse": int((ours > theirs + 1e-9).sum()), "moeless_better": int((ours < theirs - 1e-9).sum()),
            "moeless_mean": float(ours.mean()), "eplb_mean": float(theirs.mean())}


def _static(g: ModelGeometry, devices: int) -> np.ndarray:

    return static_placement(g.num_moe_layers, g.num_experts, devices)
