"""Ray Serve backend vs process backend on the demo model, same payloads, same run, alternating.

Run by hand or from a nox bench session (not by tests); needs moeserve[ray]:

    python scripts/bench_ray.py [--calls 300] [--rounds 3] [--tokens 16]

1. Per-layer-call round trip (send -> result) and overhead (round trip - the function's own compute) of
   one MoE layer's remote call, for a decode payload (1 token) and a prefill payload (12 tokens): process
   backend, Ray Serve handle (what RayBackend ships), and a plain Ray actor holding the same experts (the
   direct-actor transport, for comparison). Median and p99.
2. Decode TPOT with experts 16-31 of every layer remote (one function per layer) on each backend, vs
   all-local: (time for N new tokens - time for 1) / (N - 1), greedy, one prompt.
3. Scale to zero and back on Ray Serve: a function with keep-alive 6 s idles to 0 replicas; the next
   call's wait, and Serve's replica start -> ready figure.
The machine's load (`uptime`) is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from moeserve.experts.backend import collect_with_failover
from moeserve.experts.dispatch import install_dispatch
from moeserve.experts.process_backend import ProcessBackend
from moeserve.experts.ray_backend import RayBackend
from moeserve.experts.ray_config import RaySettings, replica_args
from moeserve.experts.ray_replica import ExpertReplica
from moeserve.models.adapter import moe_layers
from moeserve.models.loading import DEMO_MODEL_DIR, load_model
from moeserve.plan.placement import ExpertFunction, ExpertPlacement


def load() -> str:
    return os.popen("uptime").read().strip()


def payload(layer, tokens: int, seed: int):
    """x [T, H] and the (rows, pairs) a layer would send to the function holding experts 16-31."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layer.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(layer.num_experts, generator=g)[: layer.top_k] for _ in range(tokens)])
    idx[:, 0] = 16 + torch.arange(tokens) % 16  # every token has at least one remote expert
    w = torch.rand(tokens, layer.top_k, generator=g)
    ids = idx.numpy()
    tok, slot = np.nonzero(ids >= 16)
    order = np.argsort(ids[tok, slot], kind="stable")
    tok, slot = tok[order], slot[order]
    rows, pair_rows = np.unique(tok, return_inverse=True)
    return (x, torch.from_numpy(rows), pair_rows.astype(np.int32), ids[tok, slot].astype(np.int32),
            w.numpy()[tok, slot].astype(np.float32))


def stats(values) -> dict:
    v = np.asarray(values) * 1e3
    return {"median_ms": round(float(np.median(v)), 3), "p99_ms": round(float(np.percentile(v, 99)), 3), "n": len(v)}


def time_backend(backend, fid, args) -> tuple[float, float]:
    t = time.perf_counter()
    rc = backend.call(fid, *args)
    [y], _ = collect_with_failover(backend, [rc], None)
    assert y is not None
    return time.perf_counter() - t, rc.compute_s


def time_actor(ray, actor, args) -> tuple[float, float]:
    x, rows, pr, pe, pw = args
    t = time.perf_counter()
    y, compute_s, _, _ = ray.get(actor.call.remote(x.index_select(0, rows).numpy(), pr, pe, pw))
    torch.from_numpy(np.array(y))
    return time.perf_counter() - t, compute_s


def generate(model, prompt, n):
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        return time.perf_counter() - t


