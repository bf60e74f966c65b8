"""Time the expert-cache simulator on a synthetic 1M tokens x 60 layers x top-8 (256 experts) trace.

Run by hand or from a nox bench session (not by tests):

    python scripts/bench_cache_sim.py [--tokens 1000000] [--capacity 16] [--numpy-tokens 20000]

The trace is for timing only: each token either repeats the previous token's experts (probability
--reuse) or draws a fresh set of top_k distinct experts around a Zipf-popular expert. The numpy engine
is timed on a --numpy-tokens prefix and scaled linearly (it is a step loop, linear in steps).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from moeserve.cache import POLICIES, numba_available, overlap_ratio, simulate_cache


def synthetic_routing(
    tokens: int, layers: int, top_k: int, experts: int, reuse: float, seed: int
) -> np.ndarray:
    """[tokens, layers, top_k] int16 distinct ids per row: (anchor + stride * j) mod experts, stride odd."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** 0.8
    popularity /= popularity.sum()
    routing = np.empty((tokens, layers, top_k), dtype=np.int16)
    offsets = np.arange(top_k)
    for layer in range(layers):
        fresh = rng.random(tokens) >= reuse
        fresh[0] = True
        source = np.maximum.accumulate(np.where(fresh, np.arange(tokens), 0))
        anchor = rng.permutation(experts)[rng.choice(experts, size=tokens, p=popularity)][source]
        stride = (2 * rng.integers(0, 4, size=tokens) + 1)[source]
        routing[:, layer, :] = (anchor[:, None] + stride[:, None] * offsets) % experts
    return routing


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--reuse", type=float, default=0.3)
    parser.add_argument(
        "--request-tokens", type=int, default=0, help="split into requests of this length (0: one)"
    )
    parser.add_argument("--warm", action="store_true", help="carry the cache over between requests")
    parser.add_argument(
        "--numpy-tokens", type=int, default=20_000, help="prefix for the numpy engine (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; numpy {np.__version__}; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    t0 = time.perf_counter()
    routing = synthetic_routing(args.tokens, args.layers, args.top_k, args.experts, args.reuse, args.seed)
    print(
        f"trace: {routing.shape} {routing.dtype} ({routing.nbytes / 2**20:.0f} MiB), "
        f"generated in {time.perf_counter() - t0:.1f} s"
    )
    starts = None
    if args.request_tokens:
        starts = np.arange(0, args.tokens, args.request_tokens)
    overlap_ratio(routing[:64])  # compile (or load the on-disk cache) outside the timing
    t0 = time.perf_counter()
    overlap = overlap_ratio(routing, starts)
    print(f"overlap_ratio: mean {overlap.mean():.3f} in {time.perf_counter() - t0:.2f} s wall")

    common = dict(request_starts=starts, warm=args.warm)
    if numba_available():
        import numba

        print(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
        t0 = time.perf_counter()
        for policy in POLICIES:  # compile (or load the on-disk cache) for this dtype outside the timing
            simulate_cache(
                routing[:64], args.experts, args.capacity, policy, engine="numba", **_first(common)
            )
        print(f"numba compile / cache load: {time.perf_counter() - t0:.1f} s")
        for policy in POLICIES:
            wall, cpu = time.perf_counter(), time.process_time()
            stats = simulate_cache(routing, args.experts, args.capacity, policy, engine="numba", **common)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(
                f"numba  {policy:>6}  C={args.capacity}: {wall:6.2f} s wall, {cpu:6.2f} s cpu  "
                f"hit rate {stats.overall_hit_rate:.4f}"
            )
        print(f"load average after numba runs: {os.getloadavg()[0]:.2f}")
    else:
        print("numba not installed: compiled engine skipped")

    if args.numpy_tokens:
        prefix = routing[: args.numpy_tokens]
        prefix_starts = None if starts is None else starts[starts < args.numpy_tokens]
        scale = args.tokens / len(prefix)
        for policy in POLICIES:
            wall, cpu = time.perf_counter(), time.process_time()
            stats = simulate_cache(
                prefix,
                args.experts,
                args.capacity,
                policy,
                engine="numpy",
                request_starts=prefix_starts,
                warm=args.warm,
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(
                f"numpy  {policy:>6}  C={args.capacity}: {wall:6.2f} s wall, {cpu:6.2f} s cpu on {len(prefix)} "
                f"tokens -> ~{wall * scale:.0f} s wall per {args.tokens} (linear scaling)  "
                f"hit rate {stats.overall_hit_rate:.4f}"
            )


def _first(common: dict) -> dict:
    """The same options on a 64-token prefix (request starts inside it only)."""
    starts = common["request_starts"]
    return {**common, "request_starts": None if starts is None else starts[starts < 64]}


if __name__ == "__main__":
    main()
