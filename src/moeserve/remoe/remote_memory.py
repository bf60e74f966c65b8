"""Remote function memory sizing [IV-D]: fit T_rem(y), solve the relaxed problem by its Lagrangian dual, round.

T_rem(y) = theta1 * exp(-theta2 * y) + theta3 is the time of one token through one expert in a remote
function with y MB (vCPUs grow with memory). Per layer l with remote memory y_l the request costs

    F_l(y) = c * y * (W_l * T(y) + O_l) + p_main * (P_l(y) + steps * D_l(y))

(c: CPU price per MB-second; the relaxed billing rule of pricing/billing.py, W_l: remote token-expert pairs per request, O_l: billed invocation
overhead, p_main: the main function's price per second, P_l / D_l: the layer's prefill / decode
time, each a max of a local time and affine-in-T remote times). The TPOT SLO couples the layers:

    minimise sum_l F_l(y_l)  s.t.  sum_l D_l(y_l) <= budget,  lower_l <= y_l <= upper.

For a multiplier lam the Lagrangian separates into 1-D problems min_y F_l(y) + lam * D_l(y); the dual
is maximised by bisection on lam, since sum_l D_l(y_l(lam)) does not increase with lam.

Convexity (our statement of the paper's Theorem 2): with theta1 > 0 and theta2 > 0, T is decreasing and
convex, so P_l and D_l are convex; d2/dy2 [y T(y)] = theta1 theta2 exp(-theta2 y) (theta2 y - 2), so
F_l is convex on [lower_l, upper] iff W_l = 0 or lower_l >= 2 / theta2. Below 2 / theta2 the memory
cost of y * T(y) is concave; we still minimise each 1-D problem globally on a grid plus local
refinement, but strong duality is no longer guaranteed and the report gives the duality gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.pricing.profiles import CpuFunctionPricing


@dataclass(frozen=True)
class RemoteLatencyCurve:
    """T_rem(y) = theta1 * exp(-theta2 * y) + theta3 seconds per token per expert, y in MB."""

    theta1: float
    theta2: float
    theta3: float

    def __call__(self, memory_mb: np.ndarray | float) -> np.ndarray:
        y = np.asarray(memory_mb, dtype=np.float64)
        return self.theta1 * np.exp(-self.theta2 * y) + self.theta3

    @property
    def convex_from_mb(self) -> float:
        """y * T(y) is convex for y >= 2 / theta2 (everywhere when theta1 == 0)."""
        return 0.0 if self.theta1 == 0 else (2.0 / self.theta2 if self.theta2 > 0 else math.inf)


def fit_remote_latency(memory_mb: np.ndarray, seconds: np.ndarray) -> RemoteLatencyCurve:
    """Least-squares fit of T_rem in relative error: linear in (theta1, theta3) for a fixed theta2,
    which is searched on a log grid and refined by golden section (variable projection)."""
    y = np.asarray(memory_mb, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if y.shape != t.shape or y.size < 3 or np.any(y <= 0) or np.any(t <= 0) or not np.all(np.isfinite(t)):
        raise MoeServeError("remote latency fit needs >= 3 positive (memory MB, seconds) samples")
    w = 1.0 / t

    def solve(theta2: float) -> tuple[float, float, float]:
        e = np.exp(-theta2 * y)
        best = (np.inf, 0.0, float(np.average(t, weights=w**2)))
        # simplest model first: a richer one must fit clearly better, so that a flat curve gets
        # theta1 == 0 exactly instead of a collinear 1e-18 from (exp(-theta2 y), 1) at tiny theta2
        for use1, use3 in ((False, True), (True, False), (True, True)):
            cols = [c for c, used in ((e, use1), (np.ones_like(y), use3)) if used]
            a = np.stack(cols, axis=1) * w[:, None]
            coef, *_ = np.linalg.lstsq(a, t * w, rcond=None)
            if np.any(coef < 0):
                continue
            th1 = float(coef[0]) if use1 else 0.0
            th3 = float(coef[-1]) if use3 else 0.0
            err = float(np.sum(((th1 * e + th3 - t) * w) ** 2))
            if err < best[0] * (1 - 1e-9) - 1e-24:
                best = (err, th1, th3)
        return best

    span = y.max() - y.min() if y.max() > y.min() else y.max()
    grid = np.geomspace(0.01 / span, 50.0 / span, 200)
    errors = [solve(g)[0] for g in grid]
    i = int(np.argmin(errors))
    lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, grid.size - 1)])
    for _ in range(60):
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if solve(math.exp(m1))[0] <= solve(math.exp(m2))[0]:
            hi = m2
        else:
            lo = m1
    theta2 = math.exp(0.5 * (lo + hi))
    _, theta1, theta3 = solve(theta2)
    if theta1 == 0.0:
        theta2 = 0.0
    return RemoteLatencyCurve(theta1, theta2, theta3)


@dataclass(frozen=True)
class MemoryProblem:
    """Coefficients of the sizing problem, one entry per MoE layer; replicas along axis 1 of the prefill terms."""

    curve: RemoteLatencyCurve
    usd_per_mb_second: float  # CPU function price per MB-second
    work: np.ndarray  # [L] remote token-expert pairs per request (prefill + steps * decode)
    billed_fixed_s: np.ndarray  # [L] billed invocation overhead seconds per request
    main_usd_per_s: float  # main function's price per second of request time
    steps: int  # decode steps per request
    prefill_local_s: np.ndarray  # [L]
    prefill_fixed_s: np.ndarray  # [L, Z] replica network + invocation time, -inf for an idle replica
    prefill_tokens: np.ndarray  # [L, Z] replica token-expert pairs
    decode_local_s: np.ndarray  # [L]
    decode_fixed_s: np.ndarray  # [L] (-inf when the layer has no remote expert)
    decode_tokens: np.ndarray  # [L] expected remote token-expert pairs per decode step
    tpot_budget_s: float  # TPOT SLO minus everything that does not depend on remote memory
    lower_mb: np.ndarray  # [L]
    upper_mb: float

    def prefill_s(self, y: np.ndarray) -> np.ndarray:
        """Layer prefill time beyond the GPU part. y: [L, ...] -> [L, ...]"""
        t = self.curve(y)
        remote = (
            self.prefill_fixed_s.reshape(self.prefill_fixed_s.shape + (1,) * (t.ndim - 1))
            + self.prefill_tokens.reshape(self.prefill_tokens.shape + (1,) * (t.ndim - 1)) * t[:, None]
        )
        return np.maximum(_col(self.prefill_local_s, t), remote.max(axis=1))

    def decode_s(self, y: np.ndarray) -> np.ndarray:
        t = self.curve(y)
        return np.maximum(
            _col(self.decode_local_s, t), _col(self.decode_fixed_s, t) + _col(self.decode_tokens, t) * t
        )

    def cost(self, y: np.ndarray) -> np.ndarray:
        """F_l(y) per layer (USD per request). y: [L, ...] -> [L, ...]"""
        return self.cost_and_decode(y)[0]

    def cost_and_decode(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F_l(y), D_l(y)) per layer, the curve evaluated once. y: [L, ...] -> two [L, ...]"""
        t = self.curve(y)
        remote = (self.prefill_fixed_s.reshape(self.prefill_fixed_s.shape + (1,) * (t.ndim - 1))
                  + self.prefill_tokens.reshape(self.prefill_tokens.shape + (1,) * (t.ndim - 1)) * t[:, None])
        prefill = np.maximum(_col(self.prefill_local_s, t), remote.max(axis=1))
        decode = np.maximum(_col(self.decode_local_s, t), _col(self.decode_fixed_s, t) + _col(self.decode_tokens, t) * t)
        billed = self.usd_per_mb_second * y * (_col(self.work, t) * t + _col(self.billed_fixed_s, t))
        return billed + self.main_usd_per_s * (prefill + self.steps * decode), decode

    def lagrangian_terms(self, y: np.ndarray, lam: float) -> np.ndarray:
        cost, decode = self.cost_and_decode(y)
        return cost + lam * decode

    def convex_layers(self) -> np.ndarray:
        """[L] bool: Theorem-2 condition (theta1, theta2 > 0 and lower >= 2 / theta2, or no remote work)."""
        c = self.curve
        if c.theta1 == 0:
            return np.ones(self.work.shape, dtype=bool)
        if c.theta1 < 0 or c.theta2 <= 0:
            return np.zeros(self.work.shape, dtype=bool)
        return (self.work <= 0) | (self.lower_mb >= c.convex_from_mb)


