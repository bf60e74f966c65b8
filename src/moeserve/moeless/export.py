"""A placement as the static expert location map that EPLB-style engines load.

SGLang and vLLM describe expert placement per layer with three arrays:
  phy2log [layers, physical_slots] int   logical expert held by each physical slot
  log2phy [layers, experts, max_copies] int  physical slots of each expert, padded with -1
  logcnt  [layers, experts] int          copies of each expert
Slot s lives on device s // slots_per_device. Engines expect every slot to hold an expert; a MoEless
placement may leave a device's slots partly empty (no equal-count rule), so empty slots are -1
unless `fill_empty` fills them (see `location_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeserve.errors import MoeServeError


@dataclass(frozen=True, eq=False)
class ExpertLocationMap:
    """phy2log [L, P] int (-1 = empty slot); log2phy [L, E, max_copies] int (-1 padded); logcnt [L, E] int."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    slots_per_device: int

    @property
    def num_devices(self) -> int:
        return self.phy2log.shape[1] // self.slots_per_device

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "num_layers": int(self.phy2log.shape[0]),
            "num_logical_experts": int(self.logcnt.shape[1]),
            "num_physical_experts": int(self.phy2log.shape[1]),
            "num_devices": self.num_devices,
            "slots_per_device": self.slots_per_device,
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
        }


def location_map(replicas: np.ndarray, slots_per_device: int | None = None,
                 previous_phy2log: np.ndarray | None = None, fill_empty: bool = False) -> ExpertLocationMap:
    """Slot-level map of a placement.

    replicas: [L, E, D] int copies of expert e on device d
    slots_per_device: slots per device (default: the most copies any device holds in any layer)
    previous_phy2log: [L, D * slots_per_device] the map now loaded; a copy that stays on its device
        keeps its slot, so engines move only the weights that change
    fill_empty: fill each empty slot with one more copy of an expert whose copies all sit on that
        device already; its tokens then still all land on that device, so device loads are
        unchanged. Raises if a device with empty slots holds no such expert.
    """
    replicas = np.asarray(replicas, dtype=np.int64)
    if replicas.ndim != 3 or (replicas < 0).any():
        raise MoeServeError("replicas must be a non-negative [layers, experts, devices] array")
    num_layers, num_experts, num_devices = replicas.shape
    if (replicas.sum(2) < 1).any():
        raise MoeServeError("every expert needs at least one copy")
    per_device = replicas.sum(1)
    if slots_per_device is None:
        slots_per_device = int(per_device.max())
    if (per_device > slots_per_device).any():
        raise MoeServeError(f"a device holds {int(per_device.max())} copies but has {slots_per_device} slots")
    num_slots = num_devices * slots_per_device
    if previous_phy2log is not None and previous_phy2log.shape != (num_layers, num_slots):
        raise MoeServeError(f"previous map must be [{num_layers}, {num_slots}]")

    phy2log = np.full((num_layers, num_slots), -1, dtype=np.int64)
    for layer in range(num_layers):
        for device in range(num_devices):
            lo = device * slots_per_device
            want = replicas[layer, :, device].copy()
            slots = phy2log[layer, lo:lo + slots_per_device]
            if previous_phy2log is not None:
                for k, expert in enumerate(previous_phy2log[layer, lo:lo + slots_per_device]):
                    if expert >= 0 and want[expert] > 0:
                        slots[k] = expert
                        want[expert] -= 1
            newcomers = np.repeat(np.arange(num_experts), want)
            slots[np.flatnonzero(slots < 0)[:len(newcomers)]] = newcomers
            if fill_empty and (slots < 0).any():
                own = np.flatnonzero(replicas[layer, :, device] == replicas[layer].sum(1))
                own = own[replicas[layer, own, device] > 0]
                if own.size == 0:
                    raise MoeServeError(
                        f"layer {layer} device {device}: no expert lives only there to fill its empty slots")
                empty = np.flatnonzero(slots < 0)
                slots[empty] = own[np.arange(len(empty)) % len(own)]
    return _from_phy2log(phy2log, num_experts, slots_per_device)


def location_map_from_phy2log(phy2log: np.ndarray, num_experts: int, num_devices: int) -> ExpertLocationMap:
    """Complete a bare phy2log (EPLB's output) with log2phy and logcnt."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    if phy2log.shape[1] % num_devices:
        raise MoeServeError(f"{phy2log.shape[1]} slots do not split over {num_devices} devices")
    return _from_phy2log(phy2log, num_experts, phy2log.shape[1] // num_devices)


def replicas_from_phy2log(phy2log: np.ndarray, num_experts: int, num_devices: int) -> np.ndarray:
    """Copies per expert and device. phy2log [L, P] (-1 = empty) -> replicas [L, E, D] int."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    num_layers, num_slots = phy2log.shape
    if num_slots % num_devices:
        raise MoeServeError(f"{num_slots} slots do not split over {num_devices} devices")
    if phy2log.max() >= num_experts or phy2log.min() < -1:
        raise MoeServeError(f"phy2log holds ids outside [-1, {num_experts})")
    device = np.broadcast_to(np.arange(num_slots) // (num_slots // num_devices), phy2log.shape)
    layer = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    used = phy2log >= 0
    replicas = np.zeros((num_layers, num_experts, num_devices), dtype=np.int64)
    np.add.at(replicas, (layer[used], phy2log[used], device[used]), 1)
    return replicas


def _from_phy2log(phy2log: np.ndarray, num_experts: int, slots_per_device: int) -> ExpertLocationMap:
    num_layers, num_slots = phy2log.shape
    used = phy2log >= 0
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    layer = np.broadcast_to(np.arange(num_layers)[:, None], phy2log.shape)
    np.add.at(logcnt, (layer[used], phy2log[used]), 1)
    log2phy = np.full((num_layers, num_experts, max(int(logcnt.max()), 1)), -1, dtype=np.int64)
    # Slots in ascending order; an expert's k-th slot goes to column k.
    order = np.lexsort((np.broadcast_to(np.arange(num_slots), phy2log.shape)[used], phy2log[used], layer[used]))
    slot = np.broadcast_to(np.arange(num_slots), phy2log.shape)[used][order]
    lay, exp = layer[used][order], phy2log[used][order]
    start = np.cumsum(logcnt.reshape(-1)) - logcnt.reshape(-1)
    column = np.arange(len(slot)) - start[lay * num_experts + exp]
    log2phy[lay, exp, column] = slot
    return ExpertLocationMap(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, slots_per_device=slots_per_device)
