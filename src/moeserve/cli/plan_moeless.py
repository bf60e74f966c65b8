"""The report of `moeserve plan --strategy moeless` (the command itself lives in cli/plan.py)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from moeserve.cli.common import console, emit_json


def show_moeless_report(plan, report: dict, out: Path, json_out: bool) -> None:
    """The MoEless plan's comparison with EPLB, as a table or JSON."""
    gpus, extra = report["devices"], report["extra_replicas"]
    if json_out:
        emit_json({"plan": str(out) if out else None, **({} if out else {"plan_yaml": plan.to_yaml()}),
                   "strategy": "moeless", **report})
        return
    t = Table(title=f"MoEless vs EPLB: {gpus} devices, {extra} extra replicas per layer, {report['windows']} windows")
    for col in ("strategy", "MoE time / window s", "balancedness", "replicas created", "moved", "cost $"):
        t.add_column(col, justify="right")
    for name, s in report["replay"].items():
        t.add_row(name, f"{s['moe_time_per_window_s']:.5f}", f"{s['balancedness']:.3f}",
                  f"{s.get('replicas_created', 0):.0f}", f"{s.get('replicas_moved', 0):.0f}", f"{s.get('cost', 0):.3g}")
    console.print(t)
    p = report["predictor"]
    bt = report["bottleneck_time_planned_s"]
    console.print(f"predictor WAPE {sum(p['wape']) / len(p['wape']):.3f} vs moving average "
                  f"{sum(p['wape_moving_average']) / len(p['wape_moving_average']):.3f}; planned with the measured "
                  f"latency curve: slowest-device time MoEless {bt['moeless']:.3g} s vs EPLB {bt['eplb']:.3g} s, token "
                  f"balancedness MoEless {report['balancedness_planned']['moeless']:.3f}, EPLB "
                  f"{report['balancedness_planned']['eplb']:.3f} (MoEless minimises time, not tokens)")
    tm = report["token_model_every_window"]
    console.print(f"balancedness at EPLB's {report['slots_per_device']} slots per device, every window and layer "
                  f"(token model): MoEless {tm['moeless_mean']:.4f} vs EPLB {tm['eplb_mean']:.4f}, MoEless worse in "
                  f"{tm['moeless_worse']} of {tm['cases']}, better in {tm['moeless_better']}")
    h = report.get("hierarchical")
    if h:
        console.print(f"hierarchical ({h['nodes']} nodes, {h['groups']} groups): MoEless {h['moeless_mean']:.4f} vs "
                      f"EPLB {h['eplb_mean']:.4f}, worse in {h['moeless_worse']} of {h['cases']}, better in "
                      f"{h['moeless_better']}")
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    console.print(f"wrote {out}: {len(plan.functions)} expert functions")
