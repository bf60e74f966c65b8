"""Planning time for a DeepSeek-V3-shaped model (58 MoE layers x 256 experts, top-8) from 10k prompts,
next to the EPLB reference's time for the same shape.

    python scripts/bench_plan.py [--prompts 10000] [--ttft 60] [--tpot 0.5] [--pricing aws-lambda-x86 paper-gpu-3x]

Synthetic Zipf-skewed trace and made-up hardware latencies (remoe/synthetic.py): the timings are
what this script measures; the dollar figures only illustrate the cost model.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread: faster on a small shared machine
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from moeserve.moeless.eplb import eplb_phy2log
from moeserve.pricing.profiles import load_pricing
from moeserve.remoe.bounds import RoutingHistory
from moeserve.remoe.cost import CostModel
from moeserve.remoe.inputs import RequestShape, Slo
from moeserve.remoe.lpt import lpt_partition
from moeserve.remoe.planner import plan_remoe
from moeserve.remoe.shapes import plan_cheapest
from moeserve.remoe.sps import build_sps_tree
from moeserve.remoe.synthetic import deepseek_v3_geometry, example_hardware, synthetic_trace
from moeserve.units import MIB


def timed(label: str, fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label:<58} {time.perf_counter() - t0:8.3f} s wall {time.process_time() - c0:8.3f} s cpu")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=10000)
    parser.add_argument("--ttft", type=float, default=60.0)
    parser.add_argument("--tpot", type=float, default=0.5)
    parser.add_argument("--pricing", nargs="+", default=["aws-lambda-x86", "paper-gpu-3x"])
    args = parser.parse_args()
    geo = deepseek_v3_geometry()
    model = CostModel.build(geo, example_hardware(geo.expert_bytes / MIB), load_pricing(*args.pricing))
    trace = timed(
        f"generate synthetic trace ({args.prompts} prompts, not planning)",
        lambda: synthetic_trace(args.prompts, geo.layers, geo.experts, dim=256, seed=0),
    )
    slo = Slo(args.ttft, args.tpot)

    def average():
        return trace.prefill.mean(axis=0, dtype=np.float64), trace.decode.mean(axis=0, dtype=np.float64)

    timed(
        "once per process: numba import + compiled LPT cache load",
        lambda: lpt_partition(np.arange(256.0), 8),
    )
    t0, c0 = time.perf_counter(), time.process_time()
    share, decode = timed("workload average of the trace", average)
    request = RequestShape(int(np.percentile(trace.prompt_tokens, 95)), int(trace.output_tokens.mean()))
    chosen = timed(
        "plan_cheapest: every shape (Remoe, Remoe-even, baselines)",
        lambda: plan_cheapest(model, share, decode, request, slo),
    )
    print(
        f"{'  = deployment plan from the trace (average + plan)':<58} {time.perf_counter() - t0:8.3f} s wall "
        f"{time.process_time() - c0:8.3f} s cpu"
    )
    counts = share * request.prompt_tokens * geo.top_k  # [L, E] token-expert pairs of the planned request
    timed(
        "EPLB reference: 58 x (256 + 32) slots on 32 devices",
        lambda: eplb_phy2log(counts, geo.experts + 32, 32),
    )
    timed(
        "EPLB reference, hierarchical: 4 nodes, 8 groups",
        lambda: eplb_phy2log(counts, geo.experts + 32, 32, num_nodes=4, num_groups=8),
    )
    full = timed(
        "plan_remoe, analytic bound, with the 5 baselines",
        lambda: plan_remoe(model, share, decode, request, slo),
    )
    plan = timed(
        "plan_remoe, analytic bound, no baselines",
        lambda: plan_remoe(model, share, decode, request, slo, baselines=False),
    )
    history = timed(
        "routing history (512 prompts)", lambda: RoutingHistory.from_trace(trace.prefill, trace.prompt_tokens)
    )
    hplan = timed(
        "plan_remoe, history (conformal) bound, no baselines",
        lambda: plan_remoe(model, share, decode, request, slo, baselines=False, history=history),
    )
    timed("SPS tree over the trace's prompt vectors", lambda: build_sps_tree(trace.vectors))
    one = timed(
        "per-request plan (fixed r, SPS-sized input)",
        lambda: plan_remoe(
            model,
            trace.prefill[0],
            trace.decode[0],
            RequestShape(int(trace.prompt_tokens[0]), 128),
            slo,
            remote_count=plan.remote_count,
            baselines=False,
        ),
    )
    print(
        f"\nrequest: {request.prompt_tokens} prompt tokens (p95), {request.output_tokens} output tokens (mean); SLO {slo}"
    )
    for name, p in (("analytic", plan), ("history", hplan)):
        f = p.predicted
        print(
            f"{name:>9}: r={p.remote_count}/{geo.experts} remote, replicas {int(p.split.replicas.sum())}, "
            f"memory {int(np.median(p.split.memory_mb))} MB (median), TTFT {f.ttft_s:.2f} s "
            f"(bound {p.ttft_bound_s:.2f} s), TPOT {f.tpot_s:.3f} s, ${f.cost_usd:.4f}/request"
        )
    print(
        f"per-request plan: TTFT {one.predicted.ttft_s:.2f} s, TPOT {one.predicted.tpot_s:.3f} s, ${one.predicted.cost_usd:.4f}"
    )
    print("baselines (same cost model):")
    for name, f in full.baselines.items():
        print(
            f"  {name:<10} TTFT {f.ttft_s:8.2f} s  TPOT {f.tpot_s:7.3f} s  ${f.cost_usd:.4f}  meets SLO: {f.meets(slo)}  {f.note}"
        )
    print(f"chosen shape: {chosen.shape} ${chosen.predicted.cost_usd:.4f}/request, runner-up {chosen.runner_up} "
          f"(+${chosen.margin_usd or 0:.4f})")
    for note in chosen.notes:
        print("note:", note)


if __name__ == "__main__":
    main()
