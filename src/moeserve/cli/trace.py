"""`moeserve trace`: look at a trace, or import routing captured by another engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json
from moeserve.errors import MoeServeError

trace_app = typer.Typer(help="Inspect and import expert-routing traces.\n\nExample: moeserve trace stats demo.trace",
                        no_args_is_help=True)
app.add_typer(trace_app, name="trace")


def stats_table(title: str, stats: dict) -> Table:
    t = Table(title=title, caption="H: activation entropy / log2(E); top10%/top25%: share of routed tokens taken "
              "by the hottest experts; reuse: consecutive-token expert overlap (dec: decode only); JSD (bits): "
              "prefill vs decode, between domains, within a domain")
    cols = [("layer", "decoder_layer", "{}"), ("H", "entropy", "{:.2f}"), ("top10%", "hot10_share", "{:.0%}"),
            ("top25%", "hot25_share", "{:.0%}"), ("reuse", "overlap", "{:.0%}"),
            ("reuse dec", "overlap_decode", "{:.0%}"), ("JSD p/d", "prefill_decode_jsd", "{:.3f}"),
            ("JSD dom", "domain_jsd", "{:.3f}"), ("JSD in", "within_domain_jsd", "{:.3f}")]
    for name, _, _ in cols:
        t.add_column(name, justify="right")
    for i in range(len(stats["decoder_layer"])):
        t.add_row(*["-" if stats[k][i] is None else fmt.format(stats[k][i]) for _, k, fmt in cols])
    return t


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
               "layers": tr.meta.num_layers, "experts": tr.meta.num_experts, "top_k": tr.meta.top_k,
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
    num_experts: int | None = typer.Option(None, help="Routed experts per layer (default: from --model)."),
    model: str | None = typer.Option(None, help="Model directory whose config gives the geometry."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Import routing captured elsewhere, e.g. by vLLM with --enable-return-routed-experts.

    Example: moeserve trace import routed.npy --lengths lengths.txt --model ./Qwen3-30B-A3B --out prod.trace
    """
    from moeserve.traces.importer import read_array, read_routing_file, routing_to_trace

    array, extra = read_routing_file(routing)
    geometry, layer_idx = None, None
    if model:
        from moeserve.models.geometry import inspect_model

        g = inspect_model(model)
        geometry, layer_idx = g.to_dict(), list(g.moe_layers)
        if num_experts is not None and num_experts != g.num_experts:
            raise MoeServeError(f"--num-experts {num_experts} contradicts the model's {g.num_experts}")
        num_experts = g.num_experts
        if array.ndim == 3 and array.shape[1:] != (g.num_moe_layers, g.top_k):
            raise MoeServeError(f"routing is [.., {array.shape[1]}, {array.shape[2]}] but the model has "
                                f"{g.num_moe_layers} MoE layers and top-{g.top_k}")
    if num_experts is None:
        raise MoeServeError("give --num-experts or --model so the expert count is known")
    if offsets is not None:
        off = read_array(offsets, "offsets")
    elif lengths is not None:
        off = np.concatenate([[0], np.cumsum(read_array(lengths, "lengths"))])
    elif "request_offsets" in extra:
        off = extra["request_offsets"]
    elif "request_lengths" in extra:
        off = np.concatenate([[0], np.cumsum(extra["request_lengths"])])
    else:
        raise MoeServeError("give --offsets or --lengths (request boundaries)")
    pl = read_array(prompt_lengths, "prompt lengths") if prompt_lengths else extra.get("prompt_lengths")
    trace = routing_to_trace(array, off, num_experts, prompt_lengths=pl, moe_layer_indices=layer_idx,
                             geometry=geometry, source=str(routing))
    if model:
        trace.meta.model = str(model)
    trace.save(out)
    summary = {"trace": str(out), "requests": trace.num_requests, "tokens": trace.num_tokens,
               "layers": trace.meta.num_layers, "experts": num_experts, "top_k": trace.meta.top_k}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: {summary['requests']} requests, {summary['tokens']} tokens")
