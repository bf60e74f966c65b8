"""Layer-aware expert-load predictors for the next scheduling window (MoEless, arXiv 2603.06350).

For layer l of window w, predict each expert's share of the window's picks from what is known
before layer l runs, then scale by the window's known pick count (tokens in flight x top_k):
- history: the last window, exponential moving averages, and the moving-window average that
  EPLB/SGLang balance on (also a baseline);
- cross-layer: the same tokens' routing one layer earlier. `cross_layer` learns, per layer, a ridge
  map from how layer l-1 of this window deviates from its history to how layer l will; `transition`
  pushes that deviation through expert-to-expert transition frequencies counted from token routing;
- pre-gating (`pregate`: layer l's gate applied early to the hidden state) and the SPS prompt-level
  prediction (`sps`), when given as [windows, layers, experts] arrays;
- `blend`: a convex combination of the above, weights fit per layer.
Fitting splits the fit windows: the first two thirds train the cross-layer maps, the last third
fits ridge strengths and blend weights out of sample; the validation windows then pick one
predictor per layer. Baselines: `even`, `last`, `moving_average`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moeserve.defaults import STRAGGLER_THRESHOLD
from moeserve.errors import MoeServeError
from moeserve.moeless.loads import shares
from moeserve.moeless.scaling import detect_stragglers

BASELINES = ("even", "last", "moving_average")
RIDGE_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True, eq=False)
class LoadPredictor:
    """A fitted predictor; `choice[l]` names the one used for layer l.

    names: candidate names; val_wape: [L, len(names)] validation error of each
    ridge_x, ridge_coef: [L, n, E] dual ridge maps (layer 0 unused); transitions: [L, E, E] or None
    blend_names: inputs of the blend; blend_weights: [L, len(blend_names)]
    """

    choice: tuple[str, ...]
    names: tuple[str, ...]
    val_wape: np.ndarray
    history_window: int
    ema_alphas: tuple[float, float]
    ridge_x: np.ndarray
    ridge_coef: np.ndarray
    transitions: np.ndarray | None
    blend_names: tuple[str, ...]
    blend_weights: np.ndarray


@dataclass(frozen=True, eq=False)
class PredictionScores:
    """wape [L]: sum |predicted - true| / sum true; straggler_recall [L]: share of the true stragglers
    among the same number of top predicted experts (nan where a layer never has a straggler)."""

    wape: np.ndarray
    straggler_recall: np.ndarray


def history_shares(loads: np.ndarray, method: str, history_window: int = 10, alpha: float = 0.5) -> np.ndarray:
    """Share predictions from past windows only. loads: [W, L, E] -> [W, L, E] (window 0: even).

    method: "even", "last", "moving_average" (pooled counts of the last `history_window` windows,
    what EPLB balances on), or "ema" (exponential moving average of shares, weight `alpha` on the
    newest window).
    """
    num_windows, num_layers, num_experts = loads.shape
    even = np.full((num_windows, num_layers, num_experts), 1.0 / num_experts)
    if method == "even" or num_windows == 0:
        return even
    observed = shares(loads)
    out = even.copy()
    if method == "last":
        out[1:] = observed[:-1]
    elif method == "moving_average":
        cumulative = np.concatenate([np.zeros((1, num_layers, num_experts)), np.cumsum(loads, 0)])
        ends = np.arange(1, num_windows)
        out[1:] = shares(cumulative[ends] - cumulative[np.maximum(ends - history_window, 0)])
    elif method == "ema":
        for w in range(1, num_windows):
            out[w] = alpha * observed[w - 1] + (1 - alpha) * out[w - 1]
    else:
        raise MoeServeError(f"unknown history predictor {method!r}")
    return out


def transition_matrices(routing: np.ndarray, num_experts: int, smoothing: float = 1e-3) -> np.ndarray:
    """P(expert j at layer l | expert i at layer l-1) from token routing.

    routing: [tokens, L, top_k] int -> transitions [L, E, E] (rows sum to 1; layer 0 is identity;
    an expert never seen at layer l-1 gets a uniform row)
    """
    num_tokens, num_layers, top_k = routing.shape
    out = np.empty((num_layers, num_experts, num_experts))
    out[0] = np.eye(num_experts)
    for layer in range(1, num_layers):
        prev, cur = routing[:, layer - 1], routing[:, layer]
        pairs = (prev[:, :, None] * num_experts + cur[:, None, :]).reshape(-1)
        ok = (np.repeat(prev, top_k, axis=1).reshape(-1) >= 0) & (np.tile(cur, (1, top_k)).reshape(-1) >= 0)
        counts = np.bincount(pairs[ok], minlength=num_experts * num_experts).reshape(num_experts, num_experts)
        counts = counts + smoothing * counts.sum() / num_experts**2
        rows = counts.sum(1, keepdims=True)
        out[layer] = np.where(rows > 0, counts / np.where(rows > 0, rows, 1.0), 1.0 / num_experts)
    return out


def fit_load_predictor(loads: np.ndarray, fit_windows: np.ndarray, val_windows: np.ndarray,
                       routing: np.ndarray | None = None, window_of_token: np.ndarray | None = None,
                       pregate: np.ndarray | None = None, sps: np.ndarray | None = None,
                       history_window: int = 10, ema_alphas: tuple[float, float] = (0.5, 0.2)) -> LoadPredictor:
    """Fit the predictors on `fit_windows` and pick one per layer on `val_windows`.

    loads: [W, L, E] measured counts; routing/window_of_token: token routing of the same windows
    (enables `transition`); pregate, sps: [W, L, E] optional feature loads
    """
    loads = _check_loads(loads)
    fit_windows, val_windows = np.asarray(fit_windows), np.asarray(val_windows)
    if len(fit_windows) < 3 or len(val_windows) < 1:
        raise MoeServeError("fitting needs at least 3 fit windows and 1 validation window")
    if np.intersect1d(fit_windows, val_windows).size:
        raise MoeServeError("fit and validation windows overlap")
    num_windows, num_layers, num_experts = loads.shape
    if min(fit_windows.min(), val_windows.min()) < 1 or max(fit_windows.max(), val_windows.max()) >= num_windows:
        raise MoeServeError(f"fit and validation windows must lie in [1, {num_windows}) (window 0 has no history)")
    split = len(fit_windows) * 2 // 3
    train, tune = fit_windows[:split], fit_windows[split:]

    base = history_shares(loads, "ema", alpha=ema_alphas[0])
    deviation = shares(loads) - base
    x, y = deviation[train, :-1], deviation[train, 1:]  # [n, L-1, E]
    gram = np.einsum("nle,mle->lnm", x, x)
    ridge_x = np.zeros((num_layers, len(train), num_experts))
    ridge_coef = np.zeros((num_layers, len(train), num_experts))
    ridge_x[1:] = x.transpose(1, 0, 2)
    tune_err = np.full((len(RIDGE_SCALES), num_layers), np.inf)
    coefs = []
    for k, scale in enumerate(RIDGE_SCALES):
        lam = scale * np.trace(gram, axis1=1, axis2=2) / len(train) + 1e-12
        coef = np.linalg.solve(gram + lam[:, None, None] * np.eye(len(train)), y.transpose(1, 0, 2))
        coefs.append(coef)
        trial = np.zeros_like(ridge_coef)
        trial[1:] = coef
        pred = _cross_layer(loads[tune], base[tune], ridge_x, trial)
        tune_err[k] = _wape(pred, shares(loads[tune]))
    pick = np.argmin(tune_err, axis=0)
    for layer in range(1, num_layers):
        ridge_coef[layer] = coefs[pick[layer]][layer - 1]

    transitions = None
    if routing is not None:
        if window_of_token is None:
            raise MoeServeError("routing needs window_of_token")
        in_train = np.isin(np.asarray(window_of_token), train)
        transitions = transition_matrices(np.asarray(routing)[in_train], num_experts)

    predictor = LoadPredictor(
        choice=(), names=(), val_wape=np.zeros((num_layers, 0)), history_window=history_window,
        ema_alphas=ema_alphas, ridge_x=ridge_x, ridge_coef=ridge_coef, transitions=transitions,
        blend_names=(), blend_weights=np.zeros((num_layers, 0)))
    candidates = _candidates(predictor, loads, pregate, sps)
    blend_names = tuple(n for n in candidates if n not in ("even", "moving_average"))
    stack = np.stack([candidates[n][tune] for n in blend_names], axis=-1)  # [t, L, E, C]
    blend_weights = _simplex_least_squares(stack, shares(loads[tune]))
    predictor = replace(predictor, blend_names=blend_names, blend_weights=blend_weights)
    candidates["blend"] = _blend(candidates, blend_names, blend_weights)

    names = tuple(candidates)
    truth = shares(loads[val_windows])
    val_wape = np.stack([_wape(candidates[n][val_windows], truth) for n in names], axis=1)
    choice = tuple(names[i] for i in np.argmin(val_wape, axis=1))
    return replace(predictor, choice=choice, names=names, val_wape=val_wape)


def predict_loads(predictor: LoadPredictor, loads: np.ndarray, pregate: np.ndarray | None = None,
                  sps: np.ndarray | None = None, method: str | None = None) -> np.ndarray:
    """Predicted loads of every window, each from what precedes it. -> [W, L, E].

    `method` forces one candidate (e.g. a baseline) for all layers instead of the per-layer choice.
    Window w, layer l reads loads[< w] and loads[w, l - 1] only.
    """
    loads = _check_loads(loads)
    candidates = _candidates(predictor, loads, pregate, sps)
    missing = [n for n in predictor.blend_names if n not in candidates]
    if missing:
        raise MoeServeError(f"the predictor was fit with {', '.join(missing)}; pass the same feature to predict")
    candidates["blend"] = _blend(candidates, predictor.blend_names, predictor.blend_weights)
    if method is not None:
        if method not in candidates:
            raise MoeServeError(f"predictor {method!r} is not available (have {', '.join(candidates)})")
        predicted = candidates[method]
    else:
        predicted = np.stack([candidates[name][:, layer] for layer, name in enumerate(predictor.choice)], axis=1)
    return predicted * loads.sum(-1, keepdims=True)


def score_predictions(predicted: np.ndarray, true: np.ndarray, windows: np.ndarray,
                      straggler_threshold: float = STRAGGLER_THRESHOLD) -> PredictionScores:
    """Per-layer error over `windows`. predicted, true: [W, L, E] loads."""
    predicted, true = predicted[windows], true[windows]
    wape = _wape(predicted, true)
    stragglers = detect_stragglers(true, straggler_threshold)
    count = stragglers.sum(-1)  # [w, L]
    rank = np.argsort(np.argsort(-predicted, axis=-1, kind="stable"), axis=-1)
    hits = (stragglers & (rank < count[..., None])).sum(-1)
    with np.errstate(invalid="ignore"):
        recall = hits.sum(0) / count.sum(0)
    return PredictionScores(wape=wape, straggler_recall=np.where(count.sum(0) > 0, recall, np.nan))


def _candidates(predictor: LoadPredictor, loads: np.ndarray, pregate: np.ndarray | None,
                sps: np.ndarray | None) -> dict[str, np.ndarray]:
    fast, slow = predictor.ema_alphas
    out = {
        "even": history_shares(loads, "even"),
        "last": history_shares(loads, "last"),
        "moving_average": history_shares(loads, "moving_average", predictor.history_window),
        "ema_fast": history_shares(loads, "ema", alpha=fast),
        "ema_slow": history_shares(loads, "ema", alpha=slow),
    }
    base = out["ema_fast"]
    out["cross_layer"] = _cross_layer(loads, base, predictor.ridge_x, predictor.ridge_coef)
    if predictor.transitions is not None:
        deviation = shares(loads) - base
        pushed = np.einsum("wle,lef->wlf", deviation[:, :-1], predictor.transitions[1:])
        transition = base.copy()
        transition[:, 1:] = _renormalise(base[:, 1:] + pushed)
        out["transition"] = transition
    for name, feature in (("pregate", pregate), ("sps", sps)):
        if feature is not None:
            if feature.shape != loads.shape:
                raise MoeServeError(f"{name} must have the shape of loads {loads.shape}, got {feature.shape}")
            out[name] = shares(np.asarray(feature, dtype=np.float64))
    return out


def _cross_layer(loads: np.ndarray, base: np.ndarray, ridge_x: np.ndarray, ridge_coef: np.ndarray) -> np.ndarray:
    """base + ridge(deviation of layer l-1 in this window). [W, L, E] -> [W, L, E]."""
    deviation = shares(loads) - base
    kernel = np.einsum("wle,lne->wln", deviation[:, :-1], ridge_x[1:])
    out = base.copy()
    out[:, 1:] = _renormalise(base[:, 1:] + np.einsum("wln,lne->wle", kernel, ridge_coef[1:]))
    return out


def _blend(candidates: dict[str, np.ndarray], names: tuple[str, ...], weights: np.ndarray) -> np.ndarray:
    return np.einsum("wlec,lc->wle", np.stack([candidates[n] for n in names], axis=-1), weights)


def _simplex_least_squares(stack: np.ndarray, target: np.ndarray, steps: int = 500) -> np.ndarray:
    """Per layer, weights on the simplex minimising ||stack @ w - target||^2.

    stack: [t, L, E, C]; target: [t, L, E] -> [L, C]
    """
    gram = np.einsum("tlec,tled->lcd", stack, stack)
    rhs = np.einsum("tlec,tle->lc", stack, target)
    step = 1.0 / np.maximum(np.linalg.eigvalsh(gram)[:, -1], 1e-30)
    weights = np.full(rhs.shape, 1.0 / rhs.shape[1])
    for _ in range(steps):
        gradient = np.einsum("lcd,ld->lc", gram, weights) - rhs
        weights = _project_simplex(weights - step[:, None] * gradient)
    return weights


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto {w >= 0, sum w = 1}. [rows, C] -> [rows, C]."""
    ordered = -np.sort(-v, axis=1)
    cumulative = np.cumsum(ordered, axis=1) - 1.0
    k = np.arange(1, v.shape[1] + 1)
    last = (ordered - cumulative / k > 0).sum(1) - 1
    theta = cumulative[np.arange(v.shape[0]), last] / (last + 1)
    return np.maximum(v - theta[:, None], 0.0)


def _renormalise(raw: np.ndarray) -> np.ndarray:
    return shares(np.maximum(raw, 0.0))


def _wape(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """sum |p - t| / sum t per layer. [w, L, E] -> [L]."""
    return np.abs(predicted - true).sum((0, 2)) / np.maximum(true.sum((0, 2)), 1e-300)


def _check_loads(loads: np.ndarray) -> np.ndarray:
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 3 or (loads < 0).any():
        raise MoeServeError("loads must be a non-negative [windows, layers, experts] array")
    return loads
