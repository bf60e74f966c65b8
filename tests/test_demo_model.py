"""The shipped demo checkpoint (src/moeserve/assets/demo): loads offline, has the promised geometry,
is small and bf16 on disk, generates, and beats a unigram model by far on held-out text of every domain."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import moeserve

DEMO_DIR = Path(moeserve.__file__).parent / "assets" / "demo"
DOMAINS = ("code", "docs", "prose", "dictionary")
MAX_TOTAL_BYTES = 25 * 1024 * 1024
SAMPLE_CHUNKS_PER_DOMAIN = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)


def heldout_rows(domain: str) -> list[dict]:
    with (DEMO_DIR / "heldout" / f"{domain}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_geometry_is_a_real_qwen3_moe(model):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    moe_layers = [layer for layer in model.model.layers if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)]
    assert len(moe_layers) >= 4
    assert model.config.num_experts >= 32 and model.config.num_experts_per_tok >= 4
    for layer in moe_layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == model.config.num_experts
        assert layer.mlp.gate.weight.shape[0] == model.config.num_experts


def test_files_are_small_and_weights_bf16_on_disk():
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total <= MAX_TOTAL_BYTES
    saved_config = json.loads((DEMO_DIR / "config.json").read_text())
    assert not any("experts_implementation" in key for key in saved_config)
    shards = sorted(DEMO_DIR.glob("*.safetensors"))
    assert shards
    for shard in shards:
        with shard.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert dtypes == {"BF16"}


def test_tokenizer_round_trips_and_marks_documents(tokenizer, model):
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size


def test_greedy_generate_runs_and_is_deterministic(model, tokenizer):
    inputs = tokenizer("And the LORD said unto Moses,", return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len < first.shape[1] <= prompt_len + 6
    assert torch.equal(first, second)
    assert int(first.max()) < model.config.vocab_size


def test_heldout_files_are_labelled_natural_chunks():
    for domain in DOMAINS:
        rows = heldout_rows(domain)
        assert {r["domain"] for r in rows} == {domain}
        lengths = [len(r["text"]) for r in rows]
        assert min(lengths) >= 100 and max(lengths) <= 1500
        assert 50_000 <= sum(lengths) <= 110_000
        assert len({r["doc"] for r in rows}) >= 3  # several documents, so halves can be split by document


def test_routing_prehook_sees_top_k_indices(model, tokenizer):
    seen = []
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append(args[1].shape))
    try:
        with torch.no_grad():
            model(**tokenizer("word\nn 1: a unit of language", return_tensors="pt"))
    finally:
        handle.remove()
    n_tokens = len(tokenizer("word\nn 1: a unit of language")["input_ids"])
    assert seen == [torch.Size([n_tokens, model.config.num_experts_per_tok])]


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_perplexity_far_below_unigram(model, tokenizer, domain):
    counts = np.asarray(json.loads((DEMO_DIR / "unigram_counts.json").read_text())["counts"][domain], dtype=np.float64)
    assert counts.shape == (model.config.vocab_size,)
    unigram_log_probs = np.log((counts + 1.0) / (counts + 1.0).sum())  # add-one smoothing
    rows = heldout_rows(domain)
    sample = rows[:: len(rows) // SAMPLE_CHUNKS_PER_DOMAIN][:SAMPLE_CHUNKS_PER_DOMAIN]
    model_nll, unigram_nll, n_tokens = 0.0, 0.0, 0
    for row in sample:
        ids = torch.tensor([tokenizer(row["text"])["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:]
        model_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        unigram_nll -= float(unigram_log_probs[targets.numpy()].sum())
        n_tokens += len(targets)
    model_ppl, unigram_ppl = math.exp(model_nll / n_tokens), math.exp(unigram_nll / n_tokens)
    assert model_ppl <= unigram_ppl / 4, (domain, model_ppl, unigram_ppl)
