"""Plans for the shipped model cards, none of which can run here: card -> profile from its config (random
weights) -> synthetic trace like a measured one -> Remoe plan, at two pricing pairs and two SLO settings.

    python scripts/card_plan_table.py --like demo.trace --out-dir card-plans [--cards qwen3-30b-a3b ...]
        [--repeats 5]    (load and timings are printed; profiles are cached in --out-dir)

Prints a markdown table of dollars per 1,000 requests: the shape the planner chose next to every shape it
costed (one that misses the SLOs is marked), chosen over the runner-up, and Remoe's split over all-GPU. The
hardware profiles are measured on this machine (their `conditions` say whether it was loaded); the
GPU figures are the datasheet roofline of `--gpu-hardware`; the traces are synthetic, made like
`--like` (state its provenance next to the table).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moeserve.errors import MoeServeError
from moeserve.hardware import load_hardware_profile, save_profile
from moeserve.hardware.from_config import measure_config_hardware
from moeserve.models.cards import card_names
from moeserve.models.geometry import inspect_model
from moeserve.planner import PlanOptions, plan_trace
from moeserve.traces.synth import synth_trace

PRICING = {"lambda+modal-a100": ("aws-lambda-x86", "modal-a100-80gb"),
           "lambda+paper-3x": ("aws-lambda-x86", "paper-gpu-3x")}
SLOS = {"10 s, 1 s": (10.0, 1.0), "60 s, 5 s": (60.0, 5.0)}
# fewer points than `moeserve profile --hardware` so that the largest cards finish in minutes on a small machine;
# the curves' fits continue linearly past the last point
TOKENS, PREFILL, DECODE = (1, 2, 4, 8, 16, 32, 64), (16, 64), (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", required=True, help="a measured trace the synthetic traces are made like")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--cards", nargs="*", default=card_names())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-hardware", default="a100-80gb")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"load before: {os.getloadavg()}", flush=True)
    for card in args.cards:
        hw_path, trace_path = args.out_dir / f"{card}-hw.yaml", args.out_dir / f"{card}.trace"
        if not hw_path.exists():
            save_profile(measure_config_hardware(card, inspect_model(card), repeats=args.repeats, token_counts=TOKENS,
                                                 prefill_lengths=PREFILL, decode_batches=DECODE), hw_path)
        hw = load_hardware_profile(hw_path)
        if not trace_path.exists():
            synth_trace(card, args.like, trace_path)
        for pname, pricing in PRICING.items():
            for sname, (ttft, tpot) in SLOS.items():
                options = PlanOptions(trace_path, hardware=str(hw_path), gpu_hardware=args.gpu_hardware,
                                      pricing=pricing, slo_ttft_s=ttft, slo_tpot_s=tpot, model=card)
                try:
                    plan, _ = plan_trace(options)
                    row = {"card": card, "pricing": pname, "slo": sname, "remoe": plan.predicted,
                           "baselines": plan.baselines, "notes": plan.extra.get("notes", [])}
                except MoeServeError as exc:
                    row = {"card": card, "pricing": pname, "slo": sname, "error": str(exc)}
                row["hw_unreliable"] = bool(hw.conditions and hw.conditions.unreliable)
                rows.append(row)
                print(json.dumps(row, default=str)[:400], flush=True)
    print(f"load after: {os.getloadavg()}", flush=True)
    (args.out_dir / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    print_table(rows)


SHAPES = ("remoe", "remoe-even", "mix", "all-gpu", "all-cpu", "remoe-cpu", "fetch")


def print_table(rows: list[dict]) -> None:
    """One markdown row per plan: the chosen shape, every shape's $/1k requests, chosen over the runner-up
    (the cheapest other shape meeting the SLOs) and Remoe's split over all-GPU."""
    print("\n| card | pricing | SLO TTFT, TPOT | chosen | " + " | ".join(SHAPES)
          + " | chosen / runner-up | remoe / all-gpu |")
    print("|" + " --- |" * (len(SHAPES) + 6))
    for r in rows:
        if "error" in r:
            print(f"| {r['card']} | {r['pricing']} | {r['slo']} | {r['error'][:90]} |" + " |" * (len(SHAPES) + 2))
            continue
        figures = {**r["baselines"], r["remoe"]["shape"]: r["remoe"]}
        cost = {n: f["cost_per_1k_requests_usd"] for n, f in figures.items()}
        cells = ["" if n not in figures else f"{cost[n]:.4g}" + ("" if figures[n]["meets_slo"] else " (misses)")
                 for n in SHAPES]
        chosen = r["remoe"]["shape"]
        others = [cost[n] for n, f in figures.items() if n != chosen and f["meets_slo"]]
        runner_up = f"{cost[chosen] / min(others):.2f}x" if others else "n/a"
        split = f"{cost['remoe'] / cost['all-gpu']:.2f}x" if "remoe" in cost and figures["remoe"]["meets_slo"] \
            and cost.get("all-gpu") else "n/a"
        print(f"| {r['card']} | {r['pricing']} | {r['slo']} | {chosen} | " + " | ".join(cells)
              + f" | {runner_up} | {split} |")

if __name__ == "__main__":
    main()
