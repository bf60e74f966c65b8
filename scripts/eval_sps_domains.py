"""SPS and its variants on prompts from a domain the history never saw (leave-one-domain-out), next to the
within-domain figures (a random 20% held out across all domains).

    python scripts/eval_sps_domains.py TRACE [--alpha 15] [--temperature 0.05]

TRACE: a `moeserve profile` trace with prompt vectors and domains (e.g. --prompts builtin:mixed).
JSD in bits on MoE layers 1.. (layer 0's routing is known once prefill starts); lower is better.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from moeserve.remoe.deployment import trace_arrays  # noqa: E402
from moeserve.remoe.sps_eval import evaluate_domain_transfer  # noqa: E402
from moeserve.traces.format import ExpertTrace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--alpha", type=int, default=15)
    parser.add_argument("--temperature", type=float, default=0.05)
    args = parser.parse_args()
    trace = ExpertTrace.open(args.trace)
    arrays = trace_arrays(trace)
    domains = [str(d) for d in trace.meta.domains]
    print(f"{trace.num_requests} prompts, domains {sorted(set(domains))}")
    out = evaluate_domain_transfer(arrays["vectors"], arrays["prefill"], domains, args.alpha, args.temperature)
    ref = evaluate_domain_transfer(arrays["vectors"], arrays["prefill"], domains, args.alpha, args.temperature,
                                   within=0.2)
    print(f"{'method':<32} {'LOO JSD':>8} {'/global':>8} {'within JSD':>10} {'/global':>8}  per held-out domain")
    for i, m in enumerate(out.methods):
        per = " ".join(f"{d}={v:.4f}" for d, v in zip(out.domains, out.per_domain[i], strict=True))
        print(f"{m:<32} {out.overall[i]:8.4f} {out.ratio(m):8.3f} {ref.overall[i]:10.4f} {ref.ratio(m):8.3f}  {per}")


if __name__ == "__main__":
    main()
