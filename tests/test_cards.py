"""Shipped model cards: each config loads with transformers, and inspect's geometry is the config's."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from cli_run import run_cli
from moeserve.models.cards import card_dir, card_names, load_card
from moeserve.models.geometry import inspect_model
from moeserve.models.loading import resolve_model_path

REQUIRED = {"qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b", "deepseek-v3", "gpt-oss-120b", "olmoe-1b-7b",
            "qwen3-next-80b-a3b"}


def _raw(name: str) -> dict:
    return json.loads((card_dir(name) / "config.json").read_text())


def _first(raw: dict, *keys):
    return next(raw[k] for k in keys if k in raw)


def test_required_cards_are_shipped():
    assert REQUIRED <= set(card_names())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_card_config_loads_and_names_its_source(name):
    raw = _raw(name)
    config = AutoConfig.from_pretrained(card_dir(name), local_files_only=True)
    assert config.model_type == raw["model_type"]
    card = load_card(name)
    assert card.name == name
    assert card.source_url.startswith(f"https://huggingface.co/{card.model_id}/")
    assert card.taken and "no internet" in card.written_from
    assert resolve_model_path(name) == card_dir(name)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_inspect_geometry_equals_the_config(name):
    raw = _raw(name)
    g = inspect_model(name)
    layers = raw["num_hidden_layers"]
    dense = raw.get("first_k_dense_replace", 0) + len(raw.get("mlp_only_layers", []))
    assert g.num_layers == layers
    assert g.num_moe_layers == layers - dense and g.dense_layers == tuple(range(dense))
    assert g.num_experts == _first(raw, "n_routed_experts", "num_experts", "num_local_experts")
    assert g.top_k == raw["num_experts_per_tok"]
    assert g.hidden_size == raw["hidden_size"]
    assert g.expert_intermediate_size == _first(raw, "moe_intermediate_size", "intermediate_size")
    assert g.shared_experts == raw.get("n_shared_experts", 1 if raw.get("shared_expert_intermediate_size") else 0)
    assert g.vocab_size == raw["vocab_size"]
    assert g.dtype == raw["torch_dtype"] and g.bytes_per_param == 2
    assert g.expert_bytes == g.params_per_expert * 2
    h, i = g.hidden_size, g.expert_intermediate_size
    biases = 2 * i + h if raw["model_type"] == "gpt_oss" else 0  # gate_up and down biases
    assert g.params_per_expert == 3 * h * i + biases
    if "kv_lora_rank" in raw:  # MLA: the compressed latent and the rope key per layer
        assert g.kv_bytes_per_token == (raw["kv_lora_rank"] + raw["qk_rope_head_dim"]) * layers * 2
    else:
        head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
        kv_layers = layers // raw["full_attention_interval"] if "full_attention_interval" in raw else layers
        assert g.kv_bytes_per_token == 2 * raw["num_key_value_heads"] * head_dim * kv_layers * 2


def test_published_totals():
    """Parameter totals the model pages state (billions, rounded as published)."""
    totals = {"qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235.1, "mixtral-8x7b": 46.7, "deepseek-v3": 671.0,
              "gpt-oss-120b": 116.8, "olmoe-1b-7b": 6.9, "qwen3-next-80b-a3b": 79.7}
    for name, billions in totals.items():
        assert round(inspect_model(name).total_params / 1e9, 1) == pytest.approx(billions, abs=0.1), name


def test_inspect_by_card_name_and_bad_name():
    r = run_cli("inspect", "qwen3-30b-a3b", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["num_experts"] == 128 and out["card"]["model_id"] == "Qwen/Qwen3-30B-A3B"
    r = run_cli("inspect", "qwen3-30b-a3")
    assert r.code == 2 and "unknown model 'qwen3-30b-a3'" in r.err and "qwen3-30b-a3b" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_config_only_directory(tmp_path):
    """A directory holding only config.json (a card copied elsewhere) has the card's geometry."""
    (tmp_path / "config.json").write_text((card_dir("mixtral-8x7b") / "config.json").read_text())
    assert inspect_model(tmp_path).to_dict() | {"extra": {}} == inspect_model("mixtral-8x7b").to_dict() | {"extra": {}}
