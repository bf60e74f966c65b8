"""One MoEless planning step: scale the stragglers, then place the copies (arXiv 2603.06350).

Per layer: copies per expert from `scaling` (the heaviest copy as light as the budget allows, or the
fewest copies under a straggler threshold), then `placement` onto devices with capacities and
latency curves, warm copies preferred. Re-run every window with predicted loads; pass the previous
placement so that the churn penalty keeps it stable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.defaults import STRAGGLER_THRESHOLD
from moeserve.errors import MoeServeError
from moeserve.moeless.eplb import experts_of_nodes
from moeserve.moeless.fleet import DeviceFleet, device_times
from moeserve.moeless.placement import place_replicas
from moeserve.moeless.scaling import detect_stragglers, replicas_under_budget, replicas_under_target


@dataclass(frozen=True, eq=False)
class MoelessPlan:
    """replicas [L, E, D] int; copies [L, E] int; stragglers [L, E] bool; device_time_s [L, D] (planned loads)."""

    replicas: np.ndarray
    copies: np.ndarray
    stragglers: np.ndarray
    device_time_s: np.ndarray


def plan_moeless(loads: np.ndarray, fleet: DeviceFleet, extra_replicas: int, previous: np.ndarray | None = None,
                 churn_penalty_s: float = 0.0, straggler_threshold: float = STRAGGLER_THRESHOLD,
                 scale_stragglers_only: bool = False) -> MoelessPlan:
    """Plan copies and their devices for every layer.

    loads: [L, E] float, the loads to plan for (predicted, or true for the oracle)
    extra_replicas: copies per layer beyond one per expert (the replica budget)
    scale_stragglers_only: spend only what it takes to bring every copy under
        `straggler_threshold` x the layer mean (the cost-saving mode), never more than the budget
    previous: [L, E, D] placement now warm, or None
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2:
        raise MoeServeError("loads must be [layers, experts]")
    if extra_replicas < 0:
        raise MoeServeError(f"the replica budget must be >= 0, got {extra_replicas}")
    num_experts = loads.shape[1]
    slots = int(fleet.capacity_experts.sum())
    budget = min(num_experts + extra_replicas, slots)
    copies = replicas_under_budget(loads, budget)
    if scale_stragglers_only:
        target = straggler_threshold * loads.mean(1, keepdims=True)
        fewest = replicas_under_target(loads, np.maximum(target, 1e-12))
        within_budget = fewest.sum(1) <= budget
        copies = np.where(within_budget[:, None], fewest, copies)
    replicas = place_replicas(loads, copies, fleet, previous=previous, churn_penalty_s=churn_penalty_s)
    return MoelessPlan(
        replicas=replicas,
        copies=copies,
        stragglers=detect_stragglers(loads, straggler_threshold),
        device_time_s=device_times(replicas, loads, fleet),
    )


def plan_moeless_hierarchical(loads: np.ndarray, fleet: DeviceFleet, extra_replicas: int, num_nodes: int,
                              num_groups: int, straggler_threshold: float = STRAGGLER_THRESHOLD) -> MoelessPlan:
    """Node-first MoEless, the counterpart of EPLB's hierarchical mode: whole expert groups go to nodes exactly
    as EPLB packs them (equal groups per node, `eplb.experts_of_nodes`), so a token's experts stay in few
    nodes; then each node runs `plan_moeless` on its experts, its devices (device d is on node
    d // (D / nodes)) and its share of the budget, (E + extra) / nodes slots. Within a node the copies
    and the equal-share seed match EPLB's, so every node's busiest device is no busier than under EPLB.

    loads: [L, E] float -> MoelessPlan with replicas [L, E, D]
    """
    loads = np.asarray(loads, dtype=np.float64)
    num_layers, num_experts = loads.shape
    devices = fleet.num_devices
    slots = num_experts + extra_replicas
    if num_nodes < 1 or devices % num_nodes or num_groups % num_nodes or num_experts % num_groups \
            or slots % num_nodes:
        raise MoeServeError(f"hierarchical MoEless needs devices ({devices}), groups ({num_groups}) and slots "
                            f"({slots}) divisible by nodes ({num_nodes}), and experts ({num_experts}) by groups")
    node_experts = experts_of_nodes(loads, num_nodes, num_groups)  # [L, N, E / N]
    per_node = devices // num_nodes
    extra_per_node = slots // num_nodes - num_experts // num_nodes
    replicas = np.zeros((num_layers, num_experts, devices), dtype=np.int64)
    layer = np.arange(num_layers)[:, None, None]
    for node in range(num_nodes):
        mine = slice(node * per_node, (node + 1) * per_node)
        sub = DeviceFleet(fleet.capacity_experts[mine], fleet.fixed_s[mine], fleet.per_token_s[mine])
        experts = node_experts[:, node, :]
        plan = plan_moeless(np.take_along_axis(loads, experts, axis=1), sub, extra_per_node,
                            straggler_threshold=straggler_threshold)
        replicas[layer, experts[..., None], np.arange(mine.start, mine.stop)[None, None, :]] = plan.replicas
    return MoelessPlan(
        replicas=replicas,
        copies=replicas.sum(2),
        stragglers=detect_stragglers(loads, straggler_threshold),
        device_time_s=device_times(replicas, loads, fleet),
    )
