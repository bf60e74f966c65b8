from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.pricing.profiles import CpuFunctionPricing
from moeserve.remoe.remote_memory import (
    MemoryProblem,
    RemoteLatencyCurve,
    dual_value,
    fit_remote_latency,
    solve_memory,
)

CURVE = RemoteLatencyCurve(4e-3, 1 / 1500, 3e-4)
PRICE = CpuFunctionPricing(1.6e-5, 2e-7, 128, 10240, 1, 1769, 6 << 20, 0.0, "test")


def problem(lower=3000.0, budget=0.0091, main=1e-5) -> MemoryProblem:
    return MemoryProblem(
        curve=CURVE,
        usd_per_mb_second=1.6e-5 / 1024,
        work=np.array([500.0, 300.0]),
        billed_fixed_s=np.array([0.05, 0.03]),
        main_usd_per_s=main,
        steps=100,
        prefill_local_s=np.array([0.01, 0.01]),
        prefill_fixed_s=np.array([[0.005, -np.inf], [0.005, 0.006]]),
        prefill_tokens=np.array([[300.0, 0.0], [120.0, 80.0]]),
        decode_local_s=np.array([0.002, 0.002]),
        decode_fixed_s=np.array([0.004, 0.004]),
        decode_tokens=np.array([2.0, 1.0]),
        tpot_budget_s=budget,
        lower_mb=np.array([lower, lower]),
        upper_mb=10240.0,
    )


def grid_optimum(p: MemoryProblem, step: float = 4.0) -> float:
    ys = np.arange(p.lower_mb[0], p.upper_mb + 1e-9, step)
    cost = p.cost(np.stack([ys, ys]))  # [2, G]
    decode = p.decode_s(np.stack([ys, ys]))
    total = cost[0][:, None] + cost[1][None, :]
    feasible = decode[0][:, None] + decode[1][None, :] <= p.tpot_budget_s
    return float(total[feasible].min())


def test_fit_recovers_the_curve_and_rejects_bad_samples():
    y = np.array([128.0, 512, 1024, 1769, 3008, 5000, 7076, 10240])
    fit = fit_remote_latency(y, CURVE(y))
    assert (fit.theta1, fit.theta2, fit.theta3) == pytest.approx(
        (CURVE.theta1, CURVE.theta2, CURVE.theta3), rel=1e-4
    )
    noisy = CURVE(y) * (1 + 0.02 * np.random.default_rng(0).standard_normal(y.size))
    assert np.max(np.abs(fit_remote_latency(y, noisy)(y) / CURVE(y) - 1)) < 0.05
    flat = fit_remote_latency(y, np.full(y.size, 0.002))
    assert flat.theta1 == 0.0 and flat.theta3 == pytest.approx(0.002)
    with pytest.raises(MoeServeError):
        fit_remote_latency(y[:2], CURVE(y[:2]))
    with pytest.raises(MoeServeError):
        fit_remote_latency(y, -CURVE(y))


@pytest.mark.parametrize("budget", [0.0091, 0.0092, 0.0200])
def test_dual_matches_grid_search_in_the_convex_case(budget):
    p = problem(lower=3000.0, budget=budget)
    assert p.convex_layers().all()
    sol = solve_memory(p, PRICE)
    best = grid_optimum(p)
    assert p.decode_s(sol.memory_mb[:, None].astype(float))[:, 0].sum() <= budget + 1e-12
    assert sol.cost <= best * (1 + 1e-4)  # rounding up to 1 MB steps loses at most ~1e-5 here
    assert sol.cost >= best * (1 - 1e-3)
    assert sol.dual_value <= sol.relaxed_cost + 1e-12  # weak duality
    assert sol.relaxed_cost - sol.dual_value <= 1e-6 * sol.relaxed_cost  # no gap when convex
    if budget > 0.015:
        assert sol.multiplier == 0.0  # TPOT not binding
    else:
        assert sol.multiplier > 0 and dual_value(p, sol.multiplier) == pytest.approx(sol.dual_value)


def test_non_convex_region_is_reported_and_still_solved():
    p = problem(lower=256.0, budget=0.0091)
    assert not p.convex_layers().any()
    assert CURVE.convex_from_mb == pytest.approx(3000.0)
    sol = solve_memory(p, PRICE)
    assert not sol.convex.any()
    assert sol.cost <= grid_optimum(p) * (1 + 1e-4)


def test_theorem_two_threshold_is_where_memory_cost_turns_convex():
    p = problem(lower=128.0, main=0.0)  # remote billing only: F = c y (W T(y) + O)
    ys = np.arange(200.0, 10000.0, 10.0)
    second = np.diff(p.cost(np.stack([ys, ys]))[0], 2)
    centre = ys[1:-1]
    assert np.all(second[centre > 3000 + 20] > 0)
    assert np.all(second[centre < 3000 - 20] < 0)


def test_infeasible_tpot_and_rounding_to_the_step():
    with pytest.raises(MoeServeError, match="TPOT SLO infeasible"):
        solve_memory(problem(budget=0.008), PRICE)
    with pytest.raises(MoeServeError, match="above the function maximum"):
        solve_memory(problem(lower=20000.0), PRICE)
    coarse = dataclasses.replace(PRICE, memory_step_mb=64)
    p = problem(budget=0.0091)
    sol = solve_memory(p, coarse)
    assert np.all((sol.memory_mb - 128) % 64 == 0)
    assert p.decode_s(sol.memory_mb[:, None].astype(float))[:, 0].sum() <= p.tpot_budget_s
