"""moeserve plan (Remoe): a valid plan every expert of which runs somewhere, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cli_run import run_cli
from moeserve.plan.schema import load_plan
from moeserve.traces.format import ExpertTrace, TraceMeta


@pytest.fixture(scope="module")
def planned(tiny_model_dirs, tmp_path_factory):
    """A tiny DeepSeek-V3 trace and a hardware profile measured for its expert shape (few repeats)."""
    from moeserve.hardware import measure_hardware, save_profile
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
    save_profile(hw, root / "hw.yaml")
    return {"trace": trace, "hw": root / "hw.yaml", "root": root}


def test_plan_is_valid_and_covers_every_expert(planned):
    out = planned["root"] / "plan.yaml"
    r = run_cli("plan", planned["trace"], "--hardware", planned["hw"], "--gpu-hardware", "a100-80gb", "--slo-ttft",
                "5", "--slo-tpot", "1", "--evaluate", "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    plan = load_plan(out)  # validates that every expert of every MoE layer runs somewhere
    placement = plan.expert_placement()
    assert plan.strategy == "remoe" and set(plan.main.local_experts) == {1, 2}
    for f in plan.functions:  # remote experts are exactly the ones not local
        assert not set(f.experts) & set(plan.main.local_experts[f.layer])
    chosen = plan.extra["shape"]["chosen"]
    assert chosen == s["predicted"]["shape"] and chosen not in s["baselines"]
    assert {"all-gpu", "all-cpu", "mix", "fetch"} - {chosen} <= set(s["baselines"])
    assert s["predicted"]["meets_slo"] and s["predicted"]["ttft_s"] <= 5
    # never dominated: no executable baseline meeting the SLOs is cheaper than the chosen shape
    cost = s["predicted"]["cost_usd"]
    assert all(cost <= f["cost_usd"] * (1 + 1e-12) for f in s["baselines"].values()
               if f["meets_slo"] and f["executable"])
    # the plan's main function is the chosen shape's: serve executes exactly that
    assert plan.main.device == {"all-cpu": "cpu", "remoe-cpu": "cpu"}.get(chosen, "gpu")
    assert plan.main.expert_device == ("gpu" if chosen == "all-gpu" else "cpu")
    assert bool(plan.functions) == chosen.startswith("remoe")
    assert 0 <= s["evaluation"]["replay"]["both_met"] <= 1
    sps = s["evaluation"]["sps"]
    assert len(sps["methods"]) == len(sps["overall_jsd"]) and sps["held_out_prompts"] >= 2
    assert placement.validate([1, 2], 16) is None
    assert plan.inputs["trace_sha256"] and plan.inputs["slo"]["ttft_s"] == 5


def test_demo_plan_chooses_the_cheapest_shape_at_loose_and_tight_slos(tmp_path):
    """The demo (128 experts of 0.2 MB): at loose SLOs all-CPU is ~16x cheaper than any GPU shape, at tight
    ones only GPU shapes meet them; either way the verdict names the cheapest shape meeting the SLOs."""
    trace = tmp_path / "demo.trace"
    r = run_cli("profile", "demo", "--prompts", "builtin:mixed", "--max-prompts", "16", "--gen-tokens", "4",
                "--out", trace)
    assert r.code == 0, r.err
    for slo, expect_device in ((("2", "0.25"), "cpu"), (("0.01", "0.001"), "gpu")):
        out = tmp_path / f"plan-{slo[0]}.yaml"
        r = run_cli("plan", trace, "--gpu-hardware", "a100-80gb", "--slo-ttft", slo[0], "--slo-tpot", slo[1],
                    "--out", out, "--json")
        assert r.code == 0, r.err
        s = json.loads(r.out)
        plan = load_plan(out)
        assert plan.main.device == expect_device, s["predicted"]["shape"]
        meeting = [f["cost_usd"] for f in s["baselines"].values() if f["meets_slo"] and f["executable"]]
        assert meeting and s["predicted"]["cost_usd"] <= min(meeting)
        assert plan.extra["shape"]["runner_up"] is not None and plan.extra["shape"]["margin_usd"] >= 0


def test_plan_json_without_out_writes_no_file(planned, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_cli("plan", planned["trace"], "--hardware", planned["hw"], "--slo-ttft", "5", "--slo-tpot", "1", "--json")
    assert r.code == 0, r.err
    body = json.loads(r.out)
    assert body["plan"] is None and yaml.safe_load(body["plan_yaml"])["schema"] == "moeserve.plan/1"
    assert list(tmp_path.iterdir()) == []


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
    meta = TraceMeta(num_moe_layers=2, num_experts=16, top_k=4, moe_layer_indices=[1, 2], geometry=None)
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
    # at EPLB's own slots per device ((16 + 4) / 4), flat and node-first: never less balanced than EPLB
    assert s["slots_per_device"] == 5
    assert s["token_model_every_window"]["moeless_worse"] == 0 and s["token_model_every_window"]["cases"] > 0
    assert s["hierarchical"]["moeless_worse"] == 0 and s["hierarchical"]["nodes"] == 2
    assert s["bottleneck_time_planned_s"]["moeless"] <= s["bottleneck_time_planned_s"]["eplb"] * (1 + 1e-9)
    loc = plan.extra["expert_location"]
    phy2log = np.array(loc["phy2log"])
    assert phy2log.shape[0] == 2 and set(np.unique(phy2log[phy2log >= 0])) == set(range(16))
    copies = {(f.layer, e) for f in plan.functions for e in f.experts}
    assert copies == {(layer, e) for layer in (1, 2) for e in range(16)}


def test_gpu_hardware_auto_follows_the_detected_gpu(monkeypatch):
    import moeserve.planner as planner
    from moeserve import defaults
    from moeserve.hardware.schema import GpuInfo

    assert defaults.GPU_HARDWARE == "auto"
    monkeypatch.setattr(planner, "detected_gpus", lambda: ())
    profile, note = planner.resolve_gpu_hardware("auto")
    assert profile is None and "no GPU detected" in note
    monkeypatch.setattr(planner, "detected_gpus", lambda: (GpuInfo("NVIDIA H100 80GB HBM3", 80 << 30),))
    profile, note = planner.resolve_gpu_hardware("auto")
    assert profile.name == "h100-sxm" and "detected NVIDIA H100" in note
    monkeypatch.setattr(planner, "detected_gpus", lambda: (GpuInfo("NVIDIA H200", 141 << 30),))
    profile, note = planner.resolve_gpu_hardware("auto")
    assert profile is None and "no shipped profile" in note
    assert planner.resolve_gpu_hardware("none")[0] is None
    assert planner.resolve_gpu_hardware("a100-80gb")[0].name == "a100-80gb"


def test_plan_without_a_gpu_has_a_cpu_main_function(planned, monkeypatch):
    out = planned["root"] / "cpu.yaml"
    r = run_cli("plan", planned["trace"], "--hardware", planned["hw"], "--gpu-hardware", "none", "--slo-ttft", "5",
                "--slo-tpot", "1", "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    plan = load_plan(out)
    assert plan.main.device == "cpu" and plan.main.gpu_memory_mb == 0 and plan.inputs["gpu_hardware"] == "none"
    assert s["predicted"]["shape"] in ("all-cpu", "remoe-cpu")
    assert not set(s["baselines"]) & {"all-gpu", "mix", "fetch", "remoe", "remoe-even"}
    assert sum("GPU side absent" in n for n in s["notes"]) == 1  # said once, not by planner and shapes both
    assert sum("only the CPU shapes" in n for n in s["notes"]) == 1


def test_moeless_on_a_short_trace_shortens_the_window(planned):
    """24 requests arrive within ~15 s: fewer than 10 windows of the default 5 s, so the window shrinks."""
    r = run_cli("plan", planned["trace"], "--strategy", "moeless", "--hardware", planned["hw"], "--gpus", "4",
                "--out", planned["root"] / "short.yaml", "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["window_s"] < 5 and s["windows"] >= 6
    assert any("shortened" in n for n in s["notes"])
    assert s["extra_replicas"] % 4 == 0  # the default budget rounded so (16 + extra) splits over 4 devices
