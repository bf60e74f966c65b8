import json

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.moeless.eplb import eplb_phy2log
from moeserve.moeless.export import location_map, location_map_from_phy2log, replicas_from_phy2log
from moeserve.moeless.fleet import device_loads, uniform_fleet
from moeserve.moeless.planner import plan_moeless


def check_consistent(m, num_experts):
    layers = m.phy2log.shape[0]
    np.testing.assert_array_equal(m.logcnt, (m.phy2log[:, :, None] == np.arange(num_experts)).sum(1))
    for layer in range(layers):
        for expert in range(num_experts):
            slots = m.log2phy[layer, expert]
            live = slots[slots >= 0]
            assert len(live) == m.logcnt[layer, expert]
            assert (np.diff(live) > 0).all()
            assert (m.phy2log[layer, live] == expert).all()
            assert (slots[len(live):] == -1).all()


def planned(seed):
    rng = np.random.default_rng(seed)
    loads = rng.gamma(0.3, 100, size=(3, 16))
    return loads, plan_moeless(loads, uniform_fleet(4, 7), extra_replicas=6).replicas


def test_round_trip_and_consistency():
    loads, replicas = planned(0)
    m = location_map(replicas, slots_per_device=7)
    assert m.phy2log.shape == (3, 28)
    np.testing.assert_array_equal(replicas_from_phy2log(m.phy2log, 16, 4), replicas)
    np.testing.assert_array_equal(m.logcnt, replicas.sum(2))
    check_consistent(m, 16)
    payload = json.loads(json.dumps(m.to_json_dict()))
    assert payload["num_physical_experts"] == 28 and payload["slots_per_device"] == 7
    np.testing.assert_array_equal(np.array(payload["phy2log"]), m.phy2log)


def test_eplb_output_is_consistent():
    loads = np.random.default_rng(1).gamma(0.3, 100, size=(3, 16))
    phy2log = eplb_phy2log(loads, 24, 4)
    m = location_map_from_phy2log(phy2log, 16, 4)
    check_consistent(m, 16)
    assert (m.phy2log >= 0).all() and m.slots_per_device == 6


def test_previous_map_keeps_slots_of_staying_copies():
    _, first = planned(2)
    _, second = planned(3)
    old = location_map(first, slots_per_device=7)
    new = location_map(second, slots_per_device=7, previous_phy2log=old.phy2log)
    np.testing.assert_array_equal(replicas_from_phy2log(new.phy2log, 16, 4), second)
    keepable = 0
    for layer in range(3):
        for slot, expert in enumerate(old.phy2log[layer]):
            device = slot // 7
            if expert >= 0 and second[layer, expert, device] >= first[layer, expert, device]:
                keepable += 1
                assert new.phy2log[layer, slot] == expert
    assert keepable > 0


def test_fill_empty_keeps_device_loads():
    loads, replicas = planned(4)
    m = location_map(replicas, slots_per_device=8, fill_empty=True)
    assert (m.phy2log >= 0).all()
    check_consistent(m, 16)
    filled = replicas_from_phy2log(m.phy2log, 16, 4)
    np.testing.assert_allclose(device_loads(filled, loads), device_loads(replicas, loads))


def test_rejects_overfull_devices():
    _, replicas = planned(5)
    with pytest.raises(MoeServeError):
        location_map(replicas, slots_per_device=int(replicas.sum(1).max()) - 1)
