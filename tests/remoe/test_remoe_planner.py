from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.remoe.bounds import (
    PredictedRoutingBound,
    RoutingHistory,
    UniformRoutingBound,
    conformal_upper,
)
from moeserve.remoe.cost import Workload, evaluate_remoe, remoe_host_bytes
from moeserve.remoe.inputs import RequestShape, Slo
from moeserve.remoe.lpt import lpt_partition
from moeserve.remoe.mmp import expert_utility, main_model_preallocation, utility_order
from moeserve.remoe.planner import plan_remoe, replay
from moeserve.remoe.replicas import plan_replicas
from moeserve.remoe.sps import SpsPredictor

HISTORY = 300
SLO = Slo(ttft_s=1.2, tpot_s=0.05)


@pytest.fixture(scope="module")
def deployment(small_model, small_trace):
    request = RequestShape(int(np.percentile(small_trace.prompt_tokens[:HISTORY], 95)), 150)
    share = small_trace.prefill[:HISTORY].mean(axis=0)
    decode = small_trace.decode[:HISTORY].mean(axis=0)
    return request, share, decode, plan_remoe(small_model, share, decode, request, SLO)


def test_plan_meets_slos_and_places_lowest_utility_experts_remotely(small_model, deployment):
    request, share, decode, plan = deployment
    geo = small_model.geometry
    assert plan.predicted.ttft_s <= SLO.ttft_s and plan.ttft_bound_s <= SLO.ttft_s
    assert plan.predicted.tpot_s <= SLO.tpot_s and plan.predicted.fits
    workload = Workload.from_shares(share, decode, request, geo.top_k)
    utility = expert_utility(workload, geo.top_k)
    r = plan.remote_count
    assert 0 < r < geo.experts
    for layer in range(geo.layers):
        remote = np.flatnonzero(plan.split.remote[layer])
        assert remote.size == r
        assert utility[layer, remote].max() <= np.sort(utility[layer])[r]  # the r least used experts
        replicas = plan.split.replica[layer, remote]
        sizes = np.bincount(replicas)
        assert np.all(sizes > 0) and sizes.size == plan.split.replicas[layer]
        assert sizes.max() * small_model.expert_mb + 256 <= plan.split.memory_mb[layer] <= 10240
    assert plan.host_bytes == remoe_host_bytes(small_model, geo.experts - r)
    again = evaluate_remoe(small_model, plan.split, workload, plan.host_bytes)
    assert again.cost_usd == pytest.approx(plan.predicted.cost_usd) and again.ttft_s == pytest.approx(
        plan.predicted.ttft_s
    )
    assert set(plan.baselines) == {"all-gpu", "all-cpu", "mix", "fetch", "remoe-even"}
    mix = plan.baselines["mix"]
    assert mix.ttft_s > SLO.ttft_s  # experts on the main CPU alone miss this SLO; that is why Remoe offloads
    assert plan.mmp is not None and plan.remote_count in plan.mmp.candidates


def test_mmp_vectors_equal_a_direct_computation_per_remote_count(small_model, deployment):
    request, share, decode, _ = deployment
    geo, hw = small_model.geometry, small_model.hardware
    workload = Workload.from_shares(share, decode, request, geo.top_k)
    bound = PredictedRoutingBound.from_shares(share, geo.top_k)
    mmp = main_model_preallocation(small_model, workload, SLO, bound)
    order = utility_order(workload, geo.top_k)
    n, delta = request.prompt_tokens, SLO.delta / (2 * geo.layers)
    fastest = float(small_model.curve(10240))
    call = hw.network_rtt_s + hw.remote_invoke_overhead_s
    for r in (0, 1, 7, geo.experts):
        total = 0.0
        for layer in range(geo.layers):
            local, remote = order[layer, r:], order[layer, :r]
            tokens = bound.set_upper(layer, local, n, delta) if local.size else 0.0
            local_s = hw.cpu_expert.fixed_s * min(local.size, tokens) + hw.cpu_expert.per_token_s * tokens
            single = [bound.set_upper(layer, np.array([e]), n, delta / geo.experts) for e in remote]
            remote_s = max(
                (
                    call + t * (2 * geo.hidden_bytes_per_token / hw.network_bytes_per_s + fastest)
                    for t in single
                ),
                default=0.0,
            )
            total += float(hw.gpu_layer(n)) + max(local_s, remote_s)
        assert mmp.ttft_bound_s[r] == pytest.approx(total)
    assert np.all(mmp.feasible == ((mmp.ttft_bound_s <= SLO.ttft_s) & (mmp.tpot_s <= SLO.tpot_s)))
    smallest = main_model_preallocation(small_model, workload, SLO, bound, rule="smallest")
    assert smallest.remote_count == np.flatnonzero(mmp.feasible)[0]  # the paper's rule
    assert mmp.proxy_usd[mmp.remote_count] == mmp.proxy_usd[mmp.feasible].min()


