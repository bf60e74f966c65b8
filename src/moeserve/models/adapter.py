"""The MoE structure of any transformers v5 MoE causal LM.

transformers v5 stores each MoE layer's routed experts as fused 3-D tensors behind the experts
interface (`@use_experts_implementation`): an experts module called as
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, next to a router
module returning `(logits, top_k_weights, top_k_index)`. This module finds those pieces in any model
and exposes per-expert weight views in the plain `nn.Linear` orientation, whatever the storage layout
(fused `gate_up_proj`, GPT-OSS's transposed and interleaved layout with biases, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.errors import MoeServeError
from moeserve.models.routing import RoutingRule, routing_rule

_BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts")


@dataclass(frozen=True)
class ExpertLayout:
    """How an experts module stores its fused weights, and the expert's activation.

    activation: a transformers ACT2FN name for gated (GLU) or plain experts, or "gptoss_swiglu"
        (GPT-OSS: clamped gate/up, gate * sigmoid(alpha * gate) * (up + 1)).
    """

    has_gate: bool
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    activation: str
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights, `nn.Linear` orientation (views into the fused tensors where possible).

    gate: [I, H] or None (ungated experts), up: [I, H], down: [H, I]; biases [I], [I], [H] or None.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


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
    for name in _BLOCK_NAMES:
        block = getattr(layer, name, None)
        if block is not None and _is_experts(getattr(block, "experts", nn.Identity())):
            return block
    return None


def _layout(experts: nn.Module, config) -> ExpertLayout:
    from transformers.integrations.moe import _default_apply_gate

    if getattr(experts, "has_post_expert_norm", False):
        raise MoeServeError(f"{type(experts).__name__}: experts with a post-expert norm are not supported yet")
    has_gate = bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")))
    custom_gate = getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate
    if custom_gate:
        if not (hasattr(experts, "alpha") and hasattr(experts, "limit")):
            raise MoeServeError(f"{type(experts).__name__} has a gating rule moeserve does not know")
        activation, alpha, limit = "gptoss_swiglu", float(experts.alpha), float(experts.limit)
    else:
        activation, alpha, limit = str(getattr(config, "hidden_act", "silu")), None, None
    return ExpertLayout(
        has_gate=has_gate,
        is_transposed=bool(getattr(experts, "is_transposed", False)),
        is_concatenated=bool(getattr(experts, "is_concatenated", True)),
        has_bias=bool(getattr(experts, "has_bias", False)),
        activation=activation,
        swiglu_alpha=alpha,
        swiglu_limit=limit,
    )


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model`, in order. Dense layers are skipped; a dense model gives []."""
    config = text_config(model)
    rule = routing_rule(config)
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        block = _find_block(layer)
        if block is None:
            continue
        experts = block.experts
        router = next((getattr(block, n) for n in _ROUTER_NAMES if hasattr(block, n)), None)
        if router is None or not hasattr(router, "top_k"):
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
                top_k=int(router.top_k),
                hidden_size=int(hidden),
                intermediate_size=int(inter),
                layout=layout,
                rule=rule,
            )
        )
    return found


def require_moe_layers(model: nn.Module, name: str = "model") -> list[MoELayer]:
    layers = moe_layers(model)
    if not layers:
        raise MoeServeError(f"{name} is a dense model (no MoE layers): moeserve needs a Mixture-of-Experts model")
    return layers


def split_gate_up(t: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[2I, ...] -> ([I, ...], [I, ...]): halves, or even/odd rows for interleaved layouts."""
    if concatenated:
        half = t.shape[0] // 2
        return t[:half], t[half:]
    return t[0::2], t[1::2]


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


def expert_forward(x: torch.Tensor, w: ExpertWeights, layout: ExpertLayout) -> torch.Tensor:
    """One expert's FFN: x [T, H] -> [T, H]. Pure: depends only on its arguments."""
    from transformers.activations import ACT2FN

    if layout.activation == "gptoss_swiglu":
        gate = F.linear(x, w.gate, w.gate_bias).clamp(max=layout.swiglu_limit)
        up = F.linear(x, w.up, w.up_bias).clamp(min=-layout.swiglu_limit, max=layout.swiglu_limit)
        h = (up + 1) * gate * torch.sigmoid(gate * layout.swiglu_alpha)
    elif w.gate is not None:
        h = ACT2FN[layout.activation](F.linear(x, w.gate, w.gate_bias)) * F.linear(x, w.up, w.up_bias)
    else:
        h = ACT2FN[layout.activation](F.linear(x, w.up, w.up_bias))
    return F.linear(h, w.down, w.down_bias)


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
    """Per-expert scores the rule ranks by, [T, E] float32 (softmax or sigmoid of the logits)."""
    logits = logits.float()
    if layer.rule.scoring == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)