def _col(v: np.ndarray, like: np.ndarray) -> np.ndarray:
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


@dataclass(frozen=True)
class MemorySolution:
    memory_mb: np.ndarray  # [L] int64, rounded to the provider's step
    relaxed_mb: np.ndarray  # [L] float, the dual's continuous solution
    multiplier: float  # lam* (USD per second of TPOT)
    dual_value: float  # g(lam*), a lower bound on the relaxed optimum
    relaxed_cost: float  # sum F_l at relaxed_mb
    cost: float  # sum F_l at memory_mb
    convex: np.ndarray  # [L] bool, Theorem-2 condition per layer
    convex_from_mb: float


def best_memory(problem: MemoryProblem, lam: float, grid: int = 257, refine: int = 40) -> np.ndarray:
    """argmin over [lower_l, upper] of F_l(y) + lam * D_l(y) for every layer: grid, then golden section."""
    lo, hi = problem.lower_mb.astype(np.float64), float(problem.upper_mb)
    frac = np.linspace(0.0, 1.0, grid)
    ys = lo[:, None] + (hi - lo)[:, None] * frac[None, :]
    values = problem.lagrangian_terms(ys, lam)
    i = np.argmin(values, axis=1)
    rows = np.arange(lo.size)
    a = ys[rows, np.maximum(i - 1, 0)]
    b = ys[rows, np.minimum(i + 1, grid - 1)]
    for _ in range(refine):
        m1, m2 = a + 0.382 * (b - a), a + 0.618 * (b - a)
        left = (
            problem.lagrangian_terms(m1[:, None], lam)[:, 0]
            <= problem.lagrangian_terms(m2[:, None], lam)[:, 0]
        )
        b = np.where(left, m2, b)
        a = np.where(left, a, m1)
    mid = 0.5 * (a + b)
    candidates = np.stack([ys[rows, i], mid], axis=1)
    pick = np.argmin(problem.lagrangian_terms(candidates, lam), axis=1)
    return candidates[rows, pick]


