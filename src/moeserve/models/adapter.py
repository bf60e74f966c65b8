"""The MoE structure of any transformers v5 MoE causal LM.

transformers v5 stores each MoE layer's routed experts as fused 3-D tensors behind the experts
interface (`@use_experts_implementation`): an experts module called as
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, next to a router
module returning `(logits, top_k_weights, top_k_index)`. This module finds those pieces in any model
and exposes per-expert weight views in the plain `nn.Linear` orientation, whatever the storage layout
(fused `gate_up_proj`, GPT-OSS's transposed and interleaved layout with biases, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2CLS
from transformers.integrations.moe import _default_apply_gate

from moeserve.errors import MoeServeError
from moeserve.models.expert_ffn import ExpertLayout, ExpertWeights, activation, expert_forward, split_gate_up
from moeserve.models.routing import RoutingRule, fit_rule

_BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k")
_PROBE_TOKENS = 64
_RULE_ATTR = "_moeserve_routing_rule"


@dataclass
class MoELayer:
    """One decoder layer's MoE block and its parts (modules are the model's own, not copies)."""

    index: int  # position among the decoder layers
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Module | None
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    layout: ExpertLayout
    rule: RoutingRule

    @property
    def path(self) -> str:
        return f"layers.{self.index}"

    def selection_bias(self) -> torch.Tensor | None:
        """The [E] bias added to the scores only to choose the experts (DeepSeek-V3's
        e_score_correction_bias, wherever the block keeps it), when the rule has one."""
        if self.rule.bias != "selection":
            return None
        return _selection_bias(self.block, self.router, self.experts, self.num_experts)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None and hasattr(decoder, "language_model"):
        layers = getattr(decoder.language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise MoeServeError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_experts(module: nn.Module) -> bool:
    return hasattr(module, "down_proj") and (hasattr(module, "gate_up_proj") or hasattr(module, "up_proj")) and (
        isinstance(module.down_proj, nn.Parameter)
    )


def _find_block(layer: nn.Module) -> nn.Module | None:
    """The child of a decoder layer holding an experts module (the usual names first, then any child, then
    the layer itself: Gemma 4 keeps its router and experts on the decoder layer)."""
    named = [getattr(layer, n, None) for n in _BLOCK_NAMES] + [c for _, c in layer.named_children()] + [layer]
    for block in named:
        if block is not None and _is_experts(getattr(block, "experts", nn.Identity())):
            return block
    return None


def _find_router(block: nn.Module, experts: nn.Module) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    return next((c for _, c in block.named_children() if c is not experts and hasattr(c, "top_k")), None)


def _top_k(block: nn.Module, router: nn.Module, config) -> int | None:
    for owner in (router, block):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int):
            return value
    return next((getattr(config, k) for k in _TOP_K_KEYS if isinstance(getattr(config, k, None), int)), None)


def _selection_bias(block: nn.Module, router: nn.Module, experts: nn.Module, width: int) -> torch.Tensor | None:
    """A [width] tensor named like a bias in the router or the block (not the router's linear bias, not in
    the experts or shared experts): the bias added to the scores to choose experts."""
    own_linear_bias = getattr(router, "bias", None)
    for owner in (router, block):
        for name, t in list(owner.named_buffers()) + list(owner.named_parameters()):
            if t is own_linear_bias or "experts." in name or name.startswith(_SHARED_NAMES) or "bias" not in name:
                continue
            if t.numel() == width and t.dim() <= 2 and t.is_floating_point():
                return t.reshape(width)
    return None


class _ProbeExperts(nn.Module):
    """Stands in for an experts module during a probe: records what the router chose, returns zeros."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self.seen = (top_k_index.detach(), top_k_weights.detach())
        return torch.zeros_like(hidden_states)


class _ProbeZeros(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def _probe_block(block: nn.Module, experts_name: str, router_name: str | None, hidden: int):
    """Run a float32 CPU copy of `block` (random weights; experts and shared experts replaced by stubs) on
    random inputs [T, H] -> (router output logits [T, E], ids [T, K], weights [T, K], the copy)."""
    saved = {n: getattr(block, n) for n in (experts_name, *_SHARED_NAMES) if isinstance(getattr(block, n, None), nn.Module)}
    try:
        for n in saved:
            setattr(block, n, _ProbeExperts() if n == experts_name else _ProbeZeros())
        clone = copy.deepcopy(block)
    finally:
        for n, m in saved.items():
            setattr(block, n, m)
    clone = clone.to_empty(device="cpu").float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in list(clone.named_parameters()) + list(clone.named_buffers()):
            if not t.is_floating_point():
                t.zero_()
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
            elif "bias" in name:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
    seen = {}
    router = getattr(clone, router_name) if router_name else None

    def keep_logits(module, args, output):
        seen.setdefault("logits", output[0] if isinstance(output, tuple) else output)

    handle = router.register_forward_hook(keep_logits)
    try:
        with torch.no_grad():
            clone(torch.randn((1, _PROBE_TOKENS, hidden), generator=g))
    finally:
        handle.remove()
    ids, weights = getattr(clone, experts_name).seen
    logits = seen["logits"]
    return logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, ids.shape[-1]), weights.reshape(ids.shape[0], -1), clone


