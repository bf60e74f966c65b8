"""Replay windows of expert loads under placement strategies (MoEless, arXiv 2603.06350, evaluation).

Each window w has true loads [L, E] and a placement [L, E, D] decided before it ran. Per layer:
  time = max over devices of their copies' work (latency curves) + dispatch
         (+ the cold start if a new copy was not pre-warmed)
  balancedness = max device tokens / mean device tokens
Copies new on a device relative to the window before are cold starts; per expert, new copies
matched by removed ones count as moved, the rest as created (scale-out). Serverless cost bills each
copy's memory for the windows it is alive plus its warm-up; a static expert-parallel deployment
pays for every device's whole memory all the time.

Strategies (`compare_strategies`): "static" (one copy per expert, fixed blocks: no replication),
"eplb" (EPLB on a moving window of past counts), "moeless_predicted" (MoEless on predicted loads)
and "moeless_oracle" (MoEless on the true loads of the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.moeless.eplb import eplb_phy2log, moving_window_loads
from moeserve.moeless.export import replicas_from_phy2log
from moeserve.moeless.fleet import DeviceFleet, balancedness, device_loads, device_times, static_placement
from moeserve.moeless.planner import plan_moeless


@dataclass(frozen=True, eq=False)
class ReplayResult:
    """Per replayed window and layer ([W, L]) figures of one strategy, plus its serverless cost."""

    name: str
    layer_time_s: np.ndarray
    balancedness: np.ndarray
    replicas_alive: np.ndarray
    replicas_created: np.ndarray
    replicas_moved: np.ndarray
    cold_starts: np.ndarray
    cost: float

    def summary(self) -> dict[str, float]:
        return {
            "moe_time_per_window_s": float(self.layer_time_s.sum(1).mean()),
            "layer_time_s": float(self.layer_time_s.mean()),
            "balancedness": float(self.balancedness.mean()),
            "balancedness_worst": float(self.balancedness.max()),
            "replicas_alive": float(self.replicas_alive.sum(1).mean()),
            "replicas_created": int(self.replicas_created.sum()),
            "replicas_moved": int(self.replicas_moved.sum()),
            "cold_starts": int(self.cold_starts.sum()),
            "cost": self.cost,
        }


def replay(loads: np.ndarray, placements: np.ndarray, fleet: DeviceFleet, window_s: np.ndarray | float,
           initial: np.ndarray, prewarmed: bool = True, name: str = "") -> ReplayResult:
    """Figures of one strategy.

    loads: [W, L, E] true counts; placements: [W, L, E, D]; window_s: [W] or scalar seconds;
    initial: [L, E, D] placement warm before the first window
    """
    num_windows = loads.shape[0]
    if placements.shape[:3] != loads.shape or placements.shape[3] != fleet.num_devices:
        raise MoeServeError("placements must be [windows, layers, experts, devices] matching loads and fleet")
    if initial.shape != placements.shape[1:]:
        raise MoeServeError("the initial placement must be [layers, experts, devices]")
    window_s = np.broadcast_to(np.asarray(window_s, dtype=np.float64), (num_windows,))
    before = np.concatenate([initial[None], placements[:-1]])
    added = np.maximum(placements - before, 0).sum(3)  # [W, L, E]
    removed = np.maximum(before - placements, 0).sum(3)
    moved = np.minimum(added, removed)
    cold = added.sum(2)

    tokens = device_loads(placements, loads)  # [W, L, D]
    busy = device_times(placements, loads, fleet).max(2)
    dispatch = fleet.dispatch_s + fleet.dispatch_per_token_s * tokens.max(2)
    stall = 0.0 if prewarmed else fleet.cold_start_s * (cold > 0)
    alive = placements.sum((2, 3))
    gb_s = (alive.sum(1) * window_s).sum() + cold.sum() * fleet.cold_start_s
    return ReplayResult(
        name=name,
        layer_time_s=busy + dispatch + stall,
        balancedness=balancedness(tokens),
        replicas_alive=alive,
        replicas_created=(added - moved).sum(2),
        replicas_moved=moved.sum(2),
        cold_starts=cold,
        cost=float(gb_s * fleet.expert_gb * fleet.price_per_gb_s),
    )


def static_deployment_cost(fleet: DeviceFleet, total_s: float) -> float:
    """Every device's whole memory, billed for the whole replay."""
    return float(fleet.num_devices * fleet.device_memory_gb * total_s * fleet.price_per_gb_s)


