"""Serve's autoscaling policy for expert functions and the replica's own load figures it scales on
(no Ray needed: the policy is a pure function, the replica a plain class)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from moeserve.experts.ray_config import RaySettings, autoscaling_config, replica_args
from moeserve.experts.ray_policy import CALLS, CONCURRENCY, POLICY, desired_replicas, expert_function_policy
from moeserve.experts.ray_replica import ExpertReplica
from moeserve.models.adapter import moe_layers
from moeserve.models.loading import DEMO_MODEL_DIR, load_model
from moeserve.plan.placement import ExpertFunction


def test_desired_replicas():
    assert desired_replicas(0.0, 12.0, 10.0, 1.0) == 0  # idle a whole window: keep-alive ran out
    assert desired_replicas(0.0, 3.0, 10.0, 1.0) == 1  # a few short calls lately: one replica, not zero
    assert desired_replicas(1.0, 0.0, 10.0, 1.0) == 1  # exactly one call always in flight
    assert desired_replicas(1.3, 0.0, 10.0, 1.0) == 2
    assert desired_replicas(1.3, 0.0, 10.0, 0.5) == 3


def _ctx(metrics, now, state, running=1, target=1, queued=0.0):
    return SimpleNamespace(aggregated_metrics=metrics, total_num_requests=queued, current_time=now,
                           policy_state=state, running_replicas=["r"] * running, target_num_replicas=target,
                           config=SimpleNamespace(target_ongoing_requests=1.0, look_back_period_s=10.0))


def test_policy_scales_on_the_replicas_figures_and_keeps_a_function_for_a_window():
    busy = {CONCURRENCY: {"r1": 0.9, "r2": 0.7}, CALLS: {"r1": 10.0, "r2": 0.0}}
    desired, state = expert_function_policy(_ctx(busy, 100.0, {}, running=2, target=2))
    assert desired == 2
    assert expert_function_policy(_ctx({}, 105.0, state))[0] == 1  # idle 5 s of a 10 s window: kept
    assert expert_function_policy(_ctx({}, 111.0, state))[0] == 0  # idle a whole window: Serve's delay starts
    assert expert_function_policy(_ctx({}, 111.0, state, queued=1.0))[0] == 1  # a request waits at a handle
    # replicas still starting have taken no call: they are not stopped for it
    desired, state = expert_function_policy(_ctx({}, 200.0, {}, running=0, target=1))
    assert desired == 1
    assert expert_function_policy(_ctx({}, 205.0, state, running=1, target=1))[0] == 1


def test_the_deployment_names_the_policy():
    config = autoscaling_config(ExpertFunction("L1-r0", 1, (0,), keep_alive_s=20.0), RaySettings())
    assert config["policy"] == {"policy_function": POLICY}
    assert config["metrics_interval_s"] < config["look_back_period_s"]


def test_replica_reports_call_seconds_per_second_and_calls():
    model = load_model(DEMO_MODEL_DIR)
    layer = moe_layers(model)[0]
    spec = ExpertFunction("L0-r0", layer.index, (0, 1))
    replica = ExpertReplica(replica_args(str(DEMO_MODEL_DIR), spec, layer.layout.to_dict(), layer.hidden_size,
                                         "float32", 1))
    replica.record_autoscaling_stats()  # starts a fresh interval
    x = np.random.default_rng(0).standard_normal((4, layer.hidden_size)).astype(np.float32)
    busy = 0.0
    for _ in range(3):
        busy += replica(x, np.arange(4, dtype=np.int32), np.zeros(4, dtype=np.int32), np.ones(4, dtype=np.float32))[1]
    replica.warm()
    time.sleep(0.05)
    stats = replica.record_autoscaling_stats()
    assert stats[CALLS] == 4.0  # three calls and the warm-up
    assert 0 < stats[CONCURRENCY] <= busy / 0.05 + 1e-9
    assert replica.record_autoscaling_stats()[CALLS] == 0.0  # each record covers its own interval
