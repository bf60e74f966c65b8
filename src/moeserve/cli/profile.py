"""`moeserve profile`: capture expert traces of real prompts and measure the hardware."""

from __future__ import annotations

from pathlib import Path

import typer

from moeserve.cli.app import app
from moeserve.cli.common import ProgressTicks, console, emit_json
from moeserve.cli.tables import stats_table


@app.command("profile")
def profile_cmd(
    model: str = typer.Argument("demo", help="A local Hugging Face MoE directory, or 'demo'."),
    prompts: str | None = typer.Option(
        None, "--prompts", "-p", help="builtin:NAME (mtbench, code, math, qa, mixed, corpus), a .jsonl or a .txt file."),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=1, help="Use at most N prompts (seeded subset)."),
    gen_tokens: int = typer.Option(32, "--gen-tokens", min=0, help="Greedy decode tokens per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Prompts generated together (left-padded)."),
    max_prompt_tokens: int = typer.Option(512, "--max-prompt-tokens", min=1, help="Truncate longer prompts."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    out: Path = typer.Option(Path("moeserve.trace"), "--out", "-o", help="Trace file to write."),
    router_probs: bool = typer.Option(False, "--router-probs", help="Also store full router scores per token."),
    hardware: bool = typer.Option(False, "--hardware/--no-hardware", help="Also measure the hardware profile."),
    hardware_out: Path = typer.Option(Path("hardware-profile.yaml"), "--hardware-out", help="Hardware profile file."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompt subsets."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
) -> None:
    """Capture which experts every token activates (prefill and decode); optionally measure the hardware.

    Writes one trace file (docs/trace-format.md) and prints per-layer routing statistics.

    Example: moeserve profile demo --prompts builtin:mtbench --gen-tokens 16 --out demo.trace --json
    """
    from moeserve.profiling import ProfileOptions, profile_model

    options = ProfileOptions(model, prompts, max_prompts, gen_tokens, batch_size, max_prompt_tokens, device, out,
                             router_probs, hardware, hardware_out, seed, trust_remote_code)
    with ProgressTicks(disable=json_out) as tick:
        summary = profile_model(options, tick)
    if json_out:
        emit_json(summary)
        return
    if prompts is not None:
        console.print(stats_table(f"wrote {out}: {summary['requests']} requests, {summary['tokens']} tokens",
                                  summary["per_layer"]))
    if hardware:
        console.print(f"wrote hardware profile {hardware_out}")
        conditions = summary["hardware_conditions"]
        if conditions["unreliable"]:
            console.print(f"[yellow]warning:[/] its figures may be off: {'; '.join(conditions['reasons'])}. "
                          "Measure again on a quiet machine (the profile says so: conditions.unreliable)")
