"""Tables more than one command prints."""

from __future__ import annotations

import math

from rich.table import Table


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


def plan_verdict(plan, out) -> list[str]:
    """The decision a plan stands for, in a few lines: what was chosen, its cost and latency against each
    baseline (the saving over the cheapest baseline that meets the SLOs), and the command to serve it."""
    p = plan.predicted
    cost = p["cost_per_1k_requests_usd"]
    shape = (plan.extra or {}).get("shape", {})
    chosen = shape.get("chosen", plan.strategy)
    lines = [f"verdict: {chosen}, ${cost:.4g} per 1k requests, TTFT {p['ttft_s']:.3g} s, TPOT {p['tpot_s']:.3g} s"
             f" ({'meets' if p.get('meets_slo') else 'MISSES'} the SLOs)"]
    meeting = {name: f for name, f in plan.baselines.items() if f.get("meets_slo") and f.get("executable", True)}
    for name, f in plan.baselines.items():
        if not math.isfinite(f["cost_per_1k_requests_usd"]):
            lines.append(f"  {name:>10}: not possible here ({f.get('note') or 'infeasible'})")
            continue
        ratio = f["cost_per_1k_requests_usd"] / cost if cost > 0 else float("inf")
        status = "meets the SLOs" if f.get("meets_slo") else "misses the SLOs"
        status += "" if f.get("executable", True) else " (costed only: serve cannot run it)"
        lines.append(f"  {name:>10}: ${f['cost_per_1k_requests_usd']:.4g} per 1k ({ratio:.2f}x), "
                     f"TTFT {f['ttft_s']:.3g} s, TPOT {f['tpot_s']:.3g} s, {status}")
    runner = shape.get("runner_up")
    if runner and shape.get("margin_ratio"):
        lines.append(f"runner-up: {runner}, {shape['margin_ratio']:.2f}x this plan's cost "
                     f"(+${shape['margin_usd'] * 1000:.4g} per 1k requests)")
    if meeting:
        best_name, best = min(meeting.items(), key=lambda kv: kv[1]["cost_per_1k_requests_usd"])
        saving = 1 - cost / best["cost_per_1k_requests_usd"] if best["cost_per_1k_requests_usd"] > 0 else 0.0
        if saving >= 0:
            lines.append(f"saving: {saving:.1%} against the cheapest baseline that meets the SLOs ({best_name})")
        else:
            lines.append(f"warning: {best_name} meets the SLOs for {cost / best['cost_per_1k_requests_usd']:.2f}x "
                         "less than this plan")
    if out is not None:
        lines.append(f"next: moeserve serve {plan.model} --plan {out}")
    return lines


def evaluation_lines(report: dict) -> list[str]:
    """`plan --evaluate` in two lines: the held-out prompts replayed through the plan, and SPS's accuracy."""
    lines = []
    replay = (report or {}).get("replay")
    if replay:
        lines.append(f"held-out replay: {replay['prompts']} prompts, TTFT SLO met by {replay['ttft_met']:.0%}, "
                     f"TPOT SLO met by {replay['tpot_met']:.0%}, mean cost ${replay['mean_cost_usd'] * 1e3:.4g} "
                     f"per 1k requests (predicted ${replay['predicted_cost_usd'] * 1e3:.4g})")
    sps = (report or {}).get("sps")
    if sps and "global-average" in sps.get("methods", []):
        jsd = dict(zip(sps["methods"], sps["overall_jsd"], strict=True))
        best = min((m for m in jsd if m.startswith("sps")), key=jsd.get, default=None)
        if best is not None and jsd["global-average"] > 0:
            lines.append(f"SPS prediction of held-out prompts' routing: JSD {jsd[best]:.3f} bits ({best}) against "
                         f"{jsd['global-average']:.3f} for the global average "
                         f"({jsd[best] / jsd['global-average']:.2f}x)")
    return lines
