"""The demo checkpoint's architecture: a small Qwen3-MoE, every layer sparse."""

from __future__ import annotations

import transformers as tf

ROUTER_AUX_LOSS_COEF = 0.01


def demo_config(vocab_size: int = 8192, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2) -> tf.Qwen3MoeConfig:
    """4 layers x 32 routed experts, top-4 with renormalised weights, tied embeddings (~9.1M parameters)."""
    return tf.Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=96,
        intermediate_size=384,  # dense-MLP width; unused because every layer is MoE
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        output_router_logits=True,
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
