"""The commands on the shipped demo model, as a newcomer runs them."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from cli_run import run_cli
from moeserve.models.loading import DEMO_MODEL_DIR
from moeserve.traces.format import ExpertTrace

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")


def test_inspect_demo_equals_the_checkpoint_config():
    r = run_cli("inspect", "demo", "--json")
    assert r.code == 0, r.err
    g = json.loads(r.out)
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert g["family"] == cfg["model_type"] == "qwen3_moe"
    assert g["num_layers"] == cfg["num_hidden_layers"] >= 4
    assert g["num_moe_layers"] == cfg["num_hidden_layers"]  # every layer is MoE
    assert g["num_experts"] == cfg["num_local_experts"] >= 32  # v5 saves Qwen3-MoE's num_experts under this name
    assert g["top_k"] == cfg["num_experts_per_tok"] >= 4
    assert g["hidden_size"] == cfg["hidden_size"]
    assert g["expert_intermediate_size"] == cfg["moe_intermediate_size"]
    assert g["vocab_size"] == cfg["vocab_size"]
    assert g["dtype"] == cfg["dtype"] == "bfloat16"
    assert g["params_per_expert"] == 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    assert g["routing"]["scoring"] == "softmax" and g["routing"]["renormalize"] == cfg["norm_topk_prob"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert g["kv_bytes_per_token"] == 2 * cfg["num_key_value_heads"] * head_dim * cfg["num_hidden_layers"] * 2


def test_profile_demo_mtbench(tmp_path):
    out = tmp_path / "T"
    r = run_cli("profile", "demo", "--prompts", "builtin:mtbench", "--max-prompts", "8", "--gen-tokens", "16",
                "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    trace = ExpertTrace.open(out)
    assert s["requests"] == trace.num_requests == 8
    assert trace.meta.num_moe_layers == 4 and trace["expert_ids"].dtype == np.uint8
    assert 0 < s["decode_tokens"] <= 8 * 15
    assert len(set(trace.meta.domains)) == 8  # one prompt per MT-Bench category


def test_serve_plans_on_the_spot_for_the_demo(tmp_path, tiny_model_dirs):
    import tempfile

    from moeserve.planner import plan_on_the_spot

    spot_dirs = set(pathlib.Path(tempfile.gettempdir()).glob("moeserve-spot-*"))
    plan = plan_on_the_spot("demo", max_prompts=8, gen_tokens=4)
    plan.expert_placement()  # validates: every expert runs somewhere
    assert set(pathlib.Path(tempfile.gettempdir()).glob("moeserve-spot-*")) == spot_dirs  # nothing left behind
    assert plan.strategy == "remoe" and plan.inputs["made"] == "on the spot" and plan.inputs["hardware"] == "cpu-2core"
    assert plan.predicted["meets_slo"]
    # no shipped profile was measured for a tiny model's expert shape: no plan, the engine serves all-local
    assert plan_on_the_spot(tiny_model_dirs["qwen3_moe"]) is None
