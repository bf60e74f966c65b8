"""Fine-tune only the routers so consecutive tokens reuse experts (ReMoE, arXiv 2605.27081)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from moeserve.errors import MoeServeError
from moeserve.finetune.losses import (
    kl_to_reference,
    load_balance_loss,
    overlap_ratio_of,
    reuse_loss,
    reuse_targets,
)
from moeserve.models.adapter import MoELayer, require_moe_layers


@dataclass(frozen=True)
class RouterFinetuneConfig:
    steps: int = 200
    lr: float = 3e-3
    reuse_weight: float = 1.0
    kl_weight: float = 0.1
    lb_weight: float = 0.0  # the usual load-balancing loss, off by default as in the paper
    window: int = 1  # earlier tokens whose experts count as reusable
    decay: float = 0.5  # weight of an expert used w tokens ago: decay ** (w - 1)
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def router_parameters(layers: list[MoELayer]) -> list[tuple[str, nn.Parameter]]:
    """The trainable router parameters (weights, and GPT-OSS's bias), named by decoder layer."""
    params = [(f"layers.{layer.index}.router.{n}", p) for layer in layers for n, p in layer.router.named_parameters()]
    if not params:
        raise MoeServeError("this model's routers have no trainable weights: nothing to fine-tune")
    return params


def _normalised_scores(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """Router scores as a distribution over experts (sigmoid scores are renormalised)."""
    logits = logits.float()
    if layer.rule.scoring == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True)
    return torch.softmax(logits, dim=-1)


class _RouterTap:
    """Forward hooks keeping, per MoE layer, the router's input and its (logits, chosen ids) with grad."""

    def __init__(self, layers: list[MoELayer]):
        self.layers, self.seen, self.handles = layers, {}, []

    def __enter__(self):
        for pos, layer in enumerate(self.layers):
            def hook(module, args, output, pos=pos):
                self.seen[pos] = (args[0], output[0], output[2])

            self.handles.append(layer.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def train_router(
    model: nn.Module, data: Iterator[torch.Tensor], cfg: RouterFinetuneConfig,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train the routers of `model` in place; every other parameter stays frozen and unchanged.

    data yields token batches [B, S]. Loss = LM cross-entropy + reuse_weight * reuse + kl_weight *
    KL(original router || router) + lb_weight * load balance, averaged over MoE layers.
    Returns one dict per step (loss terms and the live overlap ratio).
    """
    if cfg.steps <= 0:
        raise MoeServeError("--steps must be positive")
    layers = require_moe_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for _, p in router_parameters(layers)]
    for p in params:
        p.requires_grad_(True)
    reference = [copy.deepcopy(layer.router).requires_grad_(False) for layer in layers]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.eval()  # no router jitter noise; autograd still runs
    history = []
    with _RouterTap(layers) as tap:
        for step in range(cfg.steps):
            ids = next(data).to(device)
            b, s = ids.shape
            out = model(input_ids=ids, labels=ids)
            reuse_terms, kl_terms, lb_terms, overlaps = [], [], [], []
            for pos, layer in enumerate(layers):
                x, logits, chosen = tap.seen[pos]
                probs = _normalised_scores(layer, logits).view(b, s, -1)
                chosen = chosen.detach().view(b, s, -1)
                with torch.no_grad():
                    ref = _normalised_scores(layer, reference[pos](x)[0]).view(b, s, -1)
                targets = reuse_targets(chosen, layer.num_experts, cfg.window, cfg.decay)
                reuse_terms.append(reuse_loss(probs, targets))
                kl_terms.append(kl_to_reference(ref, probs))
                lb_terms.append(load_balance_loss(probs, chosen))
                overlaps.append(overlap_ratio_of(chosen))
            reuse = torch.stack(reuse_terms).mean()
            kl = torch.stack(kl_terms).mean()
            lb = torch.stack(lb_terms).mean()
            loss = out.loss + cfg.reuse_weight * reuse + cfg.kl_weight * kl + cfg.lb_weight * lb
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            record = {"step": step + 1, "loss": loss.item(), "lm": out.loss.item(), "reuse_mass": 1 - reuse.item(),
                      "kl": kl.item(), "load_balance": lb.item(), "overlap": torch.stack(overlaps).mean().item()}
            history.append(record)
            if on_step:
                on_step(step + 1, record)
    for p in params:
        p.requires_grad_(False)
    return history
