"""MoEless's fitted load predictor on requests of a domain its history never saw (leave-one-domain-out),
next to a within-domain split (all requests shuffled), each against the moving average MA(10).

    python scripts/eval_load_predictor_domains.py TRACE [--tokens-per-window 128] [--seeds 0 1 2]

TRACE: a `moeserve profile` trace with domains (e.g. --prompts builtin:mixed). Prints mean WAPE over
layers and straggler recall per held-out domain; chosen / MA below 1 means the predictor helps.
"""

from __future__ import annotations

import argparse

import numpy as np

from moeserve.moeless.predictor_eval import evaluate_predictor_domain_transfer
from moeserve.traces.format import ExpertTrace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--tokens-per-window", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    trace = ExpertTrace.open(args.trace)
    routing, offsets = trace["expert_ids"].astype(np.int64), trace["request_offsets"]
    print(f"{trace.num_requests} requests, {trace.num_tokens} tokens, windows of {args.tokens_per_window} tokens, "
          f"domains {sorted(set(map(str, trace.meta.domains)))}")
    runs = [evaluate_predictor_domain_transfer(routing, offsets, trace.meta.domains, trace.meta.num_experts,
                                               args.tokens_per_window, seed) for seed in args.seeds]
    print(f"{'held out':<10} {'WAPE chosen':>11} {'WAPE MA':>8} {'chosen/MA':>9} {'recall chosen':>13} {'recall MA':>9}"
          f"   (mean of {len(runs)} seeds)")
    for i, split in enumerate(runs[0].splits):
        c, b = np.mean([r.wape_chosen[i] for r in runs]), np.mean([r.wape_baseline[i] for r in runs])
        rc, rb = np.mean([r.recall_chosen[i] for r in runs]), np.mean([r.recall_baseline[i] for r in runs])
        print(f"{split:<10} {c:11.4f} {b:8.4f} {c / b:9.3f} {rc:13.3f} {rb:9.3f}")
    loo = [np.mean([r.ratio()[:-1].mean() for r in runs]), np.mean([r.ratio()[-1] for r in runs])]
    print(f"mean chosen/MA: unseen domain {loo[0]:.3f}, within domains {loo[1]:.3f}")


if __name__ == "__main__":
    main()
