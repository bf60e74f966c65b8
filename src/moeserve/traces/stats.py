"""Per-layer summary of a trace: how skewed, how reusable and how domain-specific the routing is."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moeserve.cache import overlap_ratio
from moeserve.traces.activation import activation_matrix
from moeserve.traces.format import DECODE, PREFILL, ExpertTrace


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0..1) along the last axis. p, q: [..., E] (normalised here) -> [...]."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1e-300)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1.0)), 0.0).sum(-1)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def consecutive_overlap(expert_ids: np.ndarray, request_offsets: np.ndarray,
                        rows: np.ndarray | None = None) -> np.ndarray:
    """Mean |E_t ∩ E_{t-1}| / k over consecutive tokens of the same request, per layer.

    expert_ids: [T, L, K]; request_offsets: [R + 1]; rows: [T] bool, the tokens that count (pairs are
    formed only between consecutive counted tokens of one request, e.g. decode tokens). -> [L] (nan if
    no pair). Delegates to the cache simulator's overlap_ratio (one implementation).
    """

    t = expert_ids.shape[0]
    starts = np.zeros(t, dtype=bool)
    starts[np.asarray(request_offsets[:-1], dtype=np.int64)[np.asarray(request_offsets[:-1]) < t]] = True
    if rows is not None:
        prev_counted = np.r_[False, rows[:-1]]
        starts = (starts | ~prev_counted)[rows]
        expert_ids = expert_ids[rows]
    run_starts = np.flatnonzero(starts)
    if len(expert_ids) < 2 or len(run_starts) == len(expert_ids):
        return np.full(expert_ids.shape[1], np.nan)
    return overlap_ratio(expert_ids, run_starts)


@dataclass(frozen=True)
class LayerStats:
    """Per-layer arrays [L]; divergences in bits."""

    decoder_layer: list[int]
    entropy: list[float]  # activation entropy / log2(E): 1 = perfectly even
    hot10_share: list[float]  # share of routed slots taken by the hottest 10% of experts
    hot25_share: list[float]
    overlap: list[float]  # consecutive-token overlap, all pairs
    overlap_decode: list[float]  # decode-decode pairs only
    prefill_decode_jsd: list[float]
    domain_jsd: list[float]  # mean JSD between different domains' activation
    within_domain_jsd: list[float]  # mean JSD between two halves of the same domain

    def to_dict(self) -> dict:
        return {k: [None if isinstance(x, float) and np.isnan(x) else x for x in v] for k, v in asdict(self).items()}


def _entropy(act: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(act > 0, act * np.log2(act), 0.0).sum(-1)
    return h / np.log2(act.shape[-1])


def _hot_share(act: np.ndarray, frac: float) -> np.ndarray:
    n = max(1, int(np.ceil(frac * act.shape[-1])))
    return np.sort(act, axis=-1)[:, ::-1][:, :n].sum(-1)


def trace_stats(trace: ExpertTrace) -> LayerStats:
    """Summarise a trace per MoE layer (see LayerStats)."""
    ids, phase, offsets = trace["expert_ids"], trace["phase"], trace["request_offsets"]
    e, layers = trace.meta.num_experts, trace.meta.num_moe_layers
    overall = activation_matrix(ids, e)
    pre = activation_matrix(ids[phase == PREFILL], e)
    dec = activation_matrix(ids[phase == DECODE], e)
    pre_dec = js_divergence(pre, dec) if (phase == DECODE).any() and (phase == PREFILL).any() else np.full(layers, np.nan)
    cross, within = _domain_divergence(trace)
    return LayerStats(
        decoder_layer=list(trace.meta.moe_layer_indices),
        entropy=_entropy(overall).tolist(),
        hot10_share=_hot_share(overall, 0.10).tolist(),
        hot25_share=_hot_share(overall, 0.25).tolist(),
        overlap=consecutive_overlap(ids, offsets).tolist(),
        overlap_decode=consecutive_overlap(ids, offsets, phase == DECODE).tolist(),
        prefill_decode_jsd=np.asarray(pre_dec).tolist(),
        domain_jsd=cross.tolist(),
        within_domain_jsd=within.tolist(),
    )


def _domain_divergence(trace: ExpertTrace) -> tuple[np.ndarray, np.ndarray]:
    """Mean pairwise JSD of domains' token-weighted activation; and of each domain's two halves."""
    layers = trace.meta.num_moe_layers
    domains = trace.meta.domains or [None] * trace.num_requests
    labels = sorted({d for d in domains if d is not None})
    if len(labels) < 1:
        return np.full(layers, np.nan), np.full(layers, np.nan)
    ids, offsets, e = trace["expert_ids"], trace["request_offsets"], trace.meta.num_experts

    def act_of(requests: list[int]) -> np.ndarray:
        rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in requests])
        return activation_matrix(ids[rows], e)

    members = {d: [r for r, x in enumerate(domains) if x == d] for d in labels}
    acts = {d: act_of(rs) for d, rs in members.items()}
    cross = [js_divergence(acts[a], acts[b]) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    halves = [js_divergence(act_of(rs[0::2]), act_of(rs[1::2])) for rs in members.values() if len(rs) >= 2]
    nan = np.full(layers, np.nan)
    return (np.mean(cross, axis=0) if cross else nan), (np.mean(halves, axis=0) if halves else nan)
