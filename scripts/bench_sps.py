"""Build and query time of the SPS tree at 1k, 10k and 100k history prompts, and its recall.

    python scripts/bench_sps.py [--dim 1024] [--sizes 1000 10000 100000] [--queries 200]

Synthetic prompt vectors from 16 domains x 32 topics (remoe/synthetic.py). Recall is the share of
the exact top-alpha found; "sim" is the mean cosine of the returned alpha over that of the exact alpha
(near-ties make recall pessimistic). Wall and CPU seconds: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import time

# Multi-threaded BLAS on a small shared machine is slower than one thread for these matrix sizes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from moeserve.remoe.sps import build_sps_tree, recall, search_brute_force, search_tree
from moeserve.remoe.synthetic import clustered_prompt_vectors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--alpha", type=int, default=15)
    parser.add_argument("--leaf-size", type=int, default=150)
    parser.add_argument("--routing", default="medoid", choices=["medoid", "centroid"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"dim={args.dim} alpha={args.alpha} leaf_size={args.leaf_size} queries={args.queries} routing={args.routing}"
    )
    print(
        f"{'prompts':>8} {'build s':>8} {'cpu s':>6} {'depth':>5} {'tree ms/q':>9} {'brute ms/q':>10} "
        f"{'recall':>6} {'sim':>6} {'recall@4':>8} {'sim@4':>6}"
    )
    for n in args.sizes:
        vectors, _, _ = clustered_prompt_vectors(rng, n + args.queries, args.dim, 16, 32)
        history, queries = vectors[:n], vectors[n:]
        t0, c0 = time.perf_counter(), time.process_time()
        tree = build_sps_tree(history, leaf_size=args.leaf_size, routing=args.routing)
        build, cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        approx, approx_sims = search_tree(tree, queries, args.alpha)
        tree_q = (time.perf_counter() - t0) / args.queries
        approx4, approx4_sims = search_tree(tree, queries, args.alpha, probe_leaves=4)
        t0 = time.perf_counter()
        exact, exact_sims = search_brute_force(history, queries, args.alpha)
        brute_q = (time.perf_counter() - t0) / args.queries
        print(
            f"{n:>8} {build:>8.2f} {cpu:>6.2f} {tree.depth:>5} {tree_q * 1e3:>9.2f} {brute_q * 1e3:>10.2f} "
            f"{recall(approx, exact):>6.3f} {approx_sims.mean() / exact_sims.mean():>6.3f} "
            f"{recall(approx4, exact):>8.3f} {approx4_sims.mean() / exact_sims.mean():>6.3f}"
        )


if __name__ == "__main__":
    main()
