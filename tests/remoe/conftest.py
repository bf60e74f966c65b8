from __future__ import annotations

import pytest

from moeserve.pricing.profiles import load_pricing
from moeserve.remoe.cost import CostModel
from moeserve.remoe.inputs import PlanModel
from moeserve.remoe.synthetic import example_hardware, synthetic_trace
from moeserve.units import GIB, MIB


@pytest.fixture(scope="session")
def small_geometry() -> PlanModel:
    return PlanModel(
        layers=6,
        experts=24,
        top_k=4,
        expert_bytes=40 * MIB,
        non_expert_bytes=2 * GIB,
        hidden_bytes_per_token=4096,
    )


@pytest.fixture(scope="session")
def small_model(small_geometry) -> CostModel:
    return CostModel.build(
        small_geometry, example_hardware(40.0), load_pricing("aws-lambda-x86", "paper-gpu-3x")
    )


@pytest.fixture(scope="session")
def small_trace(small_geometry):
    return synthetic_trace(400, small_geometry.layers, small_geometry.experts, dim=32, seed=3)
