"""plan_cheapest: the cheapest SLO-meeting deployment shape, never dominated by a baseline it reports."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve.errors import MoeServeError
from moeserve.pricing.profiles import load_pricing
from moeserve.remoe.cost import (
    CostModel,
    Workload,
    evaluate_all_cpu,
    evaluate_all_gpu,
    evaluate_mix,
    evaluate_remoe,
)
from moeserve.remoe.inputs import PlanModel, RequestShape, Slo
from moeserve.remoe.planner import evaluate_plan, plan_remoe
from moeserve.remoe.shapes import NOT_EXECUTABLE, plan_cheapest, worst_case_workload
from moeserve.remoe.synthetic import example_hardware, synthetic_trace
from moeserve.units import GIB, MIB

PRICES = (("aws-lambda-x86", "paper-gpu-3x"), ("aws-lambda-x86", "modal-a100-80gb"), ("aws-lambda-arm", "paper-gpu-3x"))


def _model(layers, experts, top_k, expert_mb, non_expert_gib, prices, gpu=True) -> CostModel:
    geo = PlanModel(layers, experts, top_k, int(expert_mb * MIB), int(non_expert_gib * GIB), 8192)
    return CostModel.build(geo, example_hardware(float(expert_mb)), load_pricing(*prices), gpu_available=gpu)


def _workload(model: CostModel, seed: int, prompts: int = 120):
    geo = model.geometry
    trace = synthetic_trace(prompts, geo.layers, geo.experts, dim=16, seed=seed)
    request = RequestShape(int(np.percentile(trace.prompt_tokens, 95)), int(trace.output_tokens.mean()))
    return trace.prefill.mean(0), trace.decode.mean(0), request


def _check_never_dominated(model, share, decode, request, slo, plan):
    cost = plan.predicted.cost_usd
    for name, fig in plan.baselines.items():
        if fig.meets(slo) and name not in NOT_EXECUTABLE:  # fetch is costed, never served
            assert cost <= fig.cost_usd * (1 + 1e-12), (plan.shape, name)
    assert plan.predicted.meets(slo)
    # the figures are the chosen shape's own: re-evaluating the plan's split gives them again
    again = evaluate_plan(model, plan, Workload.from_shares(share, decode, request, model.geometry.top_k))
    assert again.cost_usd == pytest.approx(cost) and again.ttft_s == pytest.approx(plan.predicted.ttft_s)
    assert plan.ttft_bound_s <= slo.ttft_s + 1e-12 and plan.predicted.tpot_s <= slo.tpot_s + 1e-12


def test_loose_slos_choose_all_cpu_over_the_gpu_main_function():
    # a small model (128 experts x 0.2 MB, like the demo): every GPU shape pays for a GPU it hardly uses
    model = _model(4, 32, 4, 0.22, 0.004, PRICES[1])
    share, decode, request = _workload(model, 0)
    slo = Slo(2.0, 0.25)
    plan = plan_cheapest(model, share, decode, request, slo)
    assert plan.shape == "all-cpu" and plan.main_device == "cpu" and not plan.split.remote.any()
    assert plan.gpu_bytes == 0 and plan.predicted.gpu_bytes == 0
    mix = plan.baselines["mix"]
    assert mix.meets(slo) and mix.cost_usd > 5 * plan.predicted.cost_usd
    assert plan.runner_up is not None and plan.margin_usd > 0
    assert plan.margin_usd == pytest.approx(plan.baselines[plan.runner_up].cost_usd - plan.predicted.cost_usd)
    _check_never_dominated(model, share, decode, request, slo, plan)


def test_remoe_split_is_chosen_where_it_wins():
    # 8 x 64 experts of 400 MB and 16 GiB of non-expert weights, GPU at 3x the CPU's price: the GPU main
    # function with the rare experts remote beats keeping every expert on GPUs (and every other shape)
    model = _model(8, 64, 4, 400, 16, PRICES[0])
    share, decode, request = _workload(model, 1, 200)
    slo = Slo(10.0, 0.25)
    plan = plan_cheapest(model, share, decode, request, slo)
    assert plan.shape == "remoe" and plan.main_device == "gpu" and plan.expert_device == "cpu"
    assert plan.split.remote.any() and plan.replicas is not None
    alone = plan_remoe(model, share, decode, request, slo, baselines=False)
    assert plan.predicted.cost_usd == pytest.approx(alone.predicted.cost_usd)
    assert plan.baselines["all-gpu"].meets(slo) and plan.baselines["all-gpu"].cost_usd > plan.predicted.cost_usd
    _check_never_dominated(model, share, decode, request, slo, plan)


def test_without_a_gpu_only_cpu_shapes_are_planned():
    model = _model(8, 64, 4, 400, 4, PRICES[0], gpu=False)
    share, decode, request = _workload(model, 1, 200)
    slo = Slo(60.0, 0.5)
    plan = plan_cheapest(model, share, decode, request, slo)
    assert plan.main_device == "cpu" and plan.shape in ("remoe-cpu", "all-cpu")
    assert not set(plan.baselines) & {"mix", "all-gpu", "fetch", "remoe", "remoe-even"}
    assert any("no GPU" in n for n in plan.notes)
    if plan.shape == "remoe-cpu":  # the main function is a CPU function: billed and sized as one
        main = evaluate_remoe(model.on_cpu(), plan.split, Workload.from_shares(share, decode, request, 4),
                              plan.host_bytes)
        assert main.gpu_bytes == 0 and main.cost_usd == pytest.approx(plan.predicted.cost_usd)


def test_worst_case_workload_reaches_every_expert_a_prompt_can_hit():
    model = _model(2, 16, 2, 10, 1, PRICES[0])
    share = np.zeros((2, 16))
    share[:, :3] = [0.5, 0.3, 0.2]
    short = Workload.from_shares(share, None, RequestShape(3, 2), 2)  # 3 tokens x top-2: at most 6 experts
    worst = worst_case_workload(short, 2)
    assert (worst.active(worst.prefill_tokens).sum(axis=1) == 6).all()
    np.testing.assert_allclose(worst.prefill_tokens.sum(axis=1), short.prefill_tokens.sum(axis=1))
    long = Workload.from_shares(share, None, RequestShape(100, 2), 2)
    assert (worst_case_workload(long, 2).prefill_tokens > 0).all()
    assert evaluate_all_cpu(model, worst_case_workload(long, 2)).ttft_s >= evaluate_all_cpu(model, long).ttft_s


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 5),
    experts=st.sampled_from([4, 8, 16, 24]),
    top_k=st.integers(1, 4),
    expert_mb=st.floats(0.5, 600),
    non_expert_gib=st.floats(0.01, 20),
    prices=st.sampled_from(PRICES),
    ttft=st.floats(0.01, 60),
    tpot=st.floats(0.0005, 1.0),
    seed=st.integers(0, 1000),
    gpu=st.booleans(),
)
def test_plan_is_never_more_expensive_than_a_baseline_meeting_the_slos(
    layers, experts, top_k, expert_mb, non_expert_gib, prices, ttft, tpot, seed, gpu
):
    model = _model(layers, experts, min(top_k, experts), expert_mb, non_expert_gib, prices, gpu)
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(experts, 0.3), size=layers) + 1e-9
    decode = rng.dirichlet(np.full(experts, 0.3), size=layers) + 1e-9
    request = RequestShape(int(rng.integers(1, 800)), int(rng.integers(1, 200)))
    slo = Slo(ttft, tpot)
    try:
        plan = plan_cheapest(model, share, decode, request, slo)
    except MoeServeError:
        # nothing meets the SLOs: in particular none of the all-local shapes does
        w = Workload.from_shares(share, decode, request, model.geometry.top_k)
        worst = worst_case_workload(w, model.geometry.top_k)
        evaluators = (evaluate_all_cpu,) + ((evaluate_mix, evaluate_all_gpu) if gpu else ())
        for ev in evaluators:
            fig, bad = ev(model, w), ev(model, worst)
            assert not (fig.meets(slo) and bad.ttft_s <= slo.ttft_s + 1e-12), ev.__name__
        return
    _check_never_dominated(model, share, decode, request, slo, plan)
    if not gpu:
        assert plan.main_device == "cpu"
