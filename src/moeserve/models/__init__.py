"""Model adapters: find and describe the MoE structure of any transformers v5 MoE causal LM."""

from moeserve.models.adapter import (
    ExpertLayout,
    ExpertWeights,
    MoELayer,
    expert_forward,
    expert_weights,
    moe_layers,
    require_moe_layers,
    route,
    routed_forward,
    shared_forward,
)
from moeserve.models.geometry import ModelGeometry, geometry_of, inspect_model
from moeserve.models.loading import load_model, load_tokenizer, resolve_device, resolve_model_path
from moeserve.models.routing import RoutingRule, routing_rule

__all__ = [
    "ExpertLayout", "ExpertWeights", "MoELayer", "ModelGeometry", "RoutingRule", "expert_forward",
    "expert_weights", "geometry_of", "inspect_model", "load_model", "load_tokenizer", "moe_layers",
    "require_moe_layers", "resolve_device", "resolve_model_path", "route", "routed_forward", "routing_rule",
    "shared_forward",
]
