"""`moeserve profile`: capture expert traces of real prompts and measure the hardware."""

from __future__ import annotations

from pathlib import Path

import typer

from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json, progress
from moeserve.errors import MoeServeError


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
    import torch

    from moeserve.models.loading import load_model, load_tokenizer, resolve_device
    from moeserve.traces.profile import build_trace
    from moeserve.traces.stats import trace_stats

    if prompts is None and not hardware:
        raise MoeServeError("nothing to do: give --prompts to capture a trace and/or --hardware")
    from moeserve.models.geometry import inspect_model

    # cheap: refuses dense models before any work; the checkpoint's geometry (bytes at its dtype) is what
    # the trace records, the same as `moeserve inspect`, whatever dtype the weights run in here
    geometry = inspect_model(model, trust_remote_code=trust_remote_code)
    dev = resolve_device(device)
    summary: dict = {"model": model, "device": str(dev)}
    loaded = None
    if prompts is not None:
        from moeserve.workloads import load_prompts

        prompt_list = load_prompts(prompts, max_prompts=max_prompts, seed=seed)
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        loaded = load_model(model, device=dev, trust_remote_code=trust_remote_code)
        torch.manual_seed(seed)
        with progress(disable=json_out) as bar:
            task = bar.add_task("profiling", total=len(prompt_list), status="")
            trace = build_trace(
                loaded, tokenizer, prompt_list, gen_tokens=gen_tokens, batch_size=batch_size,
                max_prompt_tokens=max_prompt_tokens, router_probs=router_probs, model_name=model,
                source=prompts, geometry=geometry.to_dict(),
                on_batch=lambda done, total: bar.update(task, completed=done, status=f"{done}/{total} prompts"),
            )
        trace.save(out)
        stats = trace_stats(trace).to_dict()
        summary.update({"trace": str(out), "source": prompts, "requests": trace.num_requests,
                        "tokens": trace.num_tokens, "prefill_tokens": int((trace["phase"] == 0).sum()),
                        "decode_tokens": int((trace["phase"] == 1).sum()), "per_layer": stats})
        if not json_out:
            from moeserve.cli.trace import stats_table

            console.print(stats_table(f"wrote {out}: {trace.num_requests} requests, {trace.num_tokens} tokens", stats))
    if hardware:
        from moeserve.hardware import measure_hardware

        if loaded is None:
            loaded = load_model(model, device=dev, trust_remote_code=trust_remote_code)
        g = geometry
        with progress(disable=json_out) as bar:
            task = bar.add_task("hardware", total=None, status="")

            def tick(step: str, i: int, n: int) -> None:
                bar.update(task, total=n, completed=i, status=step)

            hw = measure_hardware(g.hidden_size, g.expert_intermediate_size, dtype=str(next(loaded.parameters()).dtype)
                                  .removeprefix("torch."), model=loaded, progress=tick)
        hw.save(hardware_out)
        summary["hardware_profile"] = str(hardware_out)
        if not json_out:
            console.print(f"wrote hardware profile {hardware_out}")
    if json_out:
        emit_json(summary)
