"""The `--strategy moeless` branch of `moeserve plan` (option parsing lives in cli/plan.py)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from moeserve.cli.common import console, emit_json


def plan_moeless_cmd(trace_path: Path, trace, geometry, hardware: str, gpus: int, replica_budget: int | None,
                     keep_alive: float, out: Path, json_out: bool, window_s: float, pricing: list[str]) -> None:
    from moeserve.hardware import load_hardware_profile
    from moeserve.moeless.deployment import fleet_for, plan_moeless_from_trace
    from moeserve.planning.pricing import load_pricing
    from moeserve.workloads import load_arrivals

    profile = load_hardware_profile(hardware)
    from moeserve.planning.from_profiles import linear_latency

    curve = profile.expert_curve(device="cpu", dtype="float32")
    fit = linear_latency(curve.tokens, curve.seconds)  # least squares, clipped to non-negative
    prices = load_pricing(*pricing)
    extra = geometry.num_experts // 4 if replica_budget is None else replica_budget
    fleet = fleet_for(geometry, gpus, extra, fit.fixed_s, fit.per_token_s, prices.cpu.usd_per_gb_second)
    plan, report = plan_moeless_from_trace(
        trace_path, trace, geometry, fleet, extra, load_arrivals("azure-conv").arrival_s, window_s, keep_alive,
        {"hardware": profile.name, "pricing": list(pricing), "devices": gpus, "replica_budget": extra,
         "arrivals": "azure-conv"})
    plan.save(out)
    if json_out:
        emit_json({"plan": str(out), "strategy": "moeless", **report})
        return
    t = Table(title=f"MoEless vs EPLB: {gpus} devices, {extra} extra replicas per layer, {report['windows']} windows")
    for col in ("strategy", "MoE time / window s", "balancedness", "replicas created", "moved", "cost $"):
        t.add_column(col, justify="right")
    for name, s in report["replay"].items():
        t.add_row(name, f"{s['moe_time_per_window_s']:.5f}", f"{s['balancedness']:.3f}",
                  f"{s.get('replicas_created', 0):.0f}", f"{s.get('replicas_moved', 0):.0f}", f"{s.get('cost', 0):.3g}")
    console.print(t)
    p = report["predictor"]
    console.print(f"predictor WAPE {sum(p['wape']) / len(p['wape']):.3f} vs moving average "
                  f"{sum(p['wape_moving_average']) / len(p['wape_moving_average']):.3f}; planned balancedness "
                  f"MoEless {report['balancedness_planned']['moeless']:.3f}, EPLB {report['balancedness_planned']['eplb']:.3f}")
    console.print(f"wrote {out}: {len(plan.functions)} expert functions")
