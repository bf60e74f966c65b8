"""moeserve plan (Remoe): a valid plan every expert of which runs somewhere, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cli_run import run_cli
from moeserve.plan_format import load_plan
from moeserve.traces.format import ExpertTrace, TraceMeta


@pytest.fixture(scope="module")
def planned(tiny_model_dirs, tmp_path_factory):
    """A tiny DeepSeek-V3 trace and a hardware profile measured for its expert shape (few repeats)."""
    from moeserve.hardware import measure_hardware
    from moeserve.models.loading import load_model

    root = tmp_path_factory.mktemp("plan")
    model_dir = tiny_model_dirs["deepseek_v3"]
    trace = root / "t.trace"
    r = run_cli("profile", model_dir, "--prompts", "builtin:mixed", "--max-prompts", "24", "--gen-tokens", "6",
                "--batch-size", "4", "--out", trace)
    assert r.code == 0, r.err
    model = load_model(model_dir)
    hw = measure_hardware(32, 16, model=model, thread_counts=[1], token_counts=[1, 4, 16, 64, 256], repeats=3,
                          prefill_lengths=(16, 64), decode_batches=(1, 4), name="tiny")
    hw.save(root / "hw.yaml")
    return {"trace": trace, "hw": root / "hw.yaml", "root": root}


def test_plan_is_valid_and_covers_every_expert(planned):
    out = planned["root"] / "plan.yaml"
    r = run_cli("plan", planned["trace"], "--hardware", planned["hw"], "--slo-ttft", "5", "--slo-tpot", "1",
                "--evaluate", "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    plan = load_plan(out)  # validates that every expert of every MoE layer runs somewhere
    placement = plan.placement()
    assert plan.strategy == "remoe" and set(plan.main.local_experts) == {1, 2}
    for f in plan.functions:  # remote experts are exactly the ones not local
        assert not set(f.experts) & set(plan.main.local_experts[f.layer])
    assert set(s["baselines"]) == {"all-gpu", "all-cpu", "mix", "fetch", "remoe-even"}
    assert s["predicted"]["meets_slo"] and s["predicted"]["ttft_s"] <= 5
    assert 0 <= s["evaluation"]["replay"]["both_met"] <= 1
    sps = s["evaluation"]["sps"]
    assert len(sps["methods"]) == len(sps["overall_jsd"]) and sps["held_out_prompts"] >= 2
    assert placement.validate([1, 2], 16) is None
    assert plan.inputs["trace_sha256"] and plan.inputs["slo"]["ttft_s"] == 5


def test_per_request_plan(planned):
    out = planned["root"] / "req.yaml"
    r = run_cli("plan", planned["trace"], "--hardware", planned["hw"], "--prompt", "what is the capital of france?",
                "--slo-ttft", "5", "--slo-tpot", "1", "--out", out, "--json")
    assert r.code == 0, r.err
    assert load_plan(out).inputs["per_request"] is True


def test_plan_errors(planned, tmp_path):
    def bad(*args, needle):
        r = run_cli("plan", *args, "--out", tmp_path / "p.yaml")
        assert r.code == 2 and needle in r.err, r.err
        assert r.err.strip().count("\n") == 0
        assert not (tmp_path / "p.yaml").exists()

    bad(planned["trace"], "--hardware", planned["hw"], "--slo-ttft", "1e-9", "--slo-tpot", "1e-9",
        needle="SLO")
    bad(planned["trace"], "--hardware", "cpu-2core", needle="shape")  # profile of another model
    (tmp_path / "broken.yaml").write_text("schema: moeserve.pricing/1\ncpu_function: {usd_per_gb_second: -1}\n")
    bad(planned["trace"], "--hardware", planned["hw"], "--pricing", tmp_path / "broken.yaml", needle="pricing")
    (tmp_path / "notyaml.yaml").write_text(": : [")
    bad(planned["trace"], "--hardware", planned["hw"], "--pricing", tmp_path / "notyaml.yaml", needle="")
    meta = TraceMeta(num_layers=2, num_experts=16, top_k=4, moe_layer_indices=[1, 2], geometry=None)
    empty = ExpertTrace.from_arrays(meta, expert_ids=np.zeros((0, 2, 4), np.uint8), phase=np.zeros(0),
                                    request_offsets=np.array([0]), prefill_activation=np.zeros((0, 2, 16)),
                                    decode_activation=np.zeros((0, 2, 16)))
    empty.save(tmp_path / "empty.trace")
    bad(tmp_path / "empty.trace", "--hardware", planned["hw"], needle="empty")


def test_plan_file_round_trip_and_bad_plan(planned, tmp_path):
    from moeserve.errors import MoeServeError

    out = planned["root"] / "plan.yaml"
    if not out.exists():
        pytest.skip("needs the plan from the first test")
    raw = yaml.safe_load(out.read_text())
    raw["main"]["local_experts"] = {1: [0]}  # most experts of both layers now run nowhere
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(MoeServeError, match="run nowhere"):
        load_plan(tmp_path / "broken.yaml")


def test_moeless_plan_with_eplb_comparison_and_location_map(planned):
    out = planned["root"] / "moeless.yaml"
    r = run_cli("plan", planned["trace"], "--strategy", "moeless", "--hardware", planned["hw"], "--gpus", "4",
                "--replica-budget", "4", "--window", "2", "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    plan = load_plan(out)
    assert plan.strategy == "moeless"
    assert set(s["replay"]) == {"static", "eplb", "moeless_predicted", "moeless_oracle"}
    # same loads, same budget: MoEless's planned balance is no worse than EPLB's
    assert s["balancedness_planned"]["moeless"] <= s["balancedness_planned"]["eplb"] + 1e-9
    loc = plan.extra["expert_location"]
    phy2log = np.array(loc["phy2log"])
    assert phy2log.shape[0] == 2 and set(np.unique(phy2log[phy2log >= 0])) == set(range(16))
    copies = {(f.layer, e) for f in plan.functions for e in f.experts}
    assert copies == {(layer, e) for layer in (1, 2) for e in range(16)}
