"""`moeserve plan`: place experts (Remoe or MoEless) and predict latency and cost."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moeserve import defaults
from moeserve.atomic import check_output_file
from moeserve.cli.app import app
from moeserve.cli.common import ProgressTicks, console, emit_json
from moeserve.cli.plan_moeless import show_moeless_report
from moeserve.cli.tables import evaluation_lines, plan_verdict
from moeserve.cli.validate import NON_NEGATIVE, POSITIVE, number
from moeserve.units import mib

DEFAULT_PLAN = "plan.yaml"  # --out when not given (and --json is not)


def _report_table(plan, slo_ttft: float, slo_tpot: float) -> Table:
    t = Table(title=f"{plan.strategy} plan for {plan.model}: SLO TTFT {slo_ttft:g} s, TPOT {slo_tpot:g} s")
    for col in ("strategy", "TTFT s", "TPOT s", "$ / 1k req", "GPU MiB", "host MiB", "meets SLO", "note"):
        t.add_column(col, justify="right" if col not in ("strategy", "note") else "left")
    rows = [(plan.predicted.get("shape", plan.strategy), plan.predicted)] + list(plan.baselines.items())
    for name, f in rows:
        t.add_row(name, f"{f['ttft_s']:.4f}", f"{f['tpot_s']:.4f}", f"{f['cost_per_1k_requests_usd']:.4f}",
                  f"{mib(f['gpu_bytes']):,.1f}", f"{mib(f['host_bytes']):,.1f}",
                  "yes" if f["meets_slo"] else "[red]no[/red]", f.get("note", ""))
    return t


@app.command("plan")
def plan_cmd(
    trace: Path = typer.Argument(..., help="A trace from `moeserve profile` or `moeserve trace import`."),
    strategy: str = typer.Option("remoe", "--strategy", help="remoe (serverless CPU/GPU split) or moeless."),
    hardware: str = typer.Option(defaults.CPU_HARDWARE, "--hardware", help="CPU hardware profile (name or YAML path)."),
    gpu_hardware: str = typer.Option(defaults.GPU_HARDWARE, "--gpu-hardware", help="GPU profile (name or YAML path)."),
    pricing: list[str] = typer.Option(list(defaults.PRICING), "--pricing",
                                      help="Pricing profiles (names or paths): one CPU and one GPU offering."),
    slo_ttft: float = typer.Option(defaults.SLO_TTFT_S, "--slo-ttft", parser=POSITIVE, help="Time-to-first-token SLO, seconds."),
    slo_tpot: float = typer.Option(defaults.SLO_TPOT_S, "--slo-tpot", parser=POSITIVE, help="Time-per-output-token SLO, seconds."),
    confidence: float = typer.Option(defaults.CONFIDENCE, "--confidence", parser=number(low=0.5, high=1.0, high_open=True),
                                     help="Probability the TTFT bound holds, in [0.5, 1)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Plan one request: SPS predicts its activation."),
    network_rtt: float | None = typer.Option(None, "--network-rtt", parser=NON_NEGATIVE, help="Main<->function round trip s "
                                             "(default: measured local transport; serverless ~0.001)."),
    keep_alive: float = typer.Option(defaults.KEEP_ALIVE_S, "--keep-alive", parser=NON_NEGATIVE, help="Seconds an idle expert function stays warm."),
    gpus: int = typer.Option(8, "--gpus", min=1, help="MoEless: devices to place expert replicas on."),
    replica_budget: int | None = typer.Option(None, "--replica-budget", min=0, help="MoEless: extra replicas per layer."),
    window: float = typer.Option(5.0, "--window", parser=POSITIVE, help="MoEless: scheduling window in seconds of arrivals."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Hold out 20% of prompts: SPS accuracy and replay."),
    out: Path = typer.Option(None, "--out", "-o", help=f"Plan file to write (default: {DEFAULT_PLAN}; with "
                             "--json and no --out, no file: the plan is in the JSON as plan_yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print plan figures and report as JSON."),
    seed: int = typer.Option(0, "--seed"),
    model: str | None = typer.Option(None, "--model", help="Model card or config-only directory giving the geometry "
                                     "(the trace must have its shape, e.g. from `moeserve trace synth`)."),
) -> None:
    """Plan where every expert runs and predict TTFT, TPOT and cost next to the baselines.

    Remoe: non-expert modules on a GPU, experts on the main function's CPU, each layer's rarely used
    experts in remote CPU functions (sized by a Lagrangian dual, spread over replicas by LPT).
    The plan (docs/plan-format.md) is what `moeserve serve --plan` executes.

    Example: moeserve plan demo.trace --slo-ttft 1 --slo-tpot 0.1 --evaluate --out plan.yaml
    """
    from moeserve.planner import PlanOptions, plan_trace

    out = out if out is not None or json_out else Path(DEFAULT_PLAN)  # with --json and no --out: no file
    if out is not None:
        check_output_file(out, "--out")
    options = PlanOptions(trace, strategy, hardware, gpu_hardware, tuple(pricing), slo_ttft, slo_tpot, confidence,
                          prompt, network_rtt, keep_alive, gpus, replica_budget, window, evaluate=evaluate, seed=seed,
                          model=model)
    with ProgressTicks(disable=json_out) as tick:
        tick("planning", 0, 1, strategy)
        plan, report = plan_trace(options)
        tick("planning", 1, 1, "done")
    if out is not None:
        plan.save(out)
    if strategy == "moeless":
        show_moeless_report(plan, report, out, json_out)
    elif json_out:
        emit_json({"plan": str(out) if out else None, **({} if out else {"plan_yaml": plan.to_yaml()}),
                   "strategy": plan.strategy, "shape": plan.extra.get("shape"), "predicted": plan.predicted,
                   "baselines": plan.baselines, "functions": len(plan.functions),
                   "remote_experts": sum(len(f.experts) for f in plan.functions), "notes": plan.extra.get("notes"),
                   "evaluation": report})
    else:
        show_remoe_report(plan, report, out, slo_ttft, slo_tpot)


def show_remoe_report(plan, report: dict, out: Path, slo_ttft: float, slo_tpot: float) -> None:
    console.print(_report_table(plan, slo_ttft, slo_tpot))
    for note in plan.extra.get("notes", []):
        console.print(f"note: {note}")
    for line in evaluation_lines(report):
        console.print(line, highlight=False)
    console.print(f"wrote {out}: {len(plan.functions)} expert functions, "
                  f"{sum(len(f.experts) for f in plan.functions)} remote experts")
    for line in plan_verdict(plan, out):
        console.print(line, highlight=False)
