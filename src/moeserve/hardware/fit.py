"""Curve fits for measured latencies: a straight line and a monotone piecewise-linear curve.

Latencies span orders of magnitude (one token vs a few hundred), so both fits minimise the
*relative* error (each residual is divided by the measured value) rather than the absolute one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CurveFit:
    """y(x) as a continuous piecewise-linear curve through knots, plus the line a + b*x.

    knots_x: [K] increasing, knots_y: [K]. Outside the knots the curve continues with the slope of
    its end segment (never negative past the last knot) and is clamped at 0.
    The errors are relative, |fit - y| / y, over the raw points the fit was made from.
    """

    knots_x: tuple[float, ...]
    knots_y: tuple[float, ...]
    a: float
    b: float
    max_rel_error: float
    mean_rel_error: float
    linear_max_rel_error: float
    linear_mean_rel_error: float

    def __call__(self, x):
        """The piecewise-linear value at x (scalar -> float, array -> array)."""
        return _as_output(piecewise_eval(np.asarray(self.knots_x), np.asarray(self.knots_y), x), x)

    def linear(self, x):
        """The straight-line value a + b*x, clamped at 0."""
        return _as_output(np.maximum(self.a + self.b * np.asarray(x, dtype=np.float64), 0.0), x)


def round_sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (keeps shipped YAML short and readable)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(round(x, digits - 1 - math.floor(math.log10(abs(x)))))


def rounded(fit: CurveFit, digits: int = 4) -> CurveFit:
    """`fit` with its values rounded to `digits` significant digits (knot positions are kept exact,
    errors below 1e-9 become 0)."""
    def r(v):
        return round_sig(v, digits) if abs(v) >= 1e-9 else 0.0

    return dataclasses.replace(
        fit,
        knots_y=tuple(round_sig(v, digits) for v in fit.knots_y),
        a=round_sig(fit.a, digits),
        b=0.0 if abs(fit.b) * max(abs(fit.knots_x[-1]), 1.0) < 1e-9 * abs(fit.a) else round_sig(fit.b, digits),
        max_rel_error=r(fit.max_rel_error),
        mean_rel_error=r(fit.mean_rel_error),
        linear_max_rel_error=r(fit.linear_max_rel_error),
        linear_mean_rel_error=r(fit.linear_mean_rel_error),
    )


def _as_output(values: np.ndarray, x):
    return float(values) if np.ndim(x) == 0 else values


def piecewise_eval(knots_x: np.ndarray, knots_y: np.ndarray, x) -> np.ndarray:
    """Evaluate the continuous piecewise-linear curve (knots_x [K], knots_y [K]) at x (any shape)."""
    x = np.asarray(x, dtype=np.float64)
    if len(knots_x) == 1:
        return np.full(x.shape, float(knots_y[0]))
    y = np.interp(x, knots_x, knots_y)
    slope_lo = (knots_y[1] - knots_y[0]) / (knots_x[1] - knots_x[0])
    slope_hi = max((knots_y[-1] - knots_y[-2]) / (knots_x[-1] - knots_x[-2]), 0.0)
    y = np.where(x < knots_x[0], knots_y[0] + slope_lo * (x - knots_x[0]), y)
    y = np.where(x > knots_x[-1], knots_y[-1] + slope_hi * (x - knots_x[-1]), y)
    return np.maximum(y, 0.0)


def _hat_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """[N, K]: column j is the piecewise-linear function that is 1 at knot j and 0 at the others."""
    eye = np.eye(len(knots))
    return np.stack([np.interp(x, knots, eye[j]) for j in range(len(knots))], axis=1)


def _weighted_lstsq(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(design * weights[:, None], y * weights, rcond=None)
    return coef


def isotonic_increasing(y: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence to y in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in np.asarray(y, dtype=np.float64):
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


def _rel_errors(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(pred - y) / np.maximum(np.abs(y), 1e-300)


def fit_curve(x, y, max_segments: int = 3, monotone: bool = True) -> CurveFit:
    """Fit measured points y(x) (x: [N], y: [N] > 0) with a line and a piecewise-linear curve.

    The piecewise curve has at most `max_segments` segments; its knots are chosen among the measured
    x values (first and last always) by exhaustive search for the least relative squared error.
    With `monotone` the knot values are made non-decreasing (latency never falls as work grows).
    Repeated x values are averaged first.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"fit_curve needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    ux, inverse = np.unique(x, return_inverse=True)
    uy = np.bincount(inverse, weights=y) / np.bincount(inverse)
    weights = 1.0 / np.maximum(np.abs(uy), 1e-300)

    if len(ux) == 1:
        a, b = float(uy[0]), 0.0
        knots_x, knots_y = ux, uy
    else:
        a, b = (float(v) for v in _weighted_lstsq(np.stack([np.ones_like(ux), ux], axis=1), uy, weights))
        best = None
        interior = range(1, len(ux) - 1)
        for n_inner in range(0, min(max_segments, len(ux) - 1)):
            for inner in itertools.combinations(interior, n_inner):
                knots = ux[[0, *inner, len(ux) - 1]]
                values = _weighted_lstsq(_hat_basis(ux, knots), uy, weights)
                sse = float(np.sum(((_hat_basis(ux, knots) @ values - uy) * weights) ** 2))
                if best is None or sse < best[0] - 1e-15:
                    best = (sse, knots, values)
        _, knots_x, knots_y = best
        if monotone:
            knots_y = isotonic_increasing(knots_y)
    pw_err = _rel_errors(piecewise_eval(knots_x, knots_y, x), y)
    lin_err = _rel_errors(np.maximum(a + b * x, 0.0), y)
    return CurveFit(
        knots_x=tuple(float(v) for v in knots_x),
        knots_y=tuple(float(v) for v in knots_y),
        a=a,
        b=b,
        max_rel_error=float(pw_err.max()),
        mean_rel_error=float(pw_err.mean()),
        linear_max_rel_error=float(lin_err.max()),
        linear_mean_rel_error=float(lin_err.mean()),
    )
