"""`moeserve finetune-router`: ReMoE router fine-tuning for expert reuse."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moeserve.cli.app import app
from moeserve.cli.common import ProgressTicks, console, emit_json
from moeserve.cli.validate import NON_NEGATIVE, POSITIVE, number


@app.command("finetune-router")
def finetune_router_cmd(
    model: str = typer.Argument("demo", help="A local Hugging Face MoE directory, or 'demo'."),
    prompts: str = typer.Option("builtin:corpus", "--prompts", "-p", help="Training text: builtin:NAME, .jsonl, .txt."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimiser steps."),
    lr: float = typer.Option(3e-3, "--lr", parser=POSITIVE, help="AdamW learning rate for the router weights."),
    reuse_weight: float = typer.Option(1.0, "--reuse-weight", parser=NON_NEGATIVE, help="Weight A of the expert-reuse term."),
    kl_weight: float = typer.Option(0.1, "--kl-weight", parser=NON_NEGATIVE, help="Weight B of KL(original router || router)."),
    lb_weight: float = typer.Option(0.0, "--lb-weight", parser=NON_NEGATIVE, help="Load-balancing loss weight (off by default)."),
    window: int = typer.Option(1, "--window", min=1, help="Earlier tokens whose experts count as reusable."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per step."),
    seq_len: int = typer.Option(128, "--seq-len", min=8, help="Tokens per sequence."),
    eval_fraction: float = typer.Option(0.2, "--eval-fraction", parser=number(low=0.01, high=0.9), help="Documents held out."),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=2, help="Use at most N documents."),
    out: Path = typer.Option(Path("router-finetuned"), "--out", "-o", help="Output model directory."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
) -> None:
    """Fine-tune only the routers so consecutive tokens reuse experts (ReMoE), keeping quality.

    Writes a complete model directory (usable as MODEL by every command), router.safetensors and
    finetune-report.json with overlap, cache hit rates and perplexity before and after on held-out text.

    Example: moeserve finetune-router demo --prompts builtin:corpus --steps 300 --out demo-reuse --json
    """
    from moeserve.finetune.pipeline import check_finetune_output, finetune_router
    from moeserve.finetune.router_training import RouterFinetuneConfig
    from moeserve.models.geometry import inspect_model

    inspect_model(model, trust_remote_code=trust_remote_code)  # refuses dense models before any work
    check_finetune_output(out, force)

    cfg = RouterFinetuneConfig(steps=steps, lr=lr, reuse_weight=reuse_weight, kl_weight=kl_weight,
                               lb_weight=lb_weight, window=window, batch_size=batch_size, seq_len=seq_len, seed=seed)
    with ProgressTicks(disable=json_out) as tick:
        def on_step(step: int, rec: dict) -> None:
            tick("router fine-tuning", step, steps, f"loss {rec['loss']:.2f} reuse {rec['reuse_mass']:.2f} "
                 f"kl {rec['kl']:.3f} overlap {rec['overlap']:.0%}")

        report = finetune_router(model, prompts, out, cfg, eval_fraction=eval_fraction, max_prompts=max_prompts,
                                 device=device, force=force, trust_remote_code=trust_remote_code, on_step=on_step)
    if json_out:
        emit_json({k: v for k, v in report.items() if k != "history"} | {"out": str(out)})
        return
    s = report["summary"]
    t = Table(title=f"router fine-tune -> {out}")
    for col in ("metric", "before", "after"):
        t.add_column(col, justify="right")
    t.add_row("overlap ratio", f"{s['overlap_before']:.1%}", f"{s['overlap_after']:.1%} ({s['overlap_gain_rel']:+.1%})")
    for row in report["cache"]:
        t.add_row(f"LRU hit rate C={row['capacity']}", f"{row['lru_before']:.1%}", f"{row['lru_after']:.1%}")
        t.add_row(f"Belady hit rate C={row['capacity']}", f"{row['belady_before']:.1%}", f"{row['belady_after']:.1%}")
    for domain, p in report["perplexity"].items():
        t.add_row(f"perplexity {domain}", f"{p['before']:.2f}", f"{p['after']:.2f} ({p['after'] / p['before'] - 1:+.2%})")
    t.add_row("greedy next-token agreement", "", f"{report['next_token_agreement']:.1%}")
    console.print(t)
