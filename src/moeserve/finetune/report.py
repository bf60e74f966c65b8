"""Before/after evaluation of a router fine-tune on held-out text (ReMoE's reuse vs quality trade-off)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.cache import simulate_cache
from moeserve.models.adapter import require_moe_layers
from moeserve.traces.capture import RoutingCapture, stack_layers
from moeserve.traces.stats import consecutive_overlap


@dataclass
class HeldOutRun:
    """One model's pass over held-out windows (teacher forcing)."""

    expert_ids: np.ndarray  # [T, L, K] routing of every held-out token, window after window
    offsets: np.ndarray  # [windows + 1] token offsets (each window is one request)
    next_token: np.ndarray  # [T] argmax next-token prediction at each position
    nll_by_domain: dict[str, tuple[float, int]]  # domain -> (summed NLL, predicted tokens)


@torch.no_grad()
def run_held_out(model, windows_by_domain: dict[str, torch.Tensor], batch_size: int = 8) -> HeldOutRun:
    """windows_by_domain: domain -> [N, S] token ids."""
    layers = require_moe_layers(model)
    device = next(model.parameters()).device
    ids_all, preds, nll = [], [], {}
    for domain, windows in windows_by_domain.items():
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size].to(device)
            b, s = batch.shape
            with RoutingCapture(model, layers) as cap:
                logits = model(input_ids=batch).logits.float()
            ids_all.append(stack_layers(cap.calls[0].ids).view(b, s, len(layers), -1).reshape(b * s, len(layers), -1))
            preds.append(logits.argmax(-1).reshape(-1).cpu())
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            total += -logp.gather(2, batch[:, 1:, None]).sum().item()
            count += b * (s - 1)
        nll[domain] = (total, count)
    seq = next(iter(windows_by_domain.values())).shape[1]
    n_windows = sum(len(w) for w in windows_by_domain.values())
    return HeldOutRun(
        expert_ids=torch.cat(ids_all).numpy(),
        offsets=np.arange(n_windows + 1, dtype=np.int64) * seq,
        next_token=torch.cat(preds).numpy(),
        nll_by_domain=nll,
    )


def compare_runs(before: HeldOutRun, after: HeldOutRun, num_experts: int, top_k: int,
                 expert_bytes: int = 0) -> dict:
    """The report: overlap per layer, LRU/Belady hit rates at C = k, 2k, 4k, perplexity per domain,
    greedy next-token agreement; each before and after."""

    report: dict = {"overlap": {}, "cache": [], "perplexity": {}, "next_token_agreement": None}
    for name, run in (("before", before), ("after", after)):
        report["overlap"][name] = consecutive_overlap(run.expert_ids, run.offsets).tolist()
    for capacity in sorted({min(c, num_experts) for c in (top_k, 2 * top_k, 4 * top_k)}):
        row = {"capacity": capacity}
        for policy in ("lru", "belady"):
            for name, run in (("before", before), ("after", after)):
                stats = simulate_cache(run.expert_ids, num_experts=num_experts, capacity=capacity, policy=policy,
                                       request_starts=run.offsets[:-1], warm=False, expert_bytes=expert_bytes)
                row[f"{policy}_{name}"] = float(stats.overall_hit_rate)
        report["cache"].append(row)
    for domain in before.nll_by_domain:
        b_nll, n = before.nll_by_domain[domain]
        a_nll, _ = after.nll_by_domain[domain]
        report["perplexity"][domain] = {"before": math.exp(b_nll / n), "after": math.exp(a_nll / n), "tokens": n}
    report["next_token_agreement"] = float((before.next_token == after.next_token).mean())
    ob, oa = np.nanmean(report["overlap"]["before"]), np.nanmean(report["overlap"]["after"])
    report["summary"] = {
        "overlap_before": float(ob), "overlap_after": float(oa), "overlap_gain_rel": float(oa / ob - 1),
        "perplexity_change_rel": {d: v["after"] / v["before"] - 1 for d, v in report["perplexity"].items()},
        "lru_hit_rate_at_k": {"before": report["cache"][0]["lru_before"], "after": report["cache"][0]["lru_after"]},
    }
    return report
