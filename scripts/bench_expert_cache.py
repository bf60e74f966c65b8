"""Serving with an expert cache (experts/expert_cache.py): the original demo router vs a ReMoE fine-tuned one.

    python scripts/bench_expert_cache.py [--finetuned DIR] [--prompts builtin:mixed] [--num-prompts 12]
        [--tokens 32] [--rounds 1] [--threads 1] [--json out.json]

For each router (the demo's, and `moeserve finetune-router` output: given with --finetuned, else a quick
fine-tune of 60 steps x 4 sequences x 64 tokens is run first), the same greedy requests (batch 1, `ignore_eos`) are served by:
all experts resident, and an expert cache of C = k, 2k, 4k experts per layer (LRU), with prefetch off and
on, and C = E (every expert fits: the cache path's own cost, misses only for first uses). All engines live at once and are interleaved request by request (the first engine of each request
rotates), so every configuration sees the same load. The storage read bandwidth (O_DIRECT reads of one
expert, and the same ranges from the page cache) is measured between requests in the same run. The
engine's hit rates are replayed in the simulator on the routing each engine recorded (LRU, and Belady's
ceiling on the same steps). Figures: median over requests of TPOT (decode only; means in the JSON),
throughput (generated tokens / request time), hit rate, MB read and stall per generated token (prefill
included), the share of read-ahead experts the next layer used, and ratios to all-resident serving.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moeserve.cache import chunked_step_sets, simulate_cache, step_expert_sets
from moeserve.engine.build import EngineOptions, build_engine
from moeserve.engine.sampling import SamplingParams
from moeserve.experts.expert_cache import ExpertCacheOptions
from moeserve.models.direct_read import DirectExpertReader
from moeserve.models.loading import resolve_model_path
from moeserve.workloads import load_prompts


class Served:
    """One engine under test and what it measured."""

    def __init__(self, router: str, model: str, capacity: int | None, prefetch: str):
        self.router, self.capacity, self.prefetch = router, capacity, prefetch
        cache = ExpertCacheOptions(capacity, "lru", prefetch) if capacity else None
        self.engine = build_engine(EngineOptions(model, all_local=cache is None, device="cpu", expert_cache=cache))
        self.forwards: list[np.ndarray] = []
        self.engine.add_routing_listener(lambda ids: self.forwards.append(ids.numpy().copy()))
        self.finished = []
        observe = self.engine.metrics.observe_finished
        self.engine.metrics.observe_finished = lambda s: (self.finished.append(s), observe(s))
        self.tokens: list[list[int]] = []
        self.engine.start()

    @property
    def name(self) -> str:
        if not self.capacity:
            return f"{self.router}, all resident"
        return f"{self.router}, C={self.capacity}" + (", prefetch" if self.prefetch == "router" else "")

    def serve(self, prompt: str, tokens: int) -> None:
        out = self.engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
        self.tokens.append(out.token_ids)

    def figures(self) -> dict:
        gen = sum(s.completion_tokens for s in self.finished)
        tpot = [s.tpot_s for s in self.finished if s.tpot_s is not None]
        d = {"name": self.name, "router": self.router, "capacity": self.capacity, "prefetch": self.prefetch,
             "requests": len(self.finished), "generated_tokens": gen,
             "tpot_mean_s": statistics.fmean(tpot), "tpot_median_s": statistics.median(tpot),
             "throughput_tok_s": gen / sum(s.e2e_s for s in self.finished)}
        caches = self.engine.dispatch.caches
        if caches is not None:
            t = caches.totals()
            d.update(hit_rate=t["hit_rate"], misses=t["misses"], mb_read=t["bytes_read"] / 1e6,
                     prefetch_mb=t["prefetch_bytes"] / 1e6, prefetch_used=t["prefetch_used"],
                     prefetch_precision=t["prefetch_used"] / t["prefetch_reads"] if t["prefetch_reads"] else None,
                     mb_read_per_token=(t["bytes_read"] + t["prefetch_bytes"]) / 1e6 / gen,
                     stall_ms_per_token=1e3 * t["stall_s"] / gen, read_mode=t["read_mode"])
            d.update(self.simulated())
        return d

    def simulated(self) -> dict:
        """The simulator on this engine's recorded routing, with the engine's chunking of each forward."""
        routing = np.concatenate(self.forwards)
        step = np.repeat(np.arange(len(self.forwards)), [len(f) for f in self.forwards])
        experts = self.engine.layers[0].num_experts
        sets = chunked_step_sets(step_expert_sets(routing, step, experts), self.capacity)
        lru = simulate_cache(sets, experts, self.capacity, "lru", warm=True)
        belady = simulate_cache(sets, experts, self.capacity, "belady", warm=True)
        return {"sim_lru_hit_rate": lru.overall_hit_rate, "sim_belady_hit_rate": belady.overall_hit_rate}


def bandwidth_probe(reader: DirectExpertReader, layout, layers: list[int], experts: int, rng: random.Random) -> dict:
    """Read 8 random experts with O_DIRECT, then the same byte ranges through the page cache -> bytes/s."""
    picks = [(rng.choice(layers), rng.randrange(experts)) for _ in range(8)]
    direct_bytes = direct_s = cached_bytes = cached_s = 0
    for layer, e in picks:
        t0 = time.perf_counter()
        _, n = reader.read(layer, e, layout)
        direct_s += time.perf_counter() - t0
        direct_bytes += n
        for span in reader.expert_spans(layer, e).values():
            with open(span.path, "rb") as f:
                f.seek(span.offset)
                f.read(span.nbytes)  # warm the page cache
                t0 = time.perf_counter()
                f.seek(span.offset)
                cached_bytes += len(f.read(span.nbytes))
                cached_s += time.perf_counter() - t0
    return {"direct_bytes": direct_bytes, "direct_s": direct_s, "cached_bytes": cached_bytes, "cached_s": cached_s}


def quick_finetune(out: Path) -> Path:
    moeserve = Path(sys.executable).with_name("moeserve")
    subprocess.run([str(moeserve), "finetune-router", "demo", "--prompts", "builtin:corpus", "--steps", "60",
                    "--batch-size", "4", "--seq-len", "64", "--out", str(out)], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finetuned", type=Path, help="A `moeserve finetune-router demo` output directory.")
    ap.add_argument("--prompts", default="builtin:mixed")
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="Times each prompt is served by every engine.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        finetuned = args.finetuned or quick_finetune(Path(tmp) / "demo-reuse")
        demo = resolve_model_path("demo")
        probe = build_engine(EngineOptions("demo", all_local=True, device="cpu"))
        k, experts = probe.layers[0].top_k, probe.layers[0].num_experts
        layers = [la.index for la in probe.layers]
        layout = probe.layers[0].layout
        probe.shutdown()
        served = []
        for router, path in (("original", str(demo)), ("fine-tuned", str(finetuned))):
            served.append(Served(router, path, None, "none"))
            served.append(Served(router, path, experts, "none"))  # the cache path with everything fitting
            for c in (k, 2 * k, 4 * k):
                for prefetch in ("none", "router"):
                    served.append(Served(router, path, c, prefetch))
        prompts = [p.text for p in load_prompts(args.prompts, max_prompts=args.num_prompts, seed=0)]
        for s in served:  # warm-up, untimed (its few forwards do count in the hit rates)
            s.serve("warm up", 2)
            s.finished.clear()
            s.tokens.clear()
        reader = DirectExpertReader(demo)
        rng = random.Random(0)
        probes = []
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for i, prompt in enumerate(prompts):
                shift = (r * len(prompts) + i) % len(served)
                for s in served[shift:] + served[:shift]:
                    s.serve(prompt, args.tokens)
                probes.append(bandwidth_probe(reader, layout, layers, experts, rng))
        wall = time.perf_counter() - t0
        rows = [s.figures() for s in served]
        identical = {s.name: s.tokens == next(b for b in served if b.router == s.router and not b.capacity).tokens
                     for s in served if s.capacity}
        for s in served:
            s.engine.shutdown()
        reader.close()
    load_after = os.getloadavg()
    bw = {"direct_GB_s": sum(p["direct_bytes"] for p in probes) / sum(p["direct_s"] for p in probes) / 1e9,
          "page_cache_GB_s": sum(p["cached_bytes"] for p in probes) / sum(p["cached_s"] for p in probes) / 1e9,
          "direct_reads": 8 * len(probes), "read_mode": reader.mode}
    base = {r["router"]: r for r in rows if not r["capacity"]}
    for r in rows:
        r["tpot_vs_resident"] = r["tpot_median_s"] / base[r["router"]]["tpot_median_s"]
        r["throughput_vs_resident"] = r["throughput_tok_s"] / base[r["router"]]["throughput_tok_s"]
    orig = {(r["capacity"], r["prefetch"]): r for r in rows if r["router"] == "original"}
    for r in rows:
        if r["router"] == "fine-tuned" and r["capacity"]:
            o = orig[(r["capacity"], r["prefetch"])]
            r["tpot_reduction_vs_original"] = 1 - r["tpot_median_s"] / o["tpot_median_s"]
    report = {"load_before": load_before, "load_after": load_after, "cores": os.cpu_count(), "threads": args.threads,
              "prompts": args.prompts, "num_prompts": len(prompts), "tokens": args.tokens, "rounds": args.rounds,
              "wall_s": wall, "finetuned": str(args.finetuned or "quick 60-step fine-tune"), "bandwidth": bw,
              "tokens_identical_to_resident": identical, "rows": rows}
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def markdown(rep: dict) -> str:
    bw = rep["bandwidth"]
    lines = [f"load average {rep['load_before'][0]:.1f} before, {rep['load_after'][0]:.1f} after, "
             f"{rep['cores']} cores, {rep['threads']} torch thread(s); {rep['num_prompts']} prompts x "
             f"{rep['rounds']} round(s) x {rep['tokens']} tokens, batch 1; wall {rep['wall_s']:.0f} s",
             f"storage, same run: {bw['direct_GB_s']:.2f} GB/s O_DIRECT ({bw['read_mode']}, one expert per read, "
             f"{bw['direct_reads']} reads), {bw['page_cache_GB_s']:.2f} GB/s from the page cache "
             f"({bw['page_cache_GB_s'] / bw['direct_GB_s']:.1f}x)",
             f"tokens identical to all-resident serving: {all(rep['tokens_identical_to_resident'].values())}", "",
             "| router | C | prefetch | TPOT ms (median) | TPOT / resident | tok/s | tok/s / resident | hit rate (engine) "
             "| hit rate (simulator LRU) | Belady ceiling | MB read / token | stall ms / token | read-ahead used "
             "| TPOT vs original |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        if not r["capacity"]:
            lines.append(f"| {r['router']} | all | - | {1e3 * r['tpot_median_s']:.1f} | 1.00 | {r['throughput_tok_s']:.1f} "
                         "| 1.00 | 100% | | | 0 | 0 | | |")
            continue
        red = r.get("tpot_reduction_vs_original")
        red = None if red is None else -red
        lines.append(
            f"| {r['router']} | {r['capacity']} | {r['prefetch']} | {1e3 * r['tpot_median_s']:.1f} | "
            f"{r['tpot_vs_resident']:.2f} | {r['throughput_tok_s']:.1f} | {r['throughput_vs_resident']:.2f} | "
            f"{r['hit_rate']:.1%} | {r['sim_lru_hit_rate']:.1%} | {r['sim_belady_hit_rate']:.1%} | "
            f"{r['mb_read_per_token']:.2f} | {r['stall_ms_per_token']:.1f} | "
            f"{_pct(r['prefetch_precision'])} | "
            f"{'' if red is None else f'{red:+.1%}'} |")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.0%}"


if __name__ == "__main__":
    main()
