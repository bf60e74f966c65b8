"""Routing rules of the MoE families: how a router turns logits into top-k expert ids and weights.

Read from the model, not from a table: `models.adapter` runs a MoE block's own router on probe inputs
and `fit_rule` finds the rule (scoring, bias, groups, renormalisation, scaling) that reproduces its
choices; a router no rule reproduces is refused. The rule describes; the model's router decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moeserve.errors import MoeServeError


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
    known: True when the rule was checked against the model's own router on probe inputs.
    """

    scoring: str = "softmax"
    renormalize: bool = False
    bias: str = "none"
    groups: int | None = None
    topk_groups: int | None = None
    group_score: str | None = None
    scaling: float = 1.0
    known: bool = True
    note: str = ""  # why the rule could not be read (scoring "undetermined")

    def describe(self) -> str:
        if self.scoring == "undetermined":
            return f"undetermined: {self.note}" if self.note else "undetermined"
        parts = [self.scoring]
        if self.renormalize:
            parts.append("renormalised top-k")
        if self.bias != "none":
            parts.append(f"{self.bias} bias")
        if self.groups:
            parts.append(f"groups {self.topk_groups}/{self.groups} by {self.group_score}")
        if self.scaling != 1.0:
            parts.append(f"x{self.scaling:g}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def _candidates(num_experts: int, has_selection_bias: bool, groups: int | None, topk_groups: int | None):
    """Rules a router of this structure could follow, simplest first (all tried against its choices)."""
    biases = ("selection", "none") if has_selection_bias else ("none",)
    group_options = [(None, None, None)]
    if groups and groups > 1 and topk_groups and num_experts % groups == 0:
        group_options = [(groups, topk_groups, "top2_sum"), (groups, topk_groups, "max"), (None, None, None)]
    for bias in biases:
        for g, tg, gs in group_options:
            for scoring in ("softmax", "sigmoid"):
                for renormalize in (False, True):
                    yield RoutingRule(scoring, renormalize=renormalize, bias=bias, groups=g, topk_groups=tg,
                                      group_score=gs)


def fit_rule(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, *, selection_bias=None,
             groups: int | None = None, topk_groups: int | None = None, logit_bias: bool = False,
             atol: float = 1e-4) -> RoutingRule | None:
    """The rule that reproduces a router's choices on probe inputs, or None.

    logits [T, E] as the router module returned them; ids [T, K] and weights [T, K] as the experts module
    received them. Each candidate (softmax or sigmoid scores, selection bias or not, DeepSeek's group-limited
    routing or not, renormalised or not) is run by `select_experts`; the first whose expert sets equal the
    router's on every row and whose weights are the router's times one constant (the scaling factor, fitted
    here) is returned, with `known=True`.
    """
    logits, weights = logits.float(), weights.float()
    want = ids.sort(dim=-1).values
    for rule in _candidates(logits.shape[-1], selection_bias is not None, groups, topk_groups):
        try:
            w, e = select_experts(logits, rule, ids.shape[-1], selection_bias=selection_bias)
        except RuntimeError:  # e.g. too few experts left in the kept groups
            continue
        if not torch.equal(e.sort(dim=-1).values, want):
            continue
        w = w.gather(1, e.argsort(dim=-1))  # both in ascending expert order
        got = weights.gather(1, ids.argsort(dim=-1))
        scale = float((got * w).sum() / (w * w).sum().clamp_min(1e-30))
        if torch.allclose(got, w * scale, atol=atol, rtol=1e-3):
            scale = 1.0 if abs(scale - 1.0) < 1e-4 else float(f"{scale:.6g}")
            return RoutingRule(rule.scoring, rule.renormalize, "logit" if logit_bias and rule.bias == "none"
                               else rule.bias, rule.groups, rule.topk_groups, rule.group_score, scale, True)
    return None


def select_experts(logits, rule: RoutingRule, top_k: int, selection_bias=None):
    """Apply `rule` to router logits: [T, E] -> (weights [T, K] float32, ids [T, K] int64).

    An independent implementation of each family's rule (the model's router module is the reference;
    tests check they agree). `selection_bias` [E] is DeepSeek-V3's e_score_correction_bias. The
    logits already include a "logit" bias (GPT-OSS adds it inside its linear layer).
    """

    logits = logits.float()
    if rule.scoring == "undetermined":
        raise MoeServeError(f"the routing rule of this model could not be determined: {rule.note}")
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