def tpot(model, prompt, n) -> float:
    return (generate(model, prompt, n) - generate(model, prompt, 1)) / (n - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per backend and payload")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the TPOT runs")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per TPOT run")
    parser.add_argument("--zero-only", action="store_true", help="only part 3 (scale to zero and back)")
    args = parser.parse_args()
    report = {"load_before": load(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    model = load_model(DEMO_MODEL_DIR)
    layers = moe_layers(model)
    n = layers[0].num_experts
    placement = ExpertPlacement({la.index: tuple(range(n // 2)) for la in layers},
                                tuple(ExpertFunction(f"L{la.index}-r0", la.index, tuple(range(n // 2, n)),
                                                     keep_alive_s=3600) for la in layers))
    process = ProcessBackend.from_model(model, str(DEMO_MODEL_DIR), placement).start()
    ray_backend = RayBackend.from_model(model, str(DEMO_MODEL_DIR), placement,
                                        settings=RaySettings(max_replicas=1)).start()
    import ray

    class Direct(ExpertReplica):
        def call(self, *a):
            return self(*a)

    first = layers[0]
    spec = placement.functions[0]
    actor = ray.remote(num_cpus=0.1)(Direct).remote(
        replica_args(str(DEMO_MODEL_DIR), spec, first.layout.to_dict(), first.hidden_size, "float32", 1))
    payloads = {"decode_1_token": payload(first, 1, 0), "prefill_12_tokens": payload(first, 12, 1)}
    transports = {"process": lambda a: time_backend(process, spec.id, a),
                  "ray_serve_handle": lambda a: time_backend(ray_backend, spec.id, a),
                  "ray_direct_actor": lambda a: time_actor(ray, actor, a)}
    for name, p in ({} if args.zero_only else payloads).items():  # warm up, then alternate call by call
        for f in transports.values():
            for _ in range(20):
                f(p)
        trips = {k: [] for k in transports}
        over = {k: [] for k in transports}
        for _ in range(args.calls):
            for k, f in transports.items():
                trip, compute = f(p)
                trips[k].append(trip)
                over[k].append(trip - compute)
        report[name] = {k: {"round_trip": stats(trips[k]), "overhead": stats(over[k])} for k in transports}
        proc = report[name]["process"]["overhead"]["median_ms"]
        report[name]["ray_serve_over_process_median"] = round(
            report[name]["ray_serve_handle"]["overhead"]["median_ms"] / proc, 2)
    ray.kill(actor)

    prompt = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    runs = {"all_local": [], "process_half_remote": [], "ray_half_remote": []}
    for _ in range(0 if args.zero_only else args.rounds):
        runs["all_local"].append(tpot(model, prompt, args.tokens))
        for key, backend in (("process_half_remote", process), ("ray_half_remote", ray_backend)):
            handle = install_dispatch(model, placement, backend)
            runs[key].append(tpot(model, prompt, args.tokens))
            handle.remove()
    report["decode_tpot_ms"] = {k: round(float(np.median(v)) * 1e3, 2) for k, v in runs.items() if v}
    process.stop()

    zero = ExpertFunction("L0-zero", first.index, tuple(range(n // 2, n)), keep_alive_s=6)
    print(json.dumps(report, indent=2), flush=True)  # the figures so far, should the last part fail
    every = {la.index: tuple(range(n)) for la in layers}  # the function's experts are also local: valid
    z = RayBackend.from_model(model, str(DEMO_MODEL_DIR), ExpertPlacement(every, (zero,)),
                              settings=RaySettings(max_replicas=1, app_prefix="zero-")).start()
    p = payloads["decode_1_token"]
    time_backend(z, zero.id, p)
    t = time.perf_counter()
    while z.metrics()["functions"][zero.id]["replicas"] and time.perf_counter() - t < 120:
        time.sleep(0.2)
    idle_to_zero = time.perf_counter() - t
    trip, _ = time_backend(z, zero.id, p)
    deadline = time.perf_counter() + 30
    while z.metrics()["functions"][zero.id]["cold_starts"] < 2 and time.perf_counter() < deadline:
        time.sleep(0.2)
    m = z.metrics()["functions"][zero.id]
    report["scale_to_zero"] = {"keep_alive_s": zero.keep_alive_s, "idle_until_zero_replicas_s": round(idle_to_zero, 1),
                               "first_call_after_zero_s": round(trip, 2),
                               "serve_replica_start_to_ready_s": round(m["last_cold_start_s"], 2),
                               "scaled_to_zero": m["scaled_to_zero"]}
    z.stop()
    ray_backend.stop()
    report["load_after"] = load()
    print(json.dumps({k: report[k] for k in ("scale_to_zero", "load_after")}, indent=2))


if __name__ == "__main__":
    main()
