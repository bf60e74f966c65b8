"""Node-first MoEless against EPLB's hierarchical mode: same loads, slots and budget."""

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.eplb import eplb_phy2log, experts_of_nodes
from moeserve.moeless.export import replicas_from_phy2log
from moeserve.moeless.fleet import balancedness, device_loads, uniform_fleet
from moeserve.moeless.planner import plan_moeless_hierarchical


@pytest.mark.parametrize("seed", range(8))
def test_hierarchical_never_less_balanced_than_eplb_hierarchical(seed):
    rng = np.random.default_rng(seed)
    layers, experts, devices, nodes, groups = 4, 32, 8, 2, 8
    extra = devices * int(rng.integers(0, 3))
    loads = rng.gamma(0.4, 60, size=(layers, experts))
    fleet = uniform_fleet(devices, (experts + extra) // devices, fixed_s=0.0, per_token_s=1.0)  # EPLB's slots
    plan = plan_moeless_hierarchical(loads, fleet, extra, nodes, groups)
    eplb = replicas_from_phy2log(eplb_phy2log(loads, experts + extra, devices, nodes, groups), experts, devices)
    ours, theirs = balancedness(device_loads(plan.replicas, loads)), balancedness(device_loads(eplb, loads))
    assert (ours <= theirs + 1e-9).all()
    assert (plan.replicas.sum(1) <= fleet.capacity_experts).all()  # within EPLB's slots per device
    assert (plan.replicas.sum((1, 2)) <= experts + extra).all() and (plan.replicas.sum(2) >= 1).all()
    # node-first: every group of consecutive experts lives on one node, the node EPLB gives it
    node_of_device = np.arange(devices) // (devices // nodes)
    hosts = experts_of_nodes(loads, nodes, groups)
    for layer in range(layers):
        for node in range(nodes):
            on = plan.replicas[layer][hosts[layer, node]]  # [E / nodes, D]
            assert on[:, node_of_device != node].sum() == 0 and (on.sum(1) >= 1).all()


def test_hierarchical_checks_its_split():
    fleet = uniform_fleet(6, 6)
    with pytest.raises(MoeServeError, match="divisible by nodes"):
        plan_moeless_hierarchical(np.ones((1, 32)), fleet, 4, 4, 8)