def eplb_schedule(loads: np.ndarray, num_devices: int, extra_replicas: int, windows: np.ndarray,
                  history_window: int = 10, interval: int = 1, num_nodes: int = 1,
                  num_groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """EPLB placements for `windows`, rebalanced every `interval` windows from the counts before.

    loads: [W, L, E] -> placements [len(windows), L, E, D], initial [L, E, D] (EPLB's plan one
    window before the first)
    """
    windows = np.asarray(windows)
    if windows.size == 0 or windows[0] < 2:
        raise MoeServeError("EPLB replay needs at least two windows of history before the first replayed one")
    num_experts = loads.shape[2]

    def plan(w: int) -> np.ndarray:
        window_loads = moving_window_loads(loads[:w], history_window)
        phy2log = eplb_phy2log(window_loads, num_experts + extra_replicas, num_devices, num_nodes, num_groups)
        return replicas_from_phy2log(phy2log, num_experts, num_devices)

    initial = plan(int(windows[0]) - 1)
    out, current = [], None
    for k, w in enumerate(windows):
        if current is None or k % interval == 0:
            current = plan(int(w))
        out.append(current)
    return np.stack(out), initial


def moeless_schedule(signal: np.ndarray, fleet: DeviceFleet, extra_replicas: int, windows: np.ndarray,
                     churn_penalty_s: float = 0.0, **plan_options: object) -> tuple[np.ndarray, np.ndarray]:
    """MoEless placements for `windows`, each planned from signal[w] with the one before it warm.

    signal: [W, L, E] predicted (or, for the oracle, true) loads -> placements [len(windows), L, E, D],
    initial [L, E, D] (the plan for the window before the first)
    """
    windows = np.asarray(windows)
    if windows.size == 0 or windows[0] < 1:
        raise MoeServeError("MoEless replay needs one window before the first replayed one")
    current = plan_moeless(signal[windows[0] - 1], fleet, extra_replicas, **plan_options).replicas
    initial, out = current, []
    for w in windows:
        current = plan_moeless(signal[w], fleet, extra_replicas, previous=current, churn_penalty_s=churn_penalty_s,
                               **plan_options).replicas
        out.append(current)
    return np.stack(out), initial


def compare_strategies(loads: np.ndarray, fleet: DeviceFleet, extra_replicas: int, predicted: np.ndarray,
                       windows: np.ndarray, window_s: np.ndarray | float, history_window: int = 10,
                       churn_penalty_s: float = 0.0, eplb_interval: int = 1,
                       eplb_prewarmed: bool = True) -> dict[str, ReplayResult]:
    """The four strategies on the same windows and fleet.

    loads, predicted: [W, L, E]; windows: replayed window ids (history before them is available);
    window_s: [W] or scalar. MoEless copies are planned ahead from the prediction, so they are
    pre-warmed; `eplb_prewarmed=False` charges EPLB's rebalances a cold start on the critical path.
    """
    windows = np.asarray(windows)
    num_layers, num_experts = loads.shape[1:]
    num_devices = fleet.num_devices
    true = loads[windows]
    seconds = np.broadcast_to(np.asarray(window_s, dtype=np.float64), (loads.shape[0],))[windows]
    static = static_placement(num_layers, num_experts, num_devices)
    results = {"static": replay(true, np.broadcast_to(static, (len(windows),) + static.shape), fleet, seconds,
                                static, name="static")}
    eplb, eplb_initial = eplb_schedule(loads, num_devices, extra_replicas, windows, history_window, eplb_interval)
    results["eplb"] = replay(true, eplb, fleet, seconds, eplb_initial, prewarmed=eplb_prewarmed, name="eplb")
    for name, signal in (("moeless_predicted", predicted), ("moeless_oracle", loads)):
        placed, initial = moeless_schedule(signal, fleet, extra_replicas, windows, churn_penalty_s)
        results[name] = replay(true, placed, fleet, seconds, initial, name=name)
    return results
