"""Synthetic routing for a model you cannot run here (`moeserve trace synth`): a trace of the model's
geometry whose per-layer skew, consecutive-token overlap and domain spread match a measured trace.

The generative model (docs/trace.md, "Synthetic traces"), per MoE layer l of the target model:

- popularity: a Zipf law over a random permutation of the E experts, w_e = rank_e^-s_l;
- domains: domain d's probabilities p_d ∝ w * exp(sigma_l * z_de - sigma_l^2 / 2), z ~ N(0, 1);
- a token draws K distinct experts from p_d (Gumbel top-K, i.e. successive sampling without
  replacement); the next token of the same request keeps each of its predecessor's experts with
  probability rho_l and fills the other slots the same way from the experts not kept.

s_l is set (bisection) so that the share of routed slots taken by the hottest 10% of experts
equals the measured layer's; sigma_l so that the mean pairwise Jensen-Shannon divergence between
domains, as it would be measured on this trace's token counts, equals the measured one; rho_l from
the measured consecutive-token overlap o: rho = (o - b) / (1 - b), b the overlap of two independent
draws. Layers are matched by relative depth. The generator (`synthesize_routing`) is a pure function
of arrays and a seed; `synth_trace` reads and writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.models.geometry import ModelGeometry, inspect_model
from moeserve.traces.format import PREFILL, ExpertTrace
from moeserve.traces.importer import routing_to_trace
from moeserve.traces.stats import js_divergence, trace_stats

GENERATOR = "moeserve.traces.synth/1"  # recorded in the trace; bump when the generative model changes
HOT_FRACTION = 0.10
CHUNK_ELEMENTS = 1 << 24  # at most this many Gumbel keys (requests x layers x experts) at once: 128 MiB


@dataclass(frozen=True)
class RoutingTargets:
    """Per target MoE layer [L]: hot-10% share, consecutive-token overlap (all pairs) and mean pairwise
    domain JSD in bits (nan where the measured trace has fewer than two domains)."""

    hot10: np.ndarray
    overlap: np.ndarray
    domain_jsd: np.ndarray


@dataclass(frozen=True)
class Calibration:
    """Per layer [L]: the generative model's fitted parameters (zipf_s, sigma, rho)."""

    zipf_s: np.ndarray
    sigma: np.ndarray
    rho: np.ndarray


def depth_map(source_layers: int, target_layers: int) -> np.ndarray:
    """Source layer for each target layer, matched by relative depth: [target_layers] int."""
    if target_layers == 1 or source_layers == 1:
        return np.zeros(target_layers, dtype=np.int64)
    return np.floor(np.arange(target_layers) * (source_layers - 1) / (target_layers - 1) + 0.5).astype(np.int64)


def hot_share(act: np.ndarray, frac: float = HOT_FRACTION) -> np.ndarray:
    """Share of the hottest ceil(frac * E) experts: act [..., E] (rows sum to 1) -> [...]."""
    n = max(1, int(np.ceil(frac * act.shape[-1])))
    return -np.sort(-act, axis=-1)[..., :n].sum(-1)


def inclusion(p: np.ndarray, k: int, steps: int = 20) -> np.ndarray:
    """Approximate probability that each expert is among K draws without replacement from p:
    pi = 1 - exp(-c p) with c such that sum(pi) = K (Poisson approximation of successive sampling).
    p: [..., E] -> [..., E]. c by Newton's method from c = K, which stays below the root (the sum is
    concave in c) and so converges monotonically."""
    c = np.full(p.shape[:-1] + (1,), float(k))
    for _ in range(steps):
        q = np.exp(-c * p)
        gap = k - (1 - q).sum(-1, keepdims=True)
        c = c + np.maximum(gap, 0) / np.maximum((p * q).sum(-1, keepdims=True), 1e-300)
    return 1 - np.exp(-c * p)