def derive_rule(block: nn.Module, router: nn.Module, experts: nn.Module, config, num_experts: int,
                hidden: int) -> RoutingRule:
    """The routing rule of `block`, read from the model: its router run on probe inputs, and the rule that
    reproduces those choices (`routing.fit_rule`). A router no rule reproduces gives
    `RoutingRule(scoring="undetermined", known=False, note=why)`, refused by whatever needs the rule."""
    cls = type(router).__name__
    if "sparsemixer" in getattr(type(router).forward, "__code__", compile("", "", "exec")).co_names:
        return RoutingRule("sparsemixer", known=True)  # Phi-MoE's rule, named in its router's code
    experts_name = next(n for n, c in block.named_children() if c is experts)
    router_name = next((n for n, c in block.named_children() if c is router), None)
    try:
        logits, ids, weights, clone = _probe_block(block, experts_name, router_name, hidden)
    except Exception as exc:  # noqa: BLE001 - any failure means the rule cannot be read
        return RoutingRule("undetermined", known=False,
                           note=f"{cls} could not be run on probe inputs ({type(exc).__name__}: {exc})")
    if logits.shape[-1] != num_experts:
        return RoutingRule("undetermined", known=False,
                           note=f"{cls} scores {logits.shape[-1]} experts for {num_experts} routed experts")
    crouter = getattr(clone, router_name)
    bias = _selection_bias(clone, crouter, getattr(clone, experts_name), num_experts)
    linear_bias = getattr(crouter, "bias", None)
    groups = next((getattr(config, k) for k in ("n_group", "num_expert_group") if getattr(config, k, None)), None)
    rule = fit_rule(logits, ids, weights, selection_bias=bias, groups=groups,
                    topk_groups=getattr(config, "topk_group", None),
                    logit_bias=isinstance(linear_bias, torch.Tensor) and linear_bias.numel() == num_experts)
    if rule is None:
        return RoutingRule("undetermined", known=False,
                           note=f"no softmax/sigmoid top-k rule reproduces the choices of {cls}")
    return rule


def routing_rule_of(model: nn.Module, layer: MoELayer) -> RoutingRule:
    """The model's routing rule (probed once per model, kept on the model object)."""
    rule = getattr(model, _RULE_ATTR, None)
    if rule is None:
        rule = derive_rule(layer.block, layer.router, layer.experts, text_config(model), layer.num_experts,
                           layer.hidden_size)
        object.__setattr__(model, _RULE_ATTR, rule)
    return rule


def activation_name(experts: nn.Module, config) -> str:
    """The ACT2FN name of the experts' own activation (`act_fn`), found by its outputs on a probe: a config
    can name several (NemotronH: `hidden_act` absent, `mamba_hidden_act` silu, the experts' `mlp_hidden_act`
    relu2). The config's `hidden_act` (or silu) where the module has no `act_fn`."""
    default = str(getattr(config, "hidden_act", "silu"))
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is None:
        return default
    named = [str(v) for k, v in vars(config).items() if k.endswith("_act") and isinstance(v, str)]
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        want = act_fn(probe)
        for name in dict.fromkeys([default, *named, *ACT2CLS]):
            try:
                if torch.allclose(activation(name)(probe), want, atol=1e-6):
                    return name
            except (KeyError, TypeError, ValueError, RuntimeError):  # not an ACT2FN name, or needs arguments
                continue
    raise MoeServeError(f"{type(experts).__name__}: its activation {type(act_fn).__name__} is none of transformers' ACT2FN")


