"""`moeserve trace`: look at a trace, or import routing captured by another engine."""

from __future__ import annotations

from pathlib import Path

import typer

from moeserve.atomic import check_output_file
from moeserve.cli.app import app
from moeserve.cli.common import ProgressTicks, console, emit_json
from moeserve.cli.tables import stats_table

trace_app = typer.Typer(help="Inspect and import expert-routing traces.\n\nExample: moeserve trace stats demo.trace",
                        no_args_is_help=True)
app.add_typer(trace_app, name="trace")


@trace_app.command("stats")
def stats_cmd(
    trace: Path = typer.Argument(..., help="A trace written by `moeserve profile` or `moeserve trace import`."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Per-layer routing summary: entropy, hot-expert shares, token-to-token overlap, divergences.

    Example: moeserve trace stats demo.trace --json
    """
    from moeserve.traces.format import ExpertTrace
    from moeserve.traces.stats import trace_stats

    tr = ExpertTrace.open(trace)
    stats = trace_stats(tr).to_dict()
    summary = {"trace": str(trace), "model": tr.meta.model, "requests": tr.num_requests, "tokens": tr.num_tokens,
               "layers": tr.meta.num_moe_layers, "experts": tr.meta.num_experts, "top_k": tr.meta.top_k,
               "domains": sorted({d for d in tr.meta.domains if d}), "per_layer": stats}
    if json_out:
        emit_json(summary)
        return
    console.print(stats_table(f"{trace}: {tr.num_requests} requests, {tr.num_tokens} tokens", stats))


@trace_app.command("import")
def import_cmd(
    routing: Path = typer.Argument(..., help=".npy [tokens, layers, top_k] or .npz with 'routed_experts'."),
    out: Path = typer.Option(..., "--out", "-o", help="Trace file to write."),
    offsets: Path | None = typer.Option(None, help="Request start offsets [requests+1] (.npy/.txt/.json)."),
    lengths: Path | None = typer.Option(None, help="Tokens per request [requests] (alternative to --offsets)."),
    prompt_lengths: Path | None = typer.Option(None, help="Prefill tokens per request, to tag prefill/decode."),
    num_experts: int | None = typer.Option(None, min=1, help="Routed experts per layer (default: from --model)."),
    model: str | None = typer.Option(None, help="Model directory whose config gives the geometry."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Import routing captured elsewhere, e.g. by vLLM with --enable-return-routed-experts.

    Example: moeserve trace import routed.npy --lengths lengths.txt --model ./Qwen3-30B-A3B --out prod.trace
    """
    from moeserve.traces.importer import import_routing

    check_output_file(out, "--out")
    trace = import_routing(routing, out, offsets=offsets, lengths=lengths, prompt_lengths=prompt_lengths,
                           num_experts=num_experts, model=model)
    summary = {"trace": str(out), "requests": trace.num_requests, "tokens": trace.num_tokens,
               "layers": trace.meta.num_moe_layers, "experts": trace.meta.num_experts, "top_k": trace.meta.top_k}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: {summary['requests']} requests, {summary['tokens']} tokens")


@trace_app.command("synth")
def synth_cmd(
    model: str = typer.Option(..., "--model", help="Model card name or a directory with config.json: the geometry."),
    like: Path = typer.Option(..., "--like", help="A measured trace whose routing statistics to match."),
    out: Path = typer.Option(..., "--out", "-o", help="Trace file to write."),
    requests: int | None = typer.Option(None, "--requests", min=1, max=100_000, help="Requests to draw from --like "
                                        "(default: all of them, once each)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the generator."),
    json_out: bool = typer.Option(False, "--json", help="Print targets, achieved statistics and calibration."),
) -> None:
    """Make a synthetic trace of a model's geometry that routes like a measured trace.

    Per layer it matches the hot-10% share, the consecutive-token overlap and the spread between
    domains (docs/trace.md, "Synthetic traces"); the trace is marked synthetic and `plan` says so.

    Example: moeserve trace synth --model qwen3-30b-a3b --like demo.trace --out q3-synth.trace
    """
    from moeserve.traces.synth import synth_trace

    check_output_file(out, "--out")
    with ProgressTicks(disable=json_out) as tick:
        tick("synthesising", 0, 1, model)
        _, summary = synth_trace(model, like, out, requests=requests, seed=seed)
        tick("synthesising", 1, 1, "done")
    if json_out:
        emit_json(summary)
        return
    console.print(f"wrote {out}: synthetic trace of {model} ({summary['layers']} MoE layers x {summary['experts']} "
                  f"experts, top-{summary['top_k']}), {summary['requests']} requests, {summary['tokens']} tokens, "
                  f"like {like}")
    for key, label in (("hot10", "hot-10% share"), ("overlap", "consecutive overlap"), ("domain_jsd", "domain JSD")):
        want = [v for v in summary["target"][key] if v is not None and v == v]
        have = [v for v in summary["achieved"][key] if v is not None and v == v]
        if want and have:
            console.print(f"  {label}: measured mean {sum(want) / len(want):.3f}, synthetic {sum(have) / len(have):.3f}")
    for note in summary["notes"]:
        console.print(f"note: {note}")
