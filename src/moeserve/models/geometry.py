"""ModelGeometry: the one description of a model's MoE shape and sizes every other part reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moeserve.errors import MoeServeError
from moeserve.models.adapter import ExpertLayout, expert_weights, moe_layers, text_config
from moeserve.models.cards import is_card_name, load_card
from moeserve.models.loading import load_config
from moeserve.models.routing import RoutingRule


@dataclass(frozen=True)
class ModelGeometry:
    """Shape and byte sizes of a MoE causal LM (bytes at `dtype`, the checkpoint's dtype).

    The routed experts are what moeserve moves between GPU, CPU and remote functions; everything else
    (embeddings, attention, norms, routers, shared experts, LM head) is the "non-expert" part.
    """

    family: str
    architecture: str
    dtype: str
    num_layers: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    shared_experts: int  # always-on experts per MoE layer (0 if none)
    shared_intermediate_size: int
    vocab_size: int
    routing: RoutingRule
    expert_layout: ExpertLayout
    total_params: int
    params_per_expert: int
    expert_params: int  # all routed experts of all layers
    non_expert_params: int
    bytes_per_param: float
    expert_bytes: int  # one routed expert
    all_expert_bytes: int
    non_expert_bytes: int
    kv_bytes_per_token: int  # what the HF cache stores per token, all layers
    kv_note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_moe_layers"] = self.num_moe_layers
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelGeometry:
        d = dict(d)
        d.pop("num_moe_layers", None)
        d["routing"] = RoutingRule(**d["routing"])
        d["expert_layout"] = ExpertLayout(**d["expert_layout"])
        d["moe_layers"] = tuple(d["moe_layers"])
        d["dense_layers"] = tuple(d["dense_layers"])
        return cls(**d)


def _dtype_of(config) -> torch.dtype:
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, saved) if isinstance(saved, str) else saved


def _kv_bytes_per_token(config, num_layers: int, nbytes: float) -> tuple[int, str]:
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):  # MLA (DeepSeek): transformers v5 caches the compressed latent
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        full = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        return int(latent * num_layers * nbytes), f"MLA latent cache ({full / latent:.1f}x smaller than per-head K/V)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    note = "sliding-window layers stop growing past the window" if getattr(config, "sliding_window", None) else ""
    types = list(getattr(config, "layer_types", None) or [])[:num_layers]
    if len(types) == num_layers and any(t.endswith("attention") and "linear" not in t for t in types):
        attention = [t for t in types if t.endswith("attention") and "linear" not in t]
        if len(attention) < num_layers:  # hybrid (e.g. Qwen3-Next): linear-attention layers keep a fixed state
            note = (f"{len(attention)} of {num_layers} layers cache K/V; the other {num_layers - len(attention)} "
                    "keep a fixed-size recurrent state")
            num_layers = len(attention)
    return int(2 * kv_heads * head_dim * num_layers * nbytes), note


def geometry_of(model: nn.Module, dtype: torch.dtype | None = None) -> ModelGeometry:
    """Geometry of a model (real or on the meta device); bytes at `dtype` (default: the config's)."""
    config = text_config(model)
    layers = moe_layers(model)
    if not layers:
        raise MoeServeError(
            f"{config.model_type} model is a dense model (no MoE layers): moeserve needs a Mixture-of-Experts model"
        )
    first = layers[0]
    for layer in layers[1:]:
        if (layer.num_experts, layer.top_k, layer.intermediate_size) != (
            first.num_experts, first.top_k, first.intermediate_size
        ):
            raise MoeServeError(f"layer {layer.index} has a different expert shape: mixed MoE layers are not supported")
    dtype = dtype or _dtype_of(config)
    nbytes = torch.tensor([], dtype=dtype).element_size()
    params_per_expert = sum(t.numel() for t in expert_weights(first, 0).tensors().values())
    expert_params = params_per_expert * first.num_experts * len(layers)
    total = sum(p.numel() for p in model.parameters())
    n_layers = len(model.get_decoder().layers) if hasattr(model, "get_decoder") else config.num_hidden_layers
    moe_idx = tuple(layer.index for layer in layers)
    shared_inter, n_shared = 0, 0
    if first.shared is not None:
        up = next((m for n, m in first.shared.named_modules() if n.endswith("up_proj")), None)
        shared_inter = int(up.weight.shape[0]) if up is not None else 0
        n_shared = int(getattr(config, "n_shared_experts", None) or 1)
    kv, kv_note = _kv_bytes_per_token(config, n_layers, nbytes)
    return ModelGeometry(
        family=config.model_type,
        architecture=type(model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        num_layers=n_layers,
        moe_layers=moe_idx,
        dense_layers=tuple(i for i in range(n_layers) if i not in moe_idx),
        num_experts=first.num_experts,
        top_k=first.top_k,
        hidden_size=first.hidden_size,
        expert_intermediate_size=first.intermediate_size,
        shared_experts=n_shared,
        shared_intermediate_size=shared_inter,
        vocab_size=int(config.vocab_size),
        routing=first.rule,
        expert_layout=first.layout,
        total_params=int(total),
        params_per_expert=int(params_per_expert),
        expert_params=int(expert_params),
        non_expert_params=int(total - expert_params),
        bytes_per_param=nbytes,
        expert_bytes=int(params_per_expert * nbytes),
        all_expert_bytes=int(expert_params * nbytes),
        non_expert_bytes=int((total - expert_params) * nbytes),
        kv_bytes_per_token=kv,
        kv_note=kv_note,
    )


def inspect_model(spec, trust_remote_code: bool = False) -> ModelGeometry:
    """Geometry of a local model directory, `demo` or a shipped card, without loading any weights (meta
    device: a directory holding only config.json is enough)."""
    config = load_config(spec, trust_remote_code=trust_remote_code)
    dtype = _dtype_of(text_config(config))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise MoeServeError(f"{config.model_type} is not a causal language model: {str(exc).splitlines()[0]}") from None
    g = geometry_of(model, dtype=dtype)
    if isinstance(spec, str) and is_card_name(spec) and not Path(spec).exists():
        g.extra["card"] = asdict(load_card(spec))
    return g
