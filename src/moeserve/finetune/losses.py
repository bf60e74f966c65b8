"""Router fine-tuning losses (ReMoE, Zhu et al., arXiv 2605.27081, Sec. 3).

All take per-layer router distributions over experts for consecutive tokens of sequences:
probs: [B, S, E] (rows sum to 1), chosen: [B, S, K] expert ids actually selected (no gradient).
"""

from __future__ import annotations

import torch


def reuse_targets(chosen: torch.Tensor, num_experts: int, window: int = 1, decay: float = 0.5) -> torch.Tensor:
    """For each token, how strongly each expert counts as "recently used": [B, S, K] -> [B, S, E].

    Expert e gets decay**(w-1) if it was chosen w tokens ago (the most recent use wins), 0 if it
    was not chosen in the last `window` tokens. Position 0 of each sequence has no history (all 0).
    """
    b, s, _ = chosen.shape
    onehot = torch.zeros(b, s, num_experts, device=chosen.device)
    onehot.scatter_(2, chosen.long(), 1.0)
    target = torch.zeros_like(onehot)
    for w in range(window, 0, -1):  # nearest last so its larger weight overwrites
        shifted = torch.zeros_like(onehot)
        shifted[:, w:] = onehot[:, :-w] * decay ** (w - 1)
        target = torch.maximum(target, shifted)
    return target


def reuse_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - mean probability mass the router puts on recently used experts (positions with history only).

    probs, targets: [B, S, E] -> scalar. 0 when every token puts all its mass on experts it reused.
    """
    mass = (probs * targets).sum(-1)[:, 1:]
    return 1.0 - mass.mean()


def kl_to_reference(ref_probs: torch.Tensor, probs: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """KL(ref || new) per token, averaged: [B, S, E] x2 -> scalar. Keeps the router near the original."""
    ref = ref_probs.clamp_min(eps)
    return (ref * (ref.log() - probs.clamp_min(eps).log())).sum(-1).mean()


def load_balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e (1 when perfectly balanced). Off by default."""
    e = probs.shape[-1]
    counts = torch.zeros(e, device=probs.device).index_add_(
        0, chosen.reshape(-1).long(), torch.ones(chosen.numel(), device=probs.device))
    f = counts / counts.sum()
    return e * (f * probs.reshape(-1, e).mean(0)).sum()


def overlap_ratio_of(chosen: torch.Tensor) -> torch.Tensor:
    """|E_t ∩ E_{t-1}| / K averaged over consecutive pairs: [B, S, K] -> scalar (a live training readout)."""
    cur, prev = chosen[:, 1:, :, None], chosen[:, :-1, None, :]
    return (cur == prev).any(-1).float().mean()