def test_replica_loop_finds_the_fewest_replicas_that_meet_ttft(small_model):
    geo = dataclasses.replace(small_model.geometry, layers=1, experts=12)
    model = dataclasses.replace(small_model, geometry=geo)
    rng = np.random.default_rng(0)
    share = rng.dirichlet(np.ones(12), size=1)
    workload = Workload.from_shares(share, share, RequestShape(400, 2), geo.top_k)
    remote = np.ones((1, 12), dtype=bool)
    bound = UniformRoutingBound(1, 12, geo.top_k)
    hw, cpu = model.hardware, model.pricing.cpu
    per_token = float(model.curve(10240))

    def worst(z):  # brute-force reference: LPT partition, each replica at its bound, GPU part added
        part = lpt_partition(workload.prefill_tokens[0], z, model.experts_per_function())
        tokens = bound.partition_upper(0, np.arange(12), part, z, 400, 0.05 / 2 / z)
        calls = np.maximum(np.ceil(tokens * geo.hidden_bytes_per_token / cpu.payload_limit_bytes), 1)
        per = (
            calls * (hw.network_rtt_s + hw.remote_invoke_overhead_s)
            + 2 * tokens * geo.hidden_bytes_per_token / hw.network_bytes_per_s
        )
        return float(hw.gpu_layer(400)) + float((per + tokens * per_token).max())

    bounds = [worst(z) for z in range(1, 13)]
    target = next(z for z in range(1, 13) if bounds[z - 1] < bounds[0] * 0.8)
    slo = Slo(ttft_s=bounds[target - 1] + 1e-9, tpot_s=1.0)
    plan = plan_replicas(
        model, remote, workload, np.array([10240]), remoe_host_bytes(model, 0), slo, bound, 0.0
    )
    z = int(plan.split.replicas[0])
    assert plan.ttft_bound_s <= slo.ttft_s
    assert plan.ttft_bound_s == pytest.approx(worst(z))
    assert z >= min(k for k in range(1, 13) if bounds[k - 1] <= slo.ttft_s)
    with pytest.raises(MoeServeError, match="TTFT SLO .* infeasible"):
        plan_replicas(
            model,
            remote,
            workload,
            np.array([10240]),
            remoe_host_bytes(model, 0),
            Slo(0.001, 1.0),
            bound,
            0.0,
        )


def test_history_bound_is_the_conformal_quantile_of_replayed_prompts(small_model, small_trace, deployment):
    request, share, decode, _ = deployment
    history = RoutingHistory.from_trace(small_trace.prefill[:HISTORY], small_trace.prompt_tokens[:HISTORY])
    plan = plan_remoe(small_model, share, decode, request, SLO, history=history, baselines=False)
    replayed = replay(
        small_model,
        plan,
        small_trace.prefill[:HISTORY],
        small_trace.prompt_tokens[:HISTORY],
        np.full(HISTORY, 2),
        small_trace.decode[:HISTORY],
    )
    assert plan.ttft_bound_s == pytest.approx(float(conformal_upper(replayed.ttft_s, SLO.delta)))
    assert plan.ttft_bound_s <= SLO.ttft_s and replayed.ttft_met >= 1 - SLO.delta
    held_out = replay(
        small_model,
        plan,
        small_trace.prefill[HISTORY:],
        small_trace.prompt_tokens[HISTORY:],
        small_trace.output_tokens[HISTORY:],
        small_trace.decode[HISTORY:],
    )
    assert held_out.ttft_met >= 1 - SLO.delta - 3 * np.sqrt(0.05 * 0.95 / held_out.ttft_s.size)


def test_per_request_planning_keeps_the_deployed_remote_count(small_model, small_trace, deployment):
    request, _, _, plan = deployment
    predictor = SpsPredictor.build(
        small_trace.vectors[:HISTORY], small_trace.prefill[:HISTORY], small_trace.decode[:HISTORY]
    )
    pre, dec = predictor.predict(small_trace.vectors[HISTORY : HISTORY + 1])
    one = plan_remoe(
        small_model,
        pre[0],
        dec[0],
        RequestShape(120, 64),
        SLO,
        remote_count=plan.remote_count,
        baselines=False,
    )
    assert np.all(one.split.remote.sum(axis=1) == plan.remote_count)
    assert one.mmp is None and one.baselines == {}
    assert one.predicted.tpot_s <= SLO.tpot_s


def test_bad_inputs_and_infeasible_slos(small_model, deployment):
    request, share, decode, _ = deployment
    with pytest.raises(MoeServeError, match="TTFT SLO .* infeasible"):
        plan_remoe(small_model, share, decode, request, Slo(0.05, 0.05))
    with pytest.raises(MoeServeError, match="TPOT SLO .* infeasible"):
        plan_remoe(small_model, share, decode, request, Slo(5.0, 0.001))
    with pytest.raises(MoeServeError, match="another model"):
        plan_remoe(small_model, share[:, :10], None, request, SLO)
    with pytest.raises(MoeServeError, match="sums to zero"):
        plan_remoe(small_model, np.zeros_like(share), None, request, SLO)
    with pytest.raises(MoeServeError, match="prompts > 0"):
        RoutingHistory.from_trace(np.zeros((0, 6, 24)), np.zeros(0))
    with pytest.raises(MoeServeError):
        Slo(ttft_s=0.0, tpot_s=1.0)
    with pytest.raises(MoeServeError):
        RequestShape(0, 5)
