"""The EPLB algorithm (DeepSeek's expert-parallel load balancer, as SGLang and vLLM run it).

Written from its public description, as the reference MoEless must beat:
1. replication: while physical slots remain, give one more copy to the expert whose load per copy is
   highest;
2. packing: sort copies heaviest first (a copy carries load / copies) and put each on the least
   loaded device that still has a free slot; every device gets the same number of slots;
3. hierarchical variant: first pack groups of experts onto nodes (equal groups per node), then do 1
   and 2 inside each node, so that most traffic stays within a node;
4. the load it balances is a moving window of past token counts (`moving_window_loads`).
Output is `phy2log [layers, slots]`: slot s lives on device s // (slots / devices).
"""

from __future__ import annotations

import numpy as np

from moeserve.errors import MoeServeError


def moving_window_loads(history: np.ndarray, window: int) -> np.ndarray:
    """Sum of the last `window` windows of counts. history: [windows, L, E] -> [L, E]."""
    if history.shape[0] == 0:
        raise MoeServeError("EPLB needs at least one past window of expert counts")
    return history[-window:].sum(0).astype(np.float64)


def replicate_heaviest(loads: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: one copy per expert, then extra copies to the heaviest load per copy.

    loads: [rows, E] float -> slot_expert [rows, num_slots] int, copies [rows, E] int
    """
    rows, num_experts = loads.shape
    if num_slots < num_experts:
        raise MoeServeError(f"{num_slots} slots cannot hold {num_experts} experts")
    slot_expert = np.empty((rows, num_slots), dtype=np.int64)
    slot_expert[:, :num_experts] = np.arange(num_experts)
    copies = np.ones((rows, num_experts), dtype=np.int64)
    row = np.arange(rows)
    for slot in range(num_experts, num_slots):
        heaviest = np.argmax(loads / copies, axis=1)
        slot_expert[:, slot] = heaviest
        copies[row, heaviest] += 1
    return slot_expert, copies


def pack_equal_count(weights: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: heaviest item first onto the lightest bin with room; every bin gets N / bins items.

    weights: [rows, N] float -> bin_of_item [rows, N] int, position_in_bin [rows, N] int
    """
    rows, num_items = weights.shape
    if num_items % num_bins:
        raise MoeServeError(f"{num_items} items do not split evenly over {num_bins} bins")
    per_bin = num_items // num_bins
    order = np.argsort(-weights, axis=1, kind="stable")
    bin_load = np.zeros((rows, num_bins))
    bin_fill = np.zeros((rows, num_bins), dtype=np.int64)
    bin_of_item = np.empty((rows, num_items), dtype=np.int64)
    position = np.empty((rows, num_items), dtype=np.int64)
    row = np.arange(rows)
    for rank in range(num_items):
        item = order[:, rank]
        chosen = np.argmin(np.where(bin_fill < per_bin, bin_load, np.inf), axis=1)
        bin_of_item[row, item] = chosen
        position[row, item] = bin_fill[row, chosen]
        bin_load[row, chosen] += weights[row, item]
        bin_fill[row, chosen] += 1
    return bin_of_item, position


def experts_of_nodes(loads: np.ndarray, num_nodes: int, num_groups: int) -> np.ndarray:
    """Step 3's first half: whole groups of consecutive experts packed onto nodes, equal groups per node.

    loads: [L, E] float -> node_experts [L, nodes, E / nodes] int, the experts node n hosts in layer l
    """
    num_layers, num_experts = loads.shape
    experts_per_group = num_experts // num_groups
    group_loads = loads.reshape(num_layers, num_groups, experts_per_group).sum(-1)
    node_of_group, pos_of_group = pack_equal_count(group_loads, num_nodes)
    groups_per_node = num_groups // num_nodes
    node_groups = np.empty((num_layers, num_nodes, groups_per_node), dtype=np.int64)
    layer = np.arange(num_layers)[:, None]
    node_groups[layer, node_of_group, pos_of_group] = np.arange(num_groups)[None, :]
    return (node_groups[..., None] * experts_per_group + np.arange(experts_per_group)).reshape(
        num_layers, num_nodes, num_experts // num_nodes)


def eplb_phy2log(loads: np.ndarray, num_slots: int, num_devices: int, num_nodes: int = 1,
                 num_groups: int = 1) -> np.ndarray:
    """The EPLB placement of `num_slots` physical experts on `num_devices` devices.

    loads: [L, E] float (counts in the moving window) -> phy2log [L, num_slots] int
    With num_nodes > 1 (and num_groups a multiple of it) the hierarchical variant runs; otherwise
    all devices form one node, as EPLB's global policy does.
    """
    num_layers, num_experts = loads.shape
    if num_groups % num_nodes or num_experts % num_groups:
        num_nodes, num_groups = 1, 1
    if num_slots % num_devices or num_devices % num_nodes or num_slots < num_experts:
        raise MoeServeError(
            f"EPLB needs slots ({num_slots}) divisible by devices ({num_devices}), devices by nodes "
            f"({num_nodes}) and at least one slot per expert ({num_experts})")
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_slots // num_nodes
    devices_per_node = num_devices // num_nodes
    slots_per_device = num_slots // num_devices
    if slots_per_node < experts_per_node:
        raise MoeServeError("each node needs at least one slot per expert it hosts")

    node_experts = experts_of_nodes(loads, num_nodes, num_groups)

    # Inside each node: replicate onto its slots, then pack the copies onto its devices.
    node_loads = np.take_along_axis(loads[:, None, :].repeat(num_nodes, 1), node_experts, axis=2)
    rows = num_layers * num_nodes
    slot_local, copies = replicate_heaviest(node_loads.reshape(rows, experts_per_node), slots_per_node)
    copy_weight = np.take_along_axis(node_loads.reshape(rows, -1) / copies, slot_local, axis=1)
    device_of_copy, pos_in_device = pack_equal_count(copy_weight, devices_per_node)

    local_phy = np.empty((rows, slots_per_node), dtype=np.int64)
    row = np.arange(rows)[:, None]
    local_phy[row, device_of_copy * slots_per_device + pos_in_device] = slot_local
    logical = np.take_along_axis(node_experts.reshape(rows, experts_per_node), local_phy, axis=1)
    return logical.reshape(num_layers, num_slots)
