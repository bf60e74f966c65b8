"""Routing-capture overhead: greedy generate with moeserve's capture hooks vs plain generate, same run.

    python scripts/bench_capture.py [--model demo] [--prompts builtin:mixed] [--n 16] [--gen-tokens 32] [--rounds 3]

Each round runs every prompt both ways, alternating the order, so drift in machine load hits both.
Reports the median over rounds of the total time, and the overhead (target: within 10%).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", default="builtin:mixed")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args, _ = ap.parse_known_args()

    from moeserve.models.adapter import require_moe_layers
    from moeserve.models.loading import load_model, load_tokenizer
    from moeserve.traces.capture import RoutingCapture
    from moeserve.workloads import load_prompts

    model, tok = load_model(args.model), load_tokenizer(args.model)
    layers = require_moe_layers(model)
    prompts = [p.text for p in load_prompts(args.prompts, max_prompts=args.n, seed=0)]
    encoded = [tok(p, return_tensors="pt", truncation=True, max_length=256) for p in prompts]

    def run(capture: bool) -> float:
        t0 = time.perf_counter()
        for enc in encoded:
            kwargs = dict(**enc, max_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                if capture:
                    with RoutingCapture(model, layers):
                        model.generate(**kwargs)
                else:
                    model.generate(**kwargs)
        return time.perf_counter() - t0

    run(False)  # warm-up
    plain, captured = [], []
    for r in range(args.rounds):
        for capture in ((False, True) if r % 2 == 0 else (True, False)):
            (captured if capture else plain).append(run(capture))
    p, c = statistics.median(plain), statistics.median(captured)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"model {args.model}, {len(prompts)} prompts x {args.gen_tokens} tokens, {args.rounds} rounds")
    print(f"plain generate (baseline): {p:.3f} s   with routing capture: {c:.3f} s   overhead {c / p - 1:+.1%}")


if __name__ == "__main__":
    main()
