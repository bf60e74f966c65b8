"""Step 3: time one training step per experts implementation, to choose the step count for train.py.

    python scripts/demo_model/measure_step_time.py [--batch 8 --seq-len 512]

Runs a few real optimiser steps (same data, model and optimiser as train.py) with each of
transformers' experts implementations and writes runs/demo_model/step_time.json
(train.py copies it into training_log.json). The CPU is shared, so it reports the median and minimum.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import psutil
import torch
import transformers as tf
from demo_geometry import demo_config
from demo_paths import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, TOKENIZER_WORK_DIR
from token_data import build_streams, load_raw_tokenizer
from train import STEP_TIME_JSON, make_optimizer, sample_batch, train_step

from moeserve.atomic import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--implementations", nargs="+", default=["eager", "grouped_mm"])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--batched-mm-batch", type=int, default=1,
                        help="batched_mm gathers one weight matrix per (token, expert): ~12 GB RSS at batch 8, "
                             "so it is timed separately at this smaller batch (0 = skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_raw_tokenizer(TOKENIZER_WORK_DIR)
    bos_id, eos_id, pad_id = (tokenizer.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    streams = build_streams(tokenizer, bos_id, eos_id, tokens_per_domain=None)

    def setup(impl: str):
        torch.manual_seed(0)
        model = tf.Qwen3MoeForCausalLM(demo_config(tokenizer.get_vocab_size(), pad_id, bos_id, eos_id))
        model.config._experts_implementation = impl
        return model, make_optimizer(model, 1e-3, 0.1)

    # Round-robin, one step of each implementation per round, so CPU contention from other
    # processes hits all of them alike.
    runs = {impl: setup(impl) for impl in args.implementations}
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {impl: [] for impl in runs}
    for round_ in range(2 + args.rounds):
        batch = sample_batch(streams, rng, args.batch, args.seq_len)
        for impl, (model, optimizer) in runs.items():
            t0 = time.perf_counter()
            train_step(model, optimizer, batch, clip=1.0)
            if round_ >= 2:
                times[impl].append(time.perf_counter() - t0)
        print(round_, {k: round(v[-1], 2) for k, v in times.items() if v}, flush=True)
    results = {impl: {"batch": args.batch, "median_step_s": round(float(np.median(t)), 3),
                      "min_step_s": round(min(t), 3), "timed_steps": len(t)} for impl, t in times.items()}
    if args.batched_mm_batch:
        model, optimizer = setup("batched_mm")
        t = []
        for i in range(3):
            batch = sample_batch(streams, rng, args.batched_mm_batch * len(streams), args.seq_len)[::len(streams)]
            t0 = time.perf_counter()
            train_step(model, optimizer, batch, clip=1.0)
            if i:
                t.append(time.perf_counter() - t0)
        results["batched_mm"] = {"batch": args.batched_mm_batch, "median_step_s": round(float(np.median(t)), 3),
                                 "min_step_s": round(min(t), 3), "timed_steps": len(t),
                                 "peak_rss_gib": round(psutil.Process().memory_info().rss / 2**30, 2)}
    for impl, r in results.items():
        r["tokens_per_s_at_median"] = round(r["batch"] * args.seq_len / r["median_step_s"], 1)
        print(impl, r, flush=True)
    report = {"seq_len": args.seq_len, "threads": args.threads, "implementations": results,
              "note": "CPU shared with other jobs while measured; round-robin order makes the comparison fair"}
    write_text_atomic(STEP_TIME_JSON, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
