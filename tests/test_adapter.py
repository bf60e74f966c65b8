"""The adapters must describe every family exactly: recomputing each MoE block from the adapter's
per-expert weights and the captured routing gives the block's own output."""

from __future__ import annotations

import pytest
import torch

from moeserve.errors import MoeServeError
from moeserve.models.adapter import (
    expert_weights,
    moe_layers,
    require_moe_layers,
    routed_forward,
    shared_forward,
)
from tiny_models import DENSE_CONFIG, TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)


def _capture_blocks(model, input_ids):
    """Run the model once; per MoE layer return (block input [T,H], block output [T,H], ids, weights)."""
    layers = moe_layers(model)
    seen = {}
    handles = []
    for layer in layers:
        def block_hook(mod, args, out, i=layer.index):
            out = out[0] if isinstance(out, tuple) else out
            seen.setdefault(i, {})["io"] = (args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1]))

        def experts_hook(mod, args, i=layer.index):
            seen.setdefault(i, {})["route"] = (args[1].clone(), args[2].clone())

        handles.append(layer.block.register_forward_hook(block_hook))
        handles.append(layer.experts.register_forward_pre_hook(experts_hook))
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in handles:
        h.remove()
    return layers, seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_block_output_recomputed_from_expert_weights(family, impl):
    model = tiny_model(family, seed=1)
    model.set_experts_implementation(impl)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    layers, seen = _capture_blocks(model, input_ids)
    assert layers, family
    for layer in layers:
        x, out = seen[layer.index]["io"]
        ids, weights = seen[layer.index]["route"]
        assert ids.shape == (x.shape[0], layer.top_k)
        with torch.no_grad():
            recomputed = routed_forward(layer, x, ids, weights)
            shared = shared_forward(layer, x)
            if shared is not None:
                recomputed = recomputed + shared
        diff = (recomputed - out).abs().max().item()
        assert diff <= 1e-5, f"{family} layer {layer.index}: max abs diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_split_over_expert_subsets_adds_up(family):
    """Local + remote partial sums (how the serving engine splits a layer) equal the full sum."""
    model = tiny_model(family, seed=2)
    input_ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    layers, seen = _capture_blocks(model, input_ids)
    layer = layers[-1]
    x, _ = seen[layer.index]["io"]
    ids, w = seen[layer.index]["route"]
    local = list(range(0, layer.num_experts, 2))
    remote = list(range(1, layer.num_experts, 2))
    with torch.no_grad():
        full = routed_forward(layer, x, ids, w)
        parts = routed_forward(layer, x, ids, w, experts=local) + routed_forward(layer, x, ids, w, experts=remote)
    assert torch.allclose(full, parts, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_weight_views_cover_the_fused_tensors(family):
    """Every element of the fused expert tensors belongs to exactly one expert's views."""
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    fused = sum(p.numel() for p in layer.experts.parameters())
    per_expert = sum(
        sum(t.numel() for t in expert_weights(layer, e).tensors().values()) for e in range(layer.num_experts)
    )
    assert per_expert == fused
    w = expert_weights(layer, 0)
    assert w.up.shape == (layer.intermediate_size, layer.hidden_size)
    assert w.down.shape == (layer.hidden_size, layer.intermediate_size)


def test_gpt_oss_interleaved_transposed_layout():
    model = tiny_model("gpt_oss")
    layer = moe_layers(model)[0]
    assert layer.layout.is_transposed and not layer.layout.is_concatenated and layer.layout.has_bias
    w = expert_weights(layer, 3)
    fused = layer.experts.gate_up_proj[3]  # [H, 2I], columns interleaved gate0, up0, gate1, up1, ...
    assert torch.equal(w.gate, fused[:, 0::2].t()) and torch.equal(w.up, fused[:, 1::2].t())
    assert torch.equal(w.gate_bias, layer.experts.gate_up_proj_bias[3][0::2])


def test_dense_layers_are_skipped_and_dense_model_refused():
    model = tiny_model("deepseek_v3")
    assert [layer.index for layer in moe_layers(model)] == [1, 2]  # first_k_dense_replace=1
    import transformers as tf

    dense = tf.AutoModelForCausalLM.from_config(DENSE_CONFIG())
    assert moe_layers(dense) == []
    with pytest.raises(MoeServeError, match="dense model"):
        require_moe_layers(dense)
