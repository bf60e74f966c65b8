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


# ---------------------------------------------------------------------------------------------------------
# Every MoE model type of the installed transformers, enumerated from transformers itself (a new release is
# covered without editing this file), each shrunk to a tiny random-init model by generic rules on the
# config's attribute names.

_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k")
_SHRINK = {
    "vocab_size": 128, "hidden_size": 32, "max_position_embeddings": 256, "model_max_length": 256,
    "num_attention_heads": 4, "index_n_heads": 2, "index_topk": 4, "index_head_dim": 8, "kv_channels": 8,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "head_dim": 8, "sliding_window": 8, "attention_chunk_size": 8, "block_size": 8, "first_k_dense_replace": 1,
    "num_dense_layers": 1, "moe_layer_start_index": 1, "zero_expert_num": 2, "n_group": 2, "num_expert_group": 2,
    "topk_group": 1, "conv_L_cache": 3, "chunk_size": 8,
}


def _moe_text_config(config):
    try:
        return config.get_text_config()
    except ValueError:  # several text configs (encoder-decoder audio models): not a MoE causal LM
        return None


def _expert_count(config) -> int | None:
    for key in _EXPERT_COUNTS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def moe_model_types() -> list[str]:
    """Every causal-LM model type of the installed transformers whose (text) config has experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            text = _moe_text_config(CONFIG_MAPPING[model_type]())
        except Exception:  # noqa: BLE001 - a config that cannot build with its defaults: reported by the matrix
            found.append(model_type)
            continue
        if text is not None and any(k in text.to_dict() for k in _EXPERT_COUNTS):  # even None: MoE when set
            found.append(model_type)
    return found


def _layer_subset(values: dict, n_orig: int) -> list[int]:
    """Which of the original layers to keep: the first ones, plus the first layer of each kind in every
    per-layer list (attention types, dense/sparse, ...), at most 6."""
    lists = [v for v in values.values() if isinstance(v, (list, tuple)) and len(v) == n_orig and n_orig > 3]
    keep = set(range(min(3, n_orig)))
    for value in lists:
        first: dict[str, int] = {}
        for i, v in enumerate(value):
            first.setdefault(str(v), i)
        keep |= set(first.values())
    return sorted(keep)[:6]


def _shrunk(values: dict) -> dict:
    """Generic tiny sizes for a (text) config's attribute dict."""
    out = dict(values)
    layers_key = "num_hidden_layers" if "num_hidden_layers" in values else "num_layers"
    n_orig = int(values.get(layers_key) or 2)
    keep = _layer_subset(values, n_orig)
    n = len(keep)
    out[layers_key] = n
    heads = values.get("num_attention_heads")
    for key, value in values.items():
        if key.startswith("enable_moe") and value is False:  # Gemma 4: the MoE variant
            out[key] = True
        if isinstance(value, bool) or key.startswith("_"):
            continue
        if key in _EXPERT_COUNTS and (value is None or isinstance(value, int)):
            out[key] = 8  # None (Gemma 4, dots1): the family's MoE variant
        elif key in _TOP_K and (value is None or isinstance(value, int)):
            out[key] = 2 if value is None else min(value, 2)
        elif key == "moe_intermediate_size" and value is None:
            out[key] = 16
        elif key in _SHRINK and isinstance(value, int):
            out[key] = min(value, _SHRINK[key]) if key not in ("vocab_size", "hidden_size") else _SHRINK[key]
        elif key == "num_key_value_heads" and isinstance(value, int):
            out[key] = 4 if value == heads else 2
        elif isinstance(value, int) and value > 64 and (
                key.endswith(("_size", "_dim", "_heads", "_rank")) or "intermediate" in key):
            out[key] = 16 if "heads" not in key else 2
        elif isinstance(value, int) and key.endswith("_heads") and value > 4:
            out[key] = 2
        elif "vocab_size" in key and isinstance(value, int) and value > 128:
            out[key] = 128
        elif key.endswith(("_token_id", "_token_ids")) and isinstance(value, int) and value >= 128:
            out[key] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}.get(key, 3)
        elif isinstance(value, (list, tuple)) and len(value) == n_orig and n_orig > n:
            out[key] = [value[i] for i in keep]
        elif isinstance(value, dict) and value and all(str(k).isdigit() and isinstance(v, dict) for k, v in value.items()):
            out[key] = {str(keep.index(int(k))): {**v, **_shrunk_inner(v, heads)} for k, v in value.items()
                        if int(k) in keep}
    if values.get("head_dim", 0) is None:
        out["head_dim"] = 8
    for groups in ("n_groups", "mamba_n_groups"):
        if isinstance(values.get(groups), int):
            out[groups] = 1
    mamba_heads = next((k for k in ("mamba_n_heads", "mamba_num_heads") if isinstance(values.get(k), int)), None)
    mamba_dim = next((k for k in ("mamba_d_head", "mamba_head_dim") if isinstance(values.get(k), int)), None)
    if mamba_heads and mamba_dim:  # heads x head dim = expand x hidden
        expand = values.get("mamba_expand", values.get("expand", 2)) or 2
        out[mamba_heads], out[mamba_dim] = 4, expand * out["hidden_size"] // 4
    if "moe_layer_end_index" in values:
        out["moe_layer_end_index"] = n - 1
    if "moe_layers" in values and isinstance(values["moe_layers"], (list, tuple)) and len(values["moe_layers"]) != n_orig:
        out["moe_layers"] = [keep.index(i) for i in values["moe_layers"] if i in keep] or [n - 1]
    if "qk_head_dim" in values and "qk_nope_head_dim" in out:
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    if "n_shared_experts" in values and isinstance(values["n_shared_experts"], int):
        out["n_shared_experts"] = min(values["n_shared_experts"], 1)
    out["tie_word_embeddings"] = False
    return out


def _shrunk_inner(values: dict, heads) -> dict:
    """Tiny sizes inside one layer's override dict (the same name rules, no layer lists)."""
    return {k: v for k, v in _shrunk({**values, "num_hidden_layers": 1}).items()
            if k in values and k != "tie_word_embeddings"}


# the few defaults that cannot build as they are (None where the model needs a value)
_FIXES = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "dots3_note_text": {"head_dim": 16},  # its sliding layers' head_dim = qk_nope + qk_rope
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention"]},  # default: no attention
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
}


def family_config(model_type: str):
    """A tiny config of `model_type` (multimodal wrappers: their text config shrunk, the rest kept)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = _moe_text_config(default)
    if text is default or text is None:
        return cls.from_dict({**_shrunk(default.to_dict()), **_FIXES.get(model_type, {})})
    sub = next(k for k, v in vars(default).items() if v is text)
    values = default.to_dict()
    fixes = {**_FIXES.get(text.model_type, {}), **_FIXES.get(model_type, {})}
    values[sub] = {**_shrunk(text.to_dict()), **fixes}
    return cls.from_dict({**values, **{k: v for k, v in fixes.items() if k in values}})


def family_model(model_type: str, seed: int = 0):
    """A random-initialised tiny causal LM of any MoE `model_type` of the installed transformers (eval)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]() if model_type in TINY_CONFIGS else family_config(model_type)
    model = tf.AutoModelForCausalLM.from_config(config)
    return randomize_(model, seed).eval()
