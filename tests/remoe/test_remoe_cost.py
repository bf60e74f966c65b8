from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.pricing.profiles import CpuFunctionPricing, GpuFunctionPricing, Pricing
from moeserve.remoe.cost import (
    CostModel,
    RemoteSplit,
    Workload,
    evaluate_all_cpu,
    evaluate_all_gpu,
    evaluate_fetch,
    evaluate_mix,
    evaluate_remoe,
    layer_figures,
    memory_problem,
    remote_terms,
)
from moeserve.remoe.inputs import LinearLatency, PlanHardware, PlanModel, RequestShape
from moeserve.units import GIB, MIB

CPU = CpuFunctionPricing(1e-5, 1e-7, 128, 10240, 1, 1769, 1 << 30, 0.0, "test")
GPU = GpuFunctionPricing("g", 80, "gpu_memory", 3e-5, 0.0, 1e-5, 0.0, 4, "test")
HW = PlanHardware(
    gpu_layer=LinearLatency(1e-3, 1e-5),
    gpu_expert=LinearLatency(5e-5, 2e-7),
    cpu_expert=LinearLatency(2e-3, 1e-4),
    cpu_layer=LinearLatency(4e-3, 1e-4),
    remote_memory_mb=(128.0, 1024.0, 4096.0),
    remote_s_per_token=(5e-4, 5e-4, 5e-4),
    remote_invoke_overhead_s=2e-3,
    network_rtt_s=1e-3,
    network_bytes_per_s=1e6,
    host_to_gpu_bytes_per_s=1e9,
    load_bytes_per_s=1e9,
    cold_start_base_s=1.0,
    function_overhead_mb=256.0,
)
GEO = PlanModel(
    layers=1, experts=2, top_k=1, expert_bytes=100 * MIB, non_expert_bytes=GIB, hidden_bytes_per_token=1000
)


@pytest.fixture
def tiny():
    model = CostModel.build(GEO, HW, Pricing(CPU, GPU))
    assert model.curve.theta1 == 0.0 and model.curve.theta3 == pytest.approx(5e-4)
    split = RemoteSplit(np.array([[False, True]]), np.array([[-1, 0]]), np.array([1024]))
    base = Workload.from_shares(np.array([[0.6, 0.4]]), np.array([[0.5, 0.5]]), RequestShape(10, 3), top_k=1)
    return model, split, dataclasses.replace(base, actual=True)


def test_hand_computed_request(tiny):
    model, split, workload = tiny
    fig = evaluate_remoe(model, split, workload)
    # prefill: GPU 1e-3 + 10e-5; local 2e-3 + 6e-4; remote rtt+overhead 3e-3 + 2*4*1000/1e6 + 4*5e-4 = 0.013
    assert fig.ttft_s == pytest.approx(0.0011 + 0.013)
    # decode: GPU 1.01e-3; local 0.5 * 2.1e-3; remote 0.5 * 3e-3 + 0.5 * 2e-3 + 0.5 * 5e-4
    assert fig.tpot_s == pytest.approx(0.00101 + 0.00275)
    main_per_s = 1 * 3e-5 + (256 + 100) / 1024 * 1e-5
    assert fig.main_usd == pytest.approx(main_per_s * (fig.ttft_s + 2 * fig.tpot_s))
    # remote: 1 GB x (prefill 2e-3 + 4 * 5e-4, decode 2 steps x 0.5 calls x (2e-3 + 5e-4)) + 2 calls x 1e-7
    assert fig.remote_usd == pytest.approx(1e-5 * (0.004 + 0.0025) + 2e-7)
    assert fig.cost_usd == pytest.approx(fig.main_usd + fig.remote_usd)
    assert fig.fits


def test_billing_granularity_rounds_each_call_up(tiny):
    model, split, workload = tiny
    coarse = dataclasses.replace(
        model, pricing=Pricing(dataclasses.replace(CPU, billing_granularity_s=0.01), GPU)
    )
    fig = evaluate_remoe(coarse, split, workload)
    assert fig.remote_usd == pytest.approx(1e-5 * (0.01 + 2 * 0.5 * 0.01) + 2e-7)


