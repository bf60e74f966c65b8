"""A model known only by its config.json: profile --hardware with random weights, trace synth, plan --model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_run import run_cli
from moeserve.hardware import load_hardware_profile
from moeserve.traces.importer import routing_to_trace
from moeserve.traces.synth import RoutingTargets, synthesize_routing

CONFIG = {  # a small Qwen3-MoE: 3 layers, the first dense, 8 experts, top-2
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "mlp_only_layers": [0], "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "vocab_size": 40000, "max_position_embeddings": 512, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("config-only")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    offsets = np.concatenate([[0], np.cumsum(np.full(30, 24))])
    domain = np.arange(30) % 2
    t = RoutingTargets(np.array([0.3, 0.4]), np.array([0.3, 0.4]), np.array([0.04, 0.06]))
    ids, _ = synthesize_routing(t, offsets, domain, 16, 4, seed=2)
    like = routing_to_trace(ids, offsets, 16, prompt_lengths=np.full(30, 16),
                            domains=[["code", "prose"][d] for d in domain], source="test").save(root / "like.trace")
    return {"root": root, "model": model, "like": like}


@pytest.mark.slow
def test_config_only_model_end_to_end(config_only):
    root, model = config_only["root"], config_only["model"]
    r = run_cli("inspect", model, "--json")
    assert r.code == 0, r.err
    g = json.loads(r.out)
    assert (g["num_moe_layers"], g["dense_layers"], g["num_experts"], g["top_k"]) == (2, [0], 8, 2)
    hw_path = root / "hw.yaml"
    r = run_cli("profile", model, "--hardware", "--hardware-out", hw_path, "--json")
    assert r.code == 0, r.err
    assert "deprecated" not in r.err  # the KV cache passed and read by its current name
    hw = load_hardware_profile(hw_path)
    assert (hw.expert.hidden_size, hw.expert.intermediate_size) == (64, 32)
    assert {c.method for c in hw.expert.curves} == {"measured"}
    assert {c.method for c in hw.non_expert.curves} == {"extrapolated"}
    assert "1 x dense" in hw.notes and "2 x MoE" in hw.notes and "32768 of 40000" in hw.notes
    assert hw.memory.expert_bytes == g["expert_bytes"] and hw.memory.non_expert_bytes == g["non_expert_bytes"]
    trace = root / "synth.trace"
    r = run_cli("trace", "synth", "--model", model, "--like", config_only["like"], "--out", trace)
    assert r.code == 0, r.err
    r = run_cli("plan", trace, "--model", model, "--hardware", hw_path, "--gpu-hardware", "a100-80gb", "--slo-ttft", "30", "--slo-tpot", "5",
                "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    notes = " ".join(out["notes"])
    assert "synthetic" in notes and "extrapolated" in notes and "datasheet" in notes
    assert out["predicted"]["cost_per_1k_requests_usd"] > 0


def test_config_only_errors(config_only, tmp_path):
    model = config_only["model"]
    r = run_cli("profile", model, "--prompts", "builtin:code", "--out", tmp_path / "t.trace")
    assert r.code == 2 and "no weights" in r.err and "trace synth" in r.err
    r = run_cli("plan", config_only["like"], "--model", "qwen3-30b-a3b")
    assert r.code == 2 and "does not fit qwen3-30b-a3b" in r.err and len(r.err.strip().splitlines()) == 1
    r = run_cli("plan", config_only["like"], "--model", "no-such-card")
    assert r.code == 2 and "unknown model 'no-such-card'" in r.err


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3-next-80b-a3b", "gpt-oss-120b", "mixtral-8x7b"])
def test_every_layer_kind_of_a_card_builds_alone(name):
    """The one-layer models profile --hardware times exist for each kind of layer of the card (meta device)."""
    from collections import Counter

    from moeserve.hardware.from_config import layer_kinds, meta_model
    from moeserve.models.geometry import inspect_model
    from moeserve.models.loading import load_config

    config, g = load_config(name), inspect_model(name)
    kinds = Counter(layer_kinds(config, g))
    assert sum(kinds.values()) == g.num_layers
    assert sum(n for (_, moe), n in kinds.items() if not moe) == len(g.dense_layers)
    expected = {"deepseek-v3": {("full_attention", False): 3, ("full_attention", True): 58},
                "qwen3-next-80b-a3b": {("linear_attention", True): 36, ("full_attention", True): 12},
                "gpt-oss-120b": {("sliding_attention", True): 18, ("full_attention", True): 18},
                "mixtral-8x7b": {("full_attention", True): 32}}[name]
    assert dict(kinds) == expected
    for kind in kinds:
        layers = [("full_attention", kind[1]), kind] if "linear" in kind[0] else [kind]
        model = meta_model(config, layers)
        assert model.config.vocab_size == 256 and model.config.num_hidden_layers == len(layers)
        if getattr(model.config, "layer_types", None) is not None:
            assert model.config.layer_types == [a for a, _ in layers]