def _domain_probs(perm: np.ndarray, z: np.ndarray, s: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """perm: [L, E] popularity rank of each expert; z: [L, D, E]; s, sigma: [L] -> [L, D + 1, E]
    (row 0: requests without a domain)."""
    logw = -np.asarray(s, float)[:, None] * np.log1p(perm)  # [L, E]
    sig = np.asarray(sigma, float)[:, None, None]
    logits = logw[:, None] + np.concatenate([np.zeros_like(z[:, :1]), sig * z - sig**2 / 2], axis=1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _bisect(f, target: np.ndarray, lo: float, hi: float, steps: int = 24) -> np.ndarray:
    """Per layer, x in [lo, hi] with f(x)[l] ~= target[l] for f increasing in x (clipped at the ends).
    f: [L] -> [L]; target: [L] (nan: lo)."""
    target = np.where(np.isfinite(target), target, -np.inf)
    a, b = np.full(len(target), lo), np.full(len(target), hi)
    for _ in range(steps):
        mid = (a + b) / 2
        below = f(mid) < target
        a, b = np.where(below, mid, a), np.where(below, b, mid)
    x = (a + b) / 2
    x = np.where(f(np.full(len(target), lo)) >= target, lo, x)
    return np.where(f(np.full(len(target), hi)) <= target, hi, x)


def _pairwise_jsd(acts: np.ndarray) -> np.ndarray:
    """Mean JSD over pairs of rows: acts [L, D, E] (D >= 2) -> [L]."""
    i, j = np.triu_indices(acts.shape[1], 1)
    return js_divergence(acts[:, i], acts[:, j]).mean(-1)


def _calibrate(t: RoutingTargets, perm: np.ndarray, z: np.ndarray, tokens_per_domain: np.ndarray, k: int,
               noise: np.ndarray) -> Calibration:
    """The generative model's parameters per layer. perm: [L, E]; z: [L, D, E]; tokens_per_domain: [D + 1]
    (index 0: requests without a domain); noise: [L, D + 1, E] standard normal."""
    layers = perm.shape[0]
    share = tokens_per_domain / max(tokens_per_domain.sum(), 1)
    labelled = np.flatnonzero(tokens_per_domain[1:] > 0) + 1
    want_jsd = np.isfinite(t.domain_jsd) & (len(labelled) >= 2)
    s, sigma, rho = np.ones(layers), np.zeros(layers), np.zeros(layers)

    def overall(x: np.ndarray) -> np.ndarray:
        return (share[None, :, None] * inclusion(_domain_probs(perm, z, x, sigma), k) / k).sum(1)

    for _ in range(3 if want_jsd.any() else 1):
        s = _bisect(lambda x: hot_share(overall(x)), t.hot10, 0.0, 6.0)
        pi = inclusion(_domain_probs(perm, z, s, sigma), k)
        base = (share[None] * (pi**2).sum(-1) / k).sum(-1)  # overlap of two independent tokens [L]
        rho = np.where(np.isfinite(t.overlap), np.clip((t.overlap - base) / np.maximum(1 - base, 1e-9), 0, 1), 0.0)
        if not want_jsd.any():
            break
        # the JSD a trace with these token counts would show; correlated tokens (kept experts) count less
        n_eff = np.maximum(tokens_per_domain[None, labelled] * k * ((1 - rho) / (1 + rho))[:, None], 1.0)[..., None]

        def measured_jsd(x: np.ndarray, s=s, n_eff=n_eff) -> np.ndarray:
            f = (inclusion(_domain_probs(perm, z, s, x), k) / k)[:, labelled]
            return _pairwise_jsd(_noisy_counts(f, n_eff, noise[:, labelled]))

        sigma = np.where(want_jsd, _bisect(measured_jsd, np.where(want_jsd, t.domain_jsd, np.nan), 0.0, 6.0), 0.0)
    return Calibration(s, sigma, rho)


def _noisy_counts(f: np.ndarray, n: float, u: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for multinomial(n, f) counts: n f plus Gaussian noise of the binomial
    variance with fixed standard-normal draws u [E] (so the noise does not jump as f changes)."""
    return np.maximum(n * f + u * np.sqrt(n * f * (1 - f)), 0.0)


def synthesize_routing(targets: RoutingTargets, request_offsets: np.ndarray, request_domain: np.ndarray,
                       num_experts: int, top_k: int, seed: int = 0) -> tuple[np.ndarray, Calibration]:
    """Routing of a target geometry with the targets' statistics.

    targets: per target layer [L]; request_offsets: [R + 1] (tokens of request r are
    offsets[r]:offsets[r+1], in order); request_domain: [R] int, -1 for none, else 0..D-1;
    -> (expert ids [T, L, K] int64, the fitted Calibration). Deterministic for a seed.
    """
    layers, e, k = len(targets.hot10), int(num_experts), int(top_k)
    if not 1 <= k <= e:
        raise MoeServeError(f"top-k must lie in [1, {e}], got {k}")
    offsets = np.asarray(request_offsets, dtype=np.int64)
    domain = np.asarray(request_domain, dtype=np.int64) + 1  # 0: no domain
    lengths = np.diff(offsets)
    n_domains = int(domain.max()) if len(domain) else 0
    tokens_per_domain = np.bincount(domain, weights=lengths, minlength=n_domains + 1).astype(float)
    t_total = int(offsets[-1])
    ids = np.zeros((t_total, layers, k), dtype=np.int64)
    rngs = [np.random.default_rng([seed, layer]) for layer in range(layers)]
    perm = np.stack([r.permutation(e) for r in rngs])
    z = np.stack([r.standard_normal((n_domains, e)) for r in rngs])
    noise = np.stack([r.standard_normal((n_domains + 1, e)) for r in rngs])
    cal = _calibrate(targets, perm, z, tokens_per_domain, k, noise)
    logp_all = np.log(np.maximum(_domain_probs(perm, z, cal.zipf_s, cal.sigma), 1e-300))  # [L, D + 1, E]
    rng = np.random.default_rng([seed, layers, e, k])
    layer_idx = np.arange(layers)[None, :, None]
    chunk = max(1, CHUNK_ELEMENTS // max(layers * e, 1))  # requests generated together (bounds the memory)
    for start in range(0, len(lengths), chunk):
        reqs = np.arange(start, min(start + chunk, len(lengths)))
        prev = np.zeros((len(reqs), layers, k), dtype=np.int64)
        for j in range(int(lengths[reqs].max())):  # token position j of every request of the chunk at once
            live = np.flatnonzero(lengths[reqs] > j)
            keys = logp_all[:, domain[reqs[live]]].transpose(1, 0, 2) + rng.gumbel(size=(len(live), layers, e))
            if j > 0:
                keep = rng.random((len(live), layers, k)) < cal.rho[None, :, None]
                r_idx = np.broadcast_to(np.arange(len(live))[:, None, None], keep.shape)
                l_idx = np.broadcast_to(layer_idx, keep.shape)
                keys[r_idx[keep], l_idx[keep], prev[live][keep]] = np.inf  # kept experts are chosen first
            chosen = np.argpartition(-keys, k - 1, axis=2)[..., :k]
            ids[offsets[reqs[live]] + j] = chosen
            prev[live] = chosen
    return ids, cal


def targets_from_trace(trace: ExpertTrace, target_layers: int) -> RoutingTargets:
    """The measured trace's per-layer hot-10% share, overlap and domain JSD, mapped to target_layers
    by relative depth."""
    stats = trace_stats(trace)
    pick = depth_map(trace.meta.num_moe_layers, target_layers)

    def arr(values) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=float)[pick]

    return RoutingTargets(arr(stats.hot10_share), arr(stats.overlap), arr(stats.domain_jsd))


def synth_trace(model: str, like: str | Path, out: str | Path, *, requests: int | None = None,
                seed: int = 0) -> tuple[ExpertTrace, dict]:
    """Write a synthetic trace of `model`'s geometry like the measured trace `like` -> (trace, summary:
    targets, achieved statistics, calibration). Requests (lengths, prefill/decode split, domains) are
    the measured trace's, or `requests` of them drawn with replacement (seeded)."""
    g: ModelGeometry = inspect_model(model)
    src = ExpertTrace.open(like)
    if src.num_requests == 0 or src.num_tokens == 0:
        raise MoeServeError(f"trace {like} is empty")
    if src.meta.generation.get("synthetic"):
        raise MoeServeError(f"{like} is itself synthetic: give a measured trace (`moeserve profile` or `trace import`)")
    off, phase = src["request_offsets"], src["phase"]
    names = sorted({d for d in src.meta.domains if d})
    dom = np.array([names.index(d) if d else -1 for d in (src.meta.domains or [None] * src.num_requests)])
    pick = np.arange(src.num_requests) if requests is None else \
        np.random.default_rng([seed, 1 << 20]).integers(src.num_requests, size=requests)
    lengths = np.diff(off)[pick]
    prompt_lengths = np.array([int((phase[off[r]:off[r + 1]] == PREFILL).sum()) for r in pick])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    targets = targets_from_trace(src, g.num_moe_layers)
    ids, cal = synthesize_routing(targets, offsets, dom[pick], g.num_experts, g.top_k, seed)
    trace = routing_to_trace(ids, offsets, g.num_experts, prompt_lengths=np.maximum(prompt_lengths, 1),
                             moe_layer_indices=list(g.moe_layers), geometry=g.to_dict(),
                             domains=[names[d] if d >= 0 else None for d in dom[pick]],
                             source=f"synthetic, like {like}")
    trace.meta.model = str(model)
    trace.meta.generation = {"synthetic": True, "generator": GENERATOR, "seed": seed, "like": str(like),
                             "like_model": src.meta.model, "like_source": src.meta.source,
                             "like_requests": src.num_requests, "layer_map": depth_map(
                                 src.meta.num_moe_layers, g.num_moe_layers).tolist()}
    trace.save(out)
    got = trace_stats(trace)
    summary = {"trace": str(out), "model": str(model), "like": str(like), "requests": trace.num_requests,
               "tokens": trace.num_tokens, "layers": g.num_moe_layers, "experts": g.num_experts, "top_k": g.top_k,
               "target": {k: getattr(targets, k).tolist() for k in ("hot10", "overlap", "domain_jsd")},
               "achieved": {"hot10": got.hot10_share, "overlap": got.overlap, "domain_jsd": got.domain_jsd},
               "calibration": {"zipf_s": cal.zipf_s.tolist(), "sigma": cal.sigma.tolist(), "rho": cal.rho.tolist()}}
    summary["notes"] = unmet_targets(targets, got, g.num_experts, g.top_k)
    return trace, summary


def unmet_targets(targets: RoutingTargets, got, experts: int, top_k: int, tolerance: float = 0.05) -> list[str]:
    """Why a synthetic trace misses a target by more than `tolerance` in some layers (got: LayerStats)."""
    notes = []
    for what, want, have in (("hot-10% share", targets.hot10, got.hot10_share),
                             ("consecutive-token overlap", targets.overlap, got.overlap),
                             ("domain JSD", targets.domain_jsd, got.domain_jsd)):
        have = np.array([np.nan if v is None else v for v in have], float)
        off = np.flatnonzero(np.abs(have - want) > tolerance)
        if len(off):
            notes.append(f"{what}: {len(off)} of {len(want)} layers miss the measured figure by more than "
                         f"{tolerance} (e.g. layer {off[0]}: {want[off[0]]:.3f} measured, {have[off[0]]:.3f} here)"
                         + (f"; with {experts} experts and top-{top_k} two independent tokens already share more"
                            if what.startswith("consecutive") and have[off[0]] > want[off[0]] else ""))
    return notes


def synthetic_note(trace: ExpertTrace) -> str | None:
    """A plan note for a synthetic trace (None for a measured one)."""
    gen = trace.meta.generation or {}
    if not gen.get("synthetic"):
        return None
    return (f"the trace is synthetic ({gen.get('generator')}, seed {gen.get('seed')}): routing generated to match "
            f"the statistics of {gen.get('like')}" + (f" ({gen['like_model']})" if gen.get("like_model") else "")
            + "; predicted costs hold only as far as "
            "the real model routes like that trace")


SHAPE_FIELDS = ("num_moe_layers", "num_experts", "top_k", "hidden_size", "expert_intermediate_size")


def trace_geometry(trace: ExpertTrace, model: str | None = None) -> tuple[ModelGeometry, list[str]]:
    """The geometry a plan of `trace` uses, and notes on the trace: the trace's own geometry, or that of
    `model` (a card or a config-only directory), whose shape the trace must have."""
    notes = [n for n in [synthetic_note(trace)] if n]
    own = None if trace.meta.geometry is None else ModelGeometry.from_dict(trace.meta.geometry)
    if model is None:
        if own is None:
            raise MoeServeError("the trace has no model geometry: import it with --model, or plan with --model")
        return own, notes
    g = inspect_model(model)
    have = {"num_moe_layers": trace.meta.num_moe_layers, "num_experts": trace.meta.num_experts,
            "top_k": trace.meta.top_k}
    if own is not None:
        have |= {k: getattr(own, k) for k in ("hidden_size", "expert_intermediate_size")}
    wrong = [f"{k} {v} (model: {getattr(g, k)})" for k, v in have.items() if v != getattr(g, k)]
    if wrong:
        raise MoeServeError(f"the trace does not fit {model}: {', '.join(wrong)}; make one for it with "
                            f"`moeserve trace synth --model {model} --like TRACE`")
    return g, notes