def test_memory_problem_is_the_cost_model_without_constants():
    geo = PlanModel(
        layers=3, experts=8, top_k=2, expert_bytes=50 * MIB, non_expert_bytes=GIB, hidden_bytes_per_token=2048
    )
    hw = dataclasses.replace(HW, remote_s_per_token=(4e-3, 1.5e-3, 4e-4))
    model = CostModel.build(geo, hw, Pricing(dataclasses.replace(CPU, usd_per_request=0.0), GPU))
    rng = np.random.default_rng(0)
    remote = rng.random((3, 8)) < 0.5
    replica = np.where(remote, rng.integers(0, 2, (3, 8)), -1)
    memory = np.array([900, 2000, 4100])
    split = RemoteSplit(remote, replica, memory)
    workload = Workload.from_shares(
        rng.dirichlet(np.ones(8), 3), rng.dirichlet(np.ones(8), 3), RequestShape(64, 20), 2
    )
    fig = evaluate_remoe(model, split, workload)
    host = (256 + 50 * (~remote).sum()) * MIB
    problem = memory_problem(model, split, workload, host, 1.0, np.full(3, 128.0))
    per_s = problem.main_usd_per_s
    constants = per_s * 3 * (float(hw.gpu_layer(64)) + 19 * float(hw.gpu_layer(1)))
    assert fig.cost_usd == pytest.approx(problem.cost(memory[:, None].astype(float)).sum() + constants)
    assert fig.tpot_s == pytest.approx(
        problem.decode_s(memory[:, None].astype(float)).sum() + 3 * float(hw.gpu_layer(1))
    )
    lf = layer_figures(model, split, workload)
    assert fig.ttft_s == pytest.approx(lf.prefill_s.sum())


def test_payload_limit_splits_prefill_into_chunks(tiny):
    model, split, workload = tiny
    small = dataclasses.replace(
        model, pricing=Pricing(dataclasses.replace(CPU, payload_limit_bytes=1500), GPU)
    )
    terms = remote_terms(small, split, workload)
    assert terms.invocations[0, 0] == 3  # 4 tokens x 1000 bytes in 1500-byte payloads
    assert evaluate_remoe(small, split, workload).ttft_s == pytest.approx(0.0011 + 0.013 + 2 * 0.003)


def test_baselines_by_hand(tiny):
    model, _, workload = tiny
    gpu = evaluate_all_gpu(model, workload)
    assert gpu.ttft_s == pytest.approx(0.0011 + 2 * 5e-5 + 10 * 2e-7)
    assert gpu.tpot_s == pytest.approx(0.00101 + 5e-5 + 2e-7)
    assert gpu.gpu_bytes == GIB + 200 * MIB
    assert gpu.cost_usd == pytest.approx(
        ((1 + 200 / 1024) * 3e-5 + 256 / 1024 * 1e-5) * (gpu.ttft_s + 2 * gpu.tpot_s)
    )
    cpu = evaluate_all_cpu(model, workload)
    assert cpu.ttft_s == pytest.approx(4e-3 + 1e-3 + 2 * 2e-3 + 10 * 1e-4)
    assert cpu.cost_usd == pytest.approx(
        (1024 + 200 + 256) / 1024 * 1e-5 * (cpu.ttft_s + 2 * cpu.tpot_s) + 1e-7
    )
    assert cpu.fits
    mix = evaluate_mix(model, workload)
    assert mix.ttft_s == pytest.approx(0.0011 + 2 * 2e-3 + 10 * 1e-4) and mix.remote_usd == 0.0
    fetch = evaluate_fetch(model, workload)
    assert fetch.ttft_s == pytest.approx(max(0.0011 + 2 * 5e-5 + 10 * 2e-7, 2 * 100 * MIB / 1e9))
    assert fetch.host_bytes == 200 * MIB + 256 * MIB
    big = dataclasses.replace(model, geometry=dataclasses.replace(GEO, expert_bytes=6 * GIB))
    assert not evaluate_all_cpu(big, workload).fits  # 13 GB is over Lambda's 10,240 MB


def test_expected_counts_use_poisson_activity_and_shape_errors(tiny):
    model, split, workload = tiny
    expected = dataclasses.replace(workload, actual=False, prefill_tokens=np.array([[0.5, 4.0]]))
    terms = remote_terms(model, split, expected)
    assert terms.prefill_local_s[0] == pytest.approx(2e-3 * (1 - np.exp(-0.5)) + 0.5 * 1e-4)
    wrong = dataclasses.replace(workload, prefill_tokens=np.ones((2, 2)))
    with pytest.raises(MoeServeError, match="layers, experts"):
        evaluate_remoe(model, split, wrong)
    with pytest.raises(MoeServeError, match="sums to zero"):
        Workload.from_shares(np.zeros((1, 2)), None, RequestShape(1, 1), 1)
