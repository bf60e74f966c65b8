import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.eplb import eplb_phy2log, moving_window_loads, pack_equal_count, replicate_heaviest
from moeserve.moeless.export import replicas_from_phy2log
from moeserve.moeless.fleet import device_loads
from moeserve.moeless.scaling import max_copy_load, replicas_under_budget


def test_pack_equal_count_by_hand():
    weights = np.array([[5.0, 4, 3, 2, 1, 1]])
    bins, position = pack_equal_count(weights, 2)
    # 5->0, 4->1, 3->1 (4 < 5), 2->0 (5 < 7), 1->0 (tie goes to bin 0), 1->1 (bin 0 is full)
    np.testing.assert_array_equal(bins, [[0, 1, 1, 0, 0, 1]])
    np.testing.assert_array_equal(position, [[0, 0, 1, 1, 2, 2]])


def test_eplb_by_hand():
    loads = np.array([[10.0, 2, 2, 2]])
    phy2log = eplb_phy2log(loads, num_slots=6, num_devices=2)
    replicas = replicas_from_phy2log(phy2log, 4, 2)
    np.testing.assert_array_equal(replicas.sum(2), [[3, 1, 1, 1]])
    # copies of 10/3 go 0, 1, 0; then the 2s go 1, 1, 0
    np.testing.assert_allclose(device_loads(replicas, loads), [[20 / 3 + 2, 10 / 3 + 4]])


@pytest.mark.parametrize("seed", range(6))
def test_eplb_properties(seed):
    rng = np.random.default_rng(seed)
    num_layers, num_experts, num_devices = 5, 32, 8
    num_slots = num_experts + 8 * int(rng.integers(0, 3))
    loads = rng.gamma(0.3, 50, size=(num_layers, num_experts))
    phy2log = eplb_phy2log(loads, num_slots, num_devices)
    assert phy2log.shape == (num_layers, num_slots)
    replicas = replicas_from_phy2log(phy2log, num_experts, num_devices)
    assert (replicas.sum(1) == num_slots // num_devices).all()  # equal count per device
    assert (replicas.sum((1, 2)) == num_slots).all()  # budget spent exactly
    assert (replicas.sum(2) >= 1).all()  # every expert kept
    # Its replication step is the optimal greedy rule.
    _, copies = replicate_heaviest(loads, num_slots)
    np.testing.assert_array_equal(copies, replicas.sum(2))
    np.testing.assert_allclose(max_copy_load(loads, copies), max_copy_load(loads, replicas_under_budget(loads, num_slots)))


def test_hierarchical_keeps_groups_whole_on_nodes():
    rng = np.random.default_rng(3)
    num_experts, num_groups, num_nodes, num_devices, num_slots = 32, 8, 2, 8, 48
    loads = rng.gamma(0.3, 50, size=(4, num_experts))
    phy2log = eplb_phy2log(loads, num_slots, num_devices, num_nodes=num_nodes, num_groups=num_groups)
    replicas = replicas_from_phy2log(phy2log, num_experts, num_devices)
    assert (replicas.sum(1) == num_slots // num_devices).all()
    assert (replicas.sum(2) >= 1).all()
    node_of_device = np.arange(num_devices) // (num_devices // num_nodes)
    for layer in range(4):
        for group in range(num_groups):
            members = replicas[layer, group * 4:(group + 1) * 4].sum(0)
            assert len(set(node_of_device[members > 0])) == 1
        per_node = np.stack([replicas[layer][:, node_of_device == n].sum(1) for n in range(num_nodes)])
        assert (per_node.sum(1) == num_slots // num_nodes).all()


def test_moving_window_and_bad_shapes():
    history = np.arange(24, dtype=float).reshape(3, 2, 4)
    np.testing.assert_array_equal(moving_window_loads(history, 2), history[1] + history[2])
    with pytest.raises(MoeServeError):
        moving_window_loads(history[:0], 2)
    with pytest.raises(MoeServeError):
        eplb_phy2log(np.ones((1, 8)), num_slots=10, num_devices=4)