def dual_value(problem: MemoryProblem, lam: float) -> float:
    y = best_memory(problem, lam)
    return float(problem.lagrangian_terms(y[:, None], lam).sum() - lam * problem.tpot_budget_s)


def solve_memory(problem: MemoryProblem, pricing: CpuFunctionPricing, iterations: int = 60) -> MemorySolution:
    """Lagrangian dual by bisection on lam, then round up to the memory step and greedily step back down."""
    lower, upper = problem.lower_mb, float(problem.upper_mb)
    if np.any(lower > upper):
        raise MoeServeError(
            f"remote experts need {lower.max():.0f} MB, above the function maximum {upper:.0f} MB"
        )

    def tpot(y: np.ndarray) -> float:
        return float(problem.decode_s(y[:, None])[:, 0].sum())

    fastest = np.full(lower.shape, upper)
    if tpot(fastest) > problem.tpot_budget_s + 1e-12:
        raise MoeServeError(
            f"TPOT SLO infeasible: even {upper:.0f} MB remote functions leave the decode step "
            f"{tpot(fastest) - problem.tpot_budget_s:.4f} s over budget"
        )
    lam_lo, lam_hi = 0.0, 0.0
    y = best_memory(problem, 0.0)
    if tpot(y) > problem.tpot_budget_s:
        lam_hi = max(problem.main_usd_per_s, 1e-12)
        while tpot(best_memory(problem, lam_hi)) > problem.tpot_budget_s:
            lam_lo, lam_hi = lam_hi, lam_hi * 4.0
            if lam_hi > 1e12:
                raise MoeServeError("TPOT SLO infeasible: the dual multiplier diverged")
        for _ in range(iterations):
            mid = math.sqrt(lam_lo * lam_hi) if lam_lo > 0 else lam_hi / 4.0
            if tpot(best_memory(problem, mid)) > problem.tpot_budget_s:
                lam_lo = mid
            else:
                lam_hi = mid
        y = best_memory(problem, lam_hi)
    rounded = round_memory(problem, y, pricing, tpot)
    return MemorySolution(
        memory_mb=rounded,
        relaxed_mb=y,
        multiplier=lam_hi,
        dual_value=dual_value(problem, lam_hi),
        relaxed_cost=float(problem.cost(y[:, None]).sum()),
        cost=float(problem.cost(rounded[:, None].astype(np.float64)).sum()),
        convex=problem.convex_layers(),
        convex_from_mb=problem.curve.convex_from_mb,
    )


def round_memory(problem: MemoryProblem, y: np.ndarray, pricing: CpuFunctionPricing, tpot) -> np.ndarray:
    """Round up to the provider step (keeps TPOT feasible: D_l does not increase with y), then move
    layers one step down where that lowers cost and TPOT stays within budget, largest saving first."""
    up = np.array([pricing.round_memory_up(v) for v in y], dtype=np.int64)
    up = np.maximum(up, np.array([pricing.round_memory_up(v) for v in problem.lower_mb], dtype=np.int64))
    down = up - pricing.memory_step_mb
    allowed = down >= np.maximum(problem.lower_mb, pricing.memory_min_mb)
    saving = (
        problem.cost(up[:, None].astype(np.float64))[:, 0]
        - problem.cost(np.maximum(down, 1)[:, None].astype(np.float64))[:, 0]
    )
    result = up.copy()
    for layer in np.argsort(-saving):
        if not allowed[layer] or saving[layer] <= 0:
            continue
        trial = result.copy()
        trial[layer] = down[layer]
        if tpot(trial.astype(np.float64)) <= problem.tpot_budget_s:
            result = trial
    return result
