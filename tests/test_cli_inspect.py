from __future__ import annotations

import json

import pytest
import torch

from cli_run import run_cli
from moeserve.models.adapter import expert_weights, moe_layers
from moeserve.models.geometry import geometry_of, inspect_model
from tiny_models import tiny_model


def test_help_lists_working_subcommands():
    r = run_cli("--help")
    assert r.code == 0 and "inspect" in r.out


def test_version():
    r = run_cli("--version")
    assert r.code == 0 and r.out.startswith("moeserve ")


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss", "mixtral"])
def test_inspect_json_matches_config_and_real_weights(tiny_model_dirs, family):
    r = run_cli("inspect", tiny_model_dirs[family], "--json")
    assert r.code == 0, r.err
    g = json.loads(r.out)
    model = tiny_model(family)
    cfg = model.config
    assert g["family"] == cfg.model_type
    assert g["num_layers"] == cfg.num_hidden_layers
    assert g["vocab_size"] == cfg.vocab_size
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts
    assert g["num_experts"] == experts and g["top_k"] == cfg.num_experts_per_tok
    assert g["total_params"] == sum(p.numel() for p in model.parameters())
    layers = moe_layers(model)
    assert g["moe_layers"] == [layer.index for layer in layers]
    one = sum(t.numel() for t in expert_weights(layers[0], 0).tensors().values())
    assert g["params_per_expert"] == one
    assert g["expert_params"] + g["non_expert_params"] == g["total_params"]
    assert g["expert_bytes"] == one * 4  # float32 checkpoint


def test_meta_geometry_equals_real_model_geometry(tiny_model_dirs):
    real = geometry_of(tiny_model("deepseek_v3"))
    meta = inspect_model(tiny_model_dirs["deepseek_v3"])
    assert real == meta
    assert meta.dense_layers == (0,) and meta.shared_experts == 1
    assert meta.routing.bias == "selection" and meta.routing.groups == 4


def test_kv_bytes_per_token_matches_the_real_cache():
    """The geometry's KV bytes/token equal what a real forward pass stores in the HF cache."""
    for family in ("qwen3_moe", "deepseek_v3"):
        model = tiny_model(family)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
        cache = out.past_key_values
        stored = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
        assert geometry_of(model).kv_bytes_per_token == stored // 3, family


def test_inspect_errors_are_one_line_exit_2(tiny_model_dirs, tmp_path):
    for args, needle in [
        (("inspect", tmp_path / "missing"), "not found"),
        (("inspect", tiny_model_dirs["dense"]), "dense model"),
        (("inspect", tmp_path), "no config.json"),
    ]:
        r = run_cli(*args)
        assert r.code == 2, (args, r)
        assert needle in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err
    (tmp_path / "config.json").write_text("{not json")
    r = run_cli("inspect", tmp_path)
    assert r.code == 2 and "not valid JSON" in r.err
