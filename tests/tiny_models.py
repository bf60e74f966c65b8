"""Tiny random-initialised MoE models of every family moeserve supports (for tests only)."""

from __future__ import annotations

import torch
import transformers as tf

_COMMON = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

TINY_CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(**_COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **_COMMON, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        **_COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, head_dim=8),
    "olmoe": lambda: tf.OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": lambda: tf.DeepseekV2Config(
        **{**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=1.5, head_dim=8),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **{**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8),
    "gpt_oss": lambda: tf.GptOssConfig(
        **{**_COMMON, "num_attention_heads": 4}, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
        head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "granitemoe": lambda: tf.GraniteMoeConfig(
        **_COMMON, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    "phimoe": lambda: tf.PhimoeConfig(
        **_COMMON, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
}

DENSE_CONFIG = lambda: tf.Qwen3Config(**_COMMON, intermediate_size=40, head_dim=8)  # noqa: E731


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and bias buffer visible random values (HF zero-inits routers and biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised tiny causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return randomize_(model, seed).eval()


def save_tiny_model(family: str, path, seed: int = 0) -> None:
    """Write a tiny model as a Hugging Face directory (safetensors) at `path`."""
    tiny_model(family, seed).save_pretrained(path)


def save_tiny_tokenizer(path, vocab_size: int = 128) -> None:
    """A real BPE tokenizer (tokenizers library) small enough for the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet) + 2)
    text = ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b",
            "what is the capital of france?", "solve 12 plus 30 equals 42"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
