"""Chunked and batched prefill under load: short requests' TTFT while long prompts arrive, and 8 concurrent
streams vs one, on the engine in this process (no HTTP), demo model.

    python scripts/bench_prefill.py [--threads 1] [--budget 256] [--duration 20] [--json out.json]

Workload (seeded, identical for every configuration): short requests (8-24 prompt tokens, 16 new tokens)
arrive as a Poisson stream at --short-rate req/s; long prompts (--long-tokens tokens, 4 new tokens)
arrive every --long-every s. Reported per configuration: TTFT p50 / p99 of the short requests, the
longest gap between two tokens of any request (the stall a long prefill causes), and output tokens/s.
Configurations: `whole` (max_prefill_tokens large enough for any prompt: every prompt prefilled in one
step) and `chunked` (--budget tokens per step). Run the same script with another tree on PYTHONPATH
to compare with an engine that has neither (both configurations then prefill one prompt at a time).
Then `throughput`: --clients closed-loop streams of 64 new tokens for --duration s vs one stream.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from pathlib import Path

import torch

from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.engine.sampling import SamplingParams
from moeserve.models.loading import load_model, load_tokenizer


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def run_mixed(engine: Engine, args, vocab: int) -> dict:
    rng = random.Random(0)
    events = []  # (time, prompt ids, max_tokens, kind)
    t = 0.0
    while t < args.duration:
        t += rng.expovariate(args.short_rate)
        events.append((t, [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 25))], 16, "short"))
    for k in range(int(args.duration / args.long_every)):
        events.append((0.5 + k * args.long_every, [rng.randrange(3, vocab) for _ in range(args.long_tokens)], 4,
                       "long"))
    events.sort(key=lambda e: e[0])
    results = []
    lock = threading.Lock()

    def consume(handle, sent, kind):
        times = []
        for event in handle.events(timeout=300):
            times += [time.perf_counter()] * len(event.token_ids)
        with lock:
            results.append((kind, sent, times))

    threads = []
    t0 = time.perf_counter()
    for at, ids, n, kind in events:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        handle = engine.submit(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        th = threading.Thread(target=consume, args=(handle, sent, kind), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(300)
    wall = time.perf_counter() - t0
    ttft = [times[0] - sent for kind, sent, times in results if kind == "short" and times]
    gaps = [max(b - a for a, b in zip(times, times[1:], strict=False)) for _, _, times in results if len(times) > 1]
    tokens = sum(len(times) for _, _, times in results)
    return {"short_requests": len(ttft), "long_requests": sum(k == "long" for k, _, _ in results),
            "short_ttft_p50_ms": 1e3 * pct(ttft, 0.5), "short_ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "max_token_gap_ms": 1e3 * max(gaps, default=float("nan")), "out_tok_s": tokens / wall}


def run_closed(engine: Engine, clients: int, duration: float, vocab: int) -> float:
    rng = random.Random(1)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(8, 25))] for _ in range(64)]
    counted = [0]
    end = time.perf_counter() + duration
    lock = threading.Lock()

    def client(i):
        k = 0
        while time.perf_counter() < end:
            handle = engine.submit(prompts[(i + k * clients) % len(prompts)],
                                   SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
            for event in handle.events(timeout=300):
                if time.perf_counter() <= end:
                    with lock:
                        counted[0] += len(event.token_ids)
            k += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + 120)
    return counted[0] / duration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--short-rate", type=float, default=4.0)
    ap.add_argument("--long-tokens", type=int, default=900)
    ap.add_argument("--long-every", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--configs", default="whole,chunked,throughput")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("demo"), load_tokenizer("demo")
    vocab = model.config.vocab_size
    report = {"threads": args.threads, "load_before": os.getloadavg(), "settings": vars(args) | {"json": None}}
    configs = args.configs.split(",")
    for name in configs:
        if name == "throughput":
            continue
        budget = 4096 if name == "whole" else args.budget
        engine = Engine(model, tok, EngineConfig(max_batch=8, max_prefill_tokens=budget)).start()
        try:
            engine.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
            report[name] = run_mixed(engine, args, vocab)
        finally:
            engine.shutdown()
        r = report[name]
        print(f"{name:>8} (budget {budget}): short TTFT p50 {r['short_ttft_p50_ms']:.0f} ms, p99 "
              f"{r['short_ttft_p99_ms']:.0f} ms; longest token gap {r['max_token_gap_ms']:.0f} ms; "
              f"{r['out_tok_s']:.0f} tok/s ({r['short_requests']} short, {r['long_requests']} long)", flush=True)
    if "throughput" in configs:
        engine = Engine(model, tok, EngineConfig(max_batch=args.clients, max_prefill_tokens=args.budget)).start()
        try:
            engine.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
            one = run_closed(engine, 1, args.duration, vocab)
            many = run_closed(engine, args.clients, args.duration, vocab)
        finally:
            engine.shutdown()
        report["throughput"] = {"single_tok_s": one, "clients_tok_s": many, "ratio": many / one}
        print(f"throughput: {args.clients} clients {many:.0f} tok/s vs one stream {one:.0f} tok/s: "
              f"{many / one:.2f}x", flush=True)
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
