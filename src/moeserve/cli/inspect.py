"""`moeserve inspect`: the MoE geometry of a model."""

from __future__ import annotations

import typer
from rich.table import Table

from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json
from moeserve.units import mib


def _mib(n: float) -> str:
    return f"{mib(n):,.2f} MiB"


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument("demo", help="A local Hugging Face model directory (config.json is enough), 'demo' "
                                "or a shipped model card (qwen3-30b-a3b, deepseek-v3, ...; docs/inspect.md)."),
    json_out: bool = typer.Option(False, "--json", help="Print the geometry as JSON on stdout."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
) -> None:
    """Show a MoE model's geometry: layers, experts, top-k, routing rule, sizes, KV bytes per token.

    Reads only config.json (the weights are not loaded).

    Example: moeserve inspect qwen3-30b-a3b --json
    """
    from moeserve.models.geometry import inspect_model

    g = inspect_model(model, trust_remote_code=trust_remote_code)
    card = g.extra.get("card")
    if json_out:
        emit_json({"model": model, **g.to_dict(), "card": card})
        return
    t = Table(title=f"{model}: {g.architecture}", show_header=False)
    rows = [
        ("family", g.family),
        ("dtype", g.dtype),
        ("layers", f"{g.num_layers} ({g.num_moe_layers} MoE, {len(g.dense_layers)} dense)"),
        ("MoE layers", ", ".join(map(str, g.moe_layers))),
        ("dense layers", ", ".join(map(str, g.dense_layers)) or "none"),
        ("routed experts / layer", str(g.num_experts)),
        ("top-k", str(g.top_k)),
        ("shared experts / layer", f"{g.shared_experts} (intermediate {g.shared_intermediate_size})"
         if g.shared_experts else "none"),
        ("routing rule", g.routing.describe()),
        ("hidden / expert intermediate", f"{g.hidden_size} / {g.expert_intermediate_size}"),
        ("expert layout", ", ".join(k for k, v in g.expert_layout.to_dict().items() if v is True)
         + f"; {g.expert_layout.activation}"),
        ("parameters", f"{g.total_params:,}"),
        ("non-expert part", f"{g.non_expert_params:,} params, {_mib(g.non_expert_bytes)}"),
        ("one expert", f"{g.params_per_expert:,} params, {_mib(g.expert_bytes)}"),
        ("all routed experts", f"{g.expert_params:,} params, {_mib(g.all_expert_bytes)}"),
        ("KV cache / token", f"{g.kv_bytes_per_token:,} B" + (f" ({g.kv_note})" if g.kv_note else "")),
    ]
    if card:
        rows.append(("model card", f"{card['model_id']}: config written from {card['source_url']} (no weights)"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
