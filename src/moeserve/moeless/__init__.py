"""MoEless (arXiv 2603.06350): layer-aware expert-load prediction, straggler scaling and placement,
with DeepSeek's EPLB algorithm as the reference and a replay simulator. Design: docs/moeless.md."""

from moeserve.moeless.eplb import eplb_phy2log, moving_window_loads
from moeserve.moeless.export import (
    ExpertLocationMap,
    location_map,
    location_map_from_phy2log,
    replicas_from_phy2log,
)
from moeserve.moeless.fleet import (
    DeviceFleet,
    balancedness,
    device_loads,
    device_times,
    static_placement,
    uniform_fleet,
)
from moeserve.moeless.loads import loads_from_routing, windows_from_arrivals
from moeserve.moeless.placement import new_copies, place_replicas
from moeserve.moeless.planner import MoelessPlan, plan_moeless, plan_moeless_hierarchical
from moeserve.moeless.predictors import (
    LoadPredictor,
    PredictionScores,
    fit_load_predictor,
    predict_loads,
    score_predictions,
)
from moeserve.moeless.scaling import detect_stragglers, replicas_under_budget, replicas_under_target
from moeserve.moeless.simulator import ReplayResult, compare_strategies, replay, static_deployment_cost
from moeserve.moeless.synthetic import zipf_drift_loads, zipf_drift_routing

__all__ = [
    "DeviceFleet", "ExpertLocationMap", "LoadPredictor", "MoelessPlan", "PredictionScores", "ReplayResult",
    "balancedness", "compare_strategies", "detect_stragglers", "device_loads", "device_times", "eplb_phy2log",
    "fit_load_predictor", "loads_from_routing", "location_map", "location_map_from_phy2log",
    "moving_window_loads", "new_copies", "place_replicas", "plan_moeless", "plan_moeless_hierarchical", "predict_loads", "replay",
    "replicas_from_phy2log", "replicas_under_budget", "replicas_under_target", "score_predictions",
    "static_deployment_cost", "static_placement", "uniform_fleet", "windows_from_arrivals",
    "zipf_drift_loads", "zipf_drift_routing",
]
