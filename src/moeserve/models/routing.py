"""Routing rules of the MoE families: how a router turns logits into top-k expert ids and weights.

One table, keyed by `config.model_type`; it describes the rule, it does not run it (the model's own
router module does that, and tests check the two agree).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RoutingRule:
    """How top-k experts and their weights are chosen.

    scoring: "softmax" (over all experts), "sigmoid" (per expert), or "sparsemixer" (Phi-MoE's top-2 rule).
    renormalize: the top-k weights are divided by their sum (softmax over the top-k logits is the same).
    bias: "none", "logit" (a learned bias added to the logits, GPT-OSS) or "selection" (added only to choose
        the experts, not to weight them: DeepSeek-V3's e_score_correction_bias).
    groups / topk_groups / group_score: group-limited routing (DeepSeek): experts are split into `groups`
        groups, the best `topk_groups` groups are kept, scored by "max" or "top2_sum" of their experts.
    scaling: a constant the top-k weights are multiplied by (routed_scaling_factor).
    known: False when the family is not in moeserve's table and the rule was inferred from the config.
    """

    scoring: str = "softmax"
    renormalize: bool = False
    bias: str = "none"
    groups: int | None = None
    topk_groups: int | None = None
    group_score: str | None = None
    scaling: float = 1.0
    known: bool = True

    def describe(self) -> str:
        parts = [self.scoring]
        if self.renormalize:
            parts.append("renormalised top-k")
        if self.bias != "none":
            parts.append(f"{self.bias} bias")
        if self.groups:
            parts.append(f"groups {self.topk_groups}/{self.groups} by {self.group_score}")
        if self.scaling != 1.0:
            parts.append(f"x{self.scaling:g}")
        if not self.known:
            parts.append("(inferred)")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def routing_rule(config) -> RoutingRule:
    """The routing rule of a transformers v5 MoE config (text config for multimodal models)."""
    mt = config.model_type
    norm = bool(getattr(config, "norm_topk_prob", False))
    if mt in ("mixtral", "granitemoe", "granitemoeshared", "granitemoehybrid"):
        return RoutingRule("softmax", renormalize=True)
    if mt == "gpt_oss":
        return RoutingRule("softmax", renormalize=True, bias="logit")
    if mt in ("qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next", "qwen3_5_moe"):
        return RoutingRule("softmax", renormalize=norm)
    if mt == "phimoe":
        return RoutingRule("sparsemixer")
    if mt == "deepseek_v2":
        grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        return RoutingRule(
            "softmax",
            groups=config.n_group if grouped else None,
            topk_groups=config.topk_group if grouped else None,
            group_score="max" if grouped else None,
            scaling=float(config.routed_scaling_factor),
        )
    if mt in ("deepseek_v3", "glm4_moe"):
        groups = getattr(config, "n_group", None) or 1
        return RoutingRule(
            "sigmoid",
            renormalize=norm,
            bias="selection",
            groups=groups if groups > 1 else None,
            topk_groups=getattr(config, "topk_group", None) if groups > 1 else None,
            group_score="top2_sum" if groups > 1 else None,
            scaling=float(getattr(config, "routed_scaling_factor", 1.0)),
        )
    return RoutingRule("softmax", renormalize=norm, known=False)


def select_experts(logits, rule: RoutingRule, top_k: int, selection_bias=None):
    """Apply `rule` to router logits: [T, E] -> (weights [T, K] float32, ids [T, K] int64).

    An independent implementation of each family's rule (the model's router module is the reference;
    tests check they agree). `selection_bias` [E] is DeepSeek-V3's e_score_correction_bias. The
    logits already include a "logit" bias (GPT-OSS adds it inside its linear layer).
    """
    import torch

    logits = logits.float()
    if rule.scoring == "sparsemixer":
        raise NotImplementedError("Phi-MoE's sparsemixer is only run by the model's own router")
    scores = torch.sigmoid(logits) if rule.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores + selection_bias.float() if rule.bias == "selection" and selection_bias is not None else scores
    if rule.groups:
        t, e = choice.shape
        grouped = choice.view(t, rule.groups, e // rule.groups)
        if rule.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(rule.topk_groups, dim=-1).indices, True)
        mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
        fill = float("-inf") if rule.scoring == "sigmoid" else 0.0
        choice = choice.masked_fill(~mask, fill)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if rule.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if rule.scoring == "sigmoid" else 0.0))
    return weights * rule.scaling, ids
