"""`moeserve plan`: place experts (Remoe or MoEless) and predict latency and cost."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json, progress
from moeserve.errors import MoeServeError


def _report_table(plan, slo_ttft: float, slo_tpot: float) -> Table:
    t = Table(title=f"{plan.strategy} plan for {plan.model}: SLO TTFT {slo_ttft:g} s, TPOT {slo_tpot:g} s")
    for col in ("strategy", "TTFT s", "TPOT s", "$ / 1k req", "GPU MiB", "host MiB", "meets SLO", "note"):
        t.add_column(col, justify="right" if col not in ("strategy", "note") else "left")
    rows = [(plan.strategy, plan.predicted)] + list(plan.baselines.items())
    for name, f in rows:
        t.add_row(name, f"{f['ttft_s']:.4f}", f"{f['tpot_s']:.4f}", f"{f['cost_per_1k_requests_usd']:.4f}",
                  f"{f['gpu_bytes'] / 2**20:,.1f}", f"{f['host_bytes'] / 2**20:,.1f}",
                  "yes" if f["meets_slo"] else "[red]no[/red]", f.get("note", ""))
    return t


@app.command("plan")
def plan_cmd(
    trace: Path = typer.Argument(..., help="A trace from `moeserve profile` or `moeserve trace import`."),
    strategy: str = typer.Option("remoe", "--strategy", help="remoe (serverless CPU/GPU split) or moeless."),
    hardware: str = typer.Option("cpu-2core", "--hardware", help="CPU hardware profile (name or YAML path)."),
    gpu_hardware: str = typer.Option("a100-80gb", "--gpu-hardware", help="GPU profile (name or YAML path)."),
    pricing: list[str] = typer.Option(["aws-lambda-x86", "modal-a100-80gb"], "--pricing",
                                      help="Pricing profiles (names or paths): one CPU and one GPU offering."),
    slo_ttft: float = typer.Option(2.0, "--slo-ttft", help="Time-to-first-token SLO, seconds."),
    slo_tpot: float = typer.Option(0.25, "--slo-tpot", help="Time-per-output-token SLO, seconds."),
    confidence: float = typer.Option(0.95, "--confidence", help="Probability the TTFT bound holds."),
    prompt: str | None = typer.Option(None, "--prompt", help="Plan one request: SPS predicts its activation."),
    network_rtt: float | None = typer.Option(None, "--network-rtt", help="Main<->function round trip s "
                                             "(default: measured local transport; serverless ~0.001)."),
    keep_alive: float = typer.Option(60.0, "--keep-alive", help="Seconds an idle expert function stays warm."),
    gpus: int = typer.Option(8, "--gpus", help="MoEless: devices to place expert replicas on."),
    replica_budget: int | None = typer.Option(None, "--replica-budget", help="MoEless: extra replicas per layer."),
    window: float = typer.Option(5.0, "--window", help="MoEless: scheduling window in seconds of arrivals."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Hold out 20% of prompts: SPS accuracy and replay."),
    out: Path = typer.Option(Path("plan.yaml"), "--out", "-o", help="Plan file to write."),
    json_out: bool = typer.Option(False, "--json", help="Print plan figures and report as JSON."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Plan where every expert runs and predict TTFT, TPOT and cost next to the baselines.

    Remoe: non-expert modules on a GPU, experts on the main function's CPU, each layer's rarely used
    experts in remote CPU functions (sized by a Lagrangian dual, spread over replicas by LPT).
    The plan (docs/plan-format.md) is what `moeserve serve --plan` executes.

    Example: moeserve plan demo.trace --slo-ttft 1 --slo-tpot 0.1 --evaluate --out plan.yaml
    """
    from moeserve.hardware import load_hardware_profile
    from moeserve.models.geometry import ModelGeometry
    from moeserve.planning.cost import CostModel
    from moeserve.planning.from_profiles import plan_hardware, plan_model
    from moeserve.planning.inputs import Slo
    from moeserve.planning.pricing import load_pricing
    from moeserve.traces.format import ExpertTrace

    tr = ExpertTrace.open(trace)
    if tr.num_requests == 0 or tr.num_tokens == 0:
        raise MoeServeError(f"trace {trace} is empty")
    if tr.meta.geometry is None:
        raise MoeServeError("the trace has no model geometry: import it with --model so sizes are known")
    geometry = ModelGeometry.from_dict(tr.meta.geometry)
    if not 0.5 <= confidence < 1:
        raise MoeServeError("--confidence must lie in [0.5, 1)")
    slo = Slo(slo_ttft, slo_tpot, delta=1 - confidence)
    if strategy == "moeless":
        from moeserve.cli.plan_moeless import plan_moeless_cmd

        plan_moeless_cmd(trace, tr, geometry, hardware, gpus, replica_budget, keep_alive, out, json_out, window,
                         pricing)
        return
    if strategy != "remoe":
        raise MoeServeError(f"unknown strategy {strategy!r}: use remoe or moeless")
    prices = load_pricing(*pricing)
    cpu, gpu = load_hardware_profile(hardware), load_hardware_profile(gpu_hardware)
    hw = plan_hardware(geometry, cpu, gpu, prices, network_rtt_s=network_rtt)
    cost_model = CostModel.build(plan_model(geometry), hw, prices)
    vector = None
    if prompt is not None:
        from moeserve.models.loading import load_input_embeddings, load_tokenizer
        from moeserve.traces.activation import prompt_vector

        tok = load_tokenizer(tr.meta.model)
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise MoeServeError("--prompt tokenised to zero tokens")
        vector = prompt_vector(load_input_embeddings(tr.meta.model)[ids])
    from moeserve.planning.deployment import plan_remoe_from_trace

    inputs = {"hardware": cpu.name, "gpu_hardware": gpu.name, "pricing": list(pricing),
              "network_rtt_s": hw.network_rtt_s}
    with progress(disable=json_out) as bar:
        task = bar.add_task("planning", total=None, status="Remoe: SPS, MMP, dual, LPT")
        plan, report = plan_remoe_from_trace(trace, tr, geometry, cost_model, slo, inputs=inputs, prompt_vector=vector,
                                             keep_alive_s=keep_alive, evaluate=evaluate, seed=seed)
        bar.update(task, total=1, completed=1, status="done")
    plan.save(out)
    if json_out:
        emit_json({"plan": str(out), "strategy": plan.strategy, "predicted": plan.predicted,
                   "baselines": plan.baselines, "functions": len(plan.functions),
                   "remote_experts": sum(len(f.experts) for f in plan.functions), "notes": plan.extra.get("notes"),
                   "evaluation": report})
        return
    console.print(_report_table(plan, slo_ttft, slo_tpot))
    for note in plan.extra.get("notes", []):
        console.print(f"note: {note}")
    if report:
        console.print_json(json.dumps(report.get("replay", {})))
    console.print(f"wrote {out}: {len(plan.functions)} expert functions, "
                  f"{sum(len(f.experts) for f in plan.functions)} remote experts")