def _layout(experts: nn.Module, config) -> ExpertLayout:

    if getattr(experts, "has_post_expert_norm", False):
        raise MoeServeError(f"{type(experts).__name__}: experts with a post-expert norm are not supported yet")
    has_gate = bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")))
    custom_gate = getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate
    if custom_gate:
        if not (hasattr(experts, "alpha") and hasattr(experts, "limit")):
            raise MoeServeError(f"{type(experts).__name__} has a gating rule moeserve does not know")
        name, alpha, limit = "gptoss_swiglu", float(experts.alpha), float(experts.limit)
    else:
        name, alpha, limit = activation_name(experts, config), None, None
    return ExpertLayout(
        has_gate=has_gate,
        is_transposed=bool(getattr(experts, "is_transposed", False)),
        is_concatenated=bool(getattr(experts, "is_concatenated", True)),
        has_bias=bool(getattr(experts, "has_bias", False)),
        activation=name,
        swiglu_alpha=alpha,
        swiglu_limit=limit,
    )


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model`, in order. Dense layers are skipped; a dense model gives []."""
    config = text_config(model)
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        block = _find_block(layer)
        if block is None:
            continue
        experts = block.experts
        router = _find_router(block, experts)
        top_k = None if router is None else _top_k(block, router, config)
        if router is None or top_k is None:
            raise MoeServeError(f"layer {index}: MoE block {type(block).__name__} has no recognisable router")
        layout = _layout(experts, config)
        down = experts.down_proj
        hidden, inter = (down.shape[2], down.shape[1]) if layout.is_transposed else (down.shape[1], down.shape[2])
        shared = next((getattr(block, n) for n in _SHARED_NAMES if getattr(block, n, None) is not None), None)
        found.append(
            MoELayer(
                index=index,
                block=block,
                router=router,
                experts=experts,
                shared=shared,
                shared_gate=getattr(block, "shared_expert_gate", None),
                num_experts=int(down.shape[0]),
                top_k=int(top_k),
                hidden_size=int(hidden),
                intermediate_size=int(inter),
                layout=layout,
                rule=RoutingRule("undetermined", known=False),
            )
        )
    if found:
        rule = routing_rule_of(model, found[0])
        for layer in found:
            layer.rule = rule
    return found


def require_moe_layers(model: nn.Module, name: str = "model") -> list[MoELayer]:
    layers = moe_layers(model)
    if not layers:
        raise MoeServeError(f"{name} is a dense model (no MoE layers): moeserve needs a Mixture-of-Experts model")
    return layers


def expert_weights(layer: MoELayer, expert: int) -> ExpertWeights:
    """Views of expert `expert`'s weights in `nn.Linear` orientation."""
    ex, lay = layer.experts, layer.layout
    if not 0 <= expert < layer.num_experts:
        raise IndexError(f"expert {expert} out of range [0, {layer.num_experts})")

    def linear(param: torch.Tensor) -> torch.Tensor:  # one expert's slice as [out, in]
        w = param[expert]
        return w.t() if lay.is_transposed else w

    down = linear(ex.down_proj)
    down_bias = ex.down_proj_bias[expert] if lay.has_bias else None
    if lay.has_gate:
        gate, up = split_gate_up(linear(ex.gate_up_proj), lay.is_concatenated)
        gb, ub = (None, None)
        if lay.has_bias:
            gb, ub = split_gate_up(ex.gate_up_proj_bias[expert], lay.is_concatenated)
        return ExpertWeights(gate, up, down, gb, ub, down_bias)
    up_bias = ex.up_proj_bias[expert] if lay.has_bias else None
    return ExpertWeights(None, linear(ex.up_proj), down, None, up_bias, down_bias)


def routed_forward(
    layer: MoELayer, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    experts: list[int] | None = None,
) -> torch.Tensor:
    """Weighted sum of the routed experts' outputs, recomputed from per-expert weights.

    x: [T, H], top_k_index: [T, k] int, top_k_weights: [T, k] -> [T, H].
    `experts` restricts the sum to those expert ids (the others contribute 0): the serving engine
    splits a layer's work this way between local and remote experts.
    """
    out = torch.zeros_like(x)
    wanted = top_k_index.unique().tolist() if experts is None else experts
    for e in wanted:
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        y = expert_forward(x[token_idx], expert_weights(layer, e), layer.layout)
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
    return out


def shared_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor | None:
    """The always-on shared experts' contribution for x [T, H] (with Qwen2-MoE's sigmoid gate), or None."""
    if layer.shared is None:
        return None
    y = layer.shared(x)
    if layer.shared_gate is not None:
        y = torch.sigmoid(layer.shared_gate(x)) * y
    return y


def route(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the layer's own router on x [T, H] -> (logits [T, E], top_k_weights [T, k], top_k_index [T, k])."""
    logits, weights, index = layer.router(x)
    return logits, weights, index


def router_probabilities(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """Per-expert scores the router ranks by, [T, E] float32 (softmax or sigmoid of the logits, as the
    rule read from the router says; Phi-MoE's sparsemixer ranks by softmax). MoeServeError when the rule
    could not be read from the model."""
    logits = logits.float()
    if layer.rule.scoring == "undetermined":
        raise MoeServeError(f"the routing rule of this model could not be determined: {layer.rule.note}")
    if layer.rule.scoring == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)
