"""Benchmark MoEless against the EPLB algorithm, and its predictors against the moving-window average.

    python scripts/bench_moeless.py [--quick] [--only SECTIONS] [--json OUT] [--loads LOADS.npy] [--azure CSV]

Sections (markdown tables on stdout; every figure also in --json):
1. balance: same replica budget, same load matrices: balancedness and planning time, EPLB vs MoEless;
   hetero: the same on a fleet where half the devices are twice as slow;
2. predictors: per-layer load error (WAPE) and straggler recall on held-out windows;
3. simulation: replay of the skewed trace under static / EPLB / MoEless-predicted / MoEless-oracle;
   churn: MoEless-predicted on 32 devices for a range of churn penalties.
--loads adds a [windows, layers, experts] (or [layers, experts]) array, e.g. counts from a
demo-model trace, to section 1 (and to 2 and 3 when it has at least 40 windows).
--azure takes window sizes from real arrival times (default: ../shared/data/azure-llm-2023/conv.csv
when present): tokens per window follow the trace's burstiness, scaled to the configured mean.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np

from moeserve.atomic import write_text_atomic
from moeserve.moeless.eplb import eplb_phy2log
from moeserve.moeless.export import replicas_from_phy2log
from moeserve.moeless.fleet import DeviceFleet, balancedness, device_loads, device_times, uniform_fleet
from moeserve.moeless.loads import loads_from_routing
from moeserve.moeless.planner import plan_moeless
from moeserve.moeless.predictors import (
    fit_load_predictor,
    history_shares,
    predict_loads,
    score_predictions,
)
from moeserve.moeless.simulator import (
    compare_strategies,
    eplb_schedule,
    moeless_schedule,
    replay,
    static_deployment_cost,
)
from moeserve.moeless.synthetic import zipf_drift_loads, zipf_drift_routing

ROOT = Path(__file__).resolve().parents[1]
AZURE_DEFAULT = ROOT.parent / "shared" / "data" / "azure-llm-2023" / "conv.csv"
# One DeepSeek-V3 routed expert (3 x 7168 x 2048 weights, fp8) on an H100-class device:
# weights read once per invocation, ~2 x 44M FLOPs per token.
EXPERT_GB = 0.044
FIXED_S = 15e-6
PER_TOKEN_S = 0.25e-6
COLD_START_S = 0.5
PRICE_PER_GB_S = 1.67e-5  # serverless list price per GB-second, used for both columns
DEVICE_GB = 141.0  # H200: 8 of them hold DeepSeek-V3's 58 x 256 fp8 experts (~650 GB)


def azure_tokens_per_window(path: Path, window_s: float, mean_tokens: int) -> np.ndarray:
    """Tokens (prompt + output) arriving per window, rescaled to `mean_tokens` on average."""
    stamps, tokens = [], []
    with path.open(encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            date, clock = row["TIMESTAMP"].split(" ")
            whole, _, frac = clock.partition(".")
            stamps.append(datetime.fromisoformat(f"{date} {whole}").timestamp() + float(f"0.{frac or 0}"))
            tokens.append(int(row["ContextTokens"]) + int(row["GeneratedTokens"]))
    stamps_arr = np.asarray(stamps)
    window = np.floor((stamps_arr - stamps_arr.min()) / window_s).astype(np.int64)
    per_window = np.bincount(window, weights=np.asarray(tokens, dtype=np.float64))
    return np.maximum(np.round(per_window / per_window.mean() * mean_tokens), 1).astype(np.int64)


def eplb_balance(loads: np.ndarray, num_devices: int, extra: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    phy2log = eplb_phy2log(loads, loads.shape[1] + extra, num_devices)
    seconds = time.perf_counter() - start
    replicas = replicas_from_phy2log(phy2log, loads.shape[1], num_devices)
    return balancedness(device_loads(replicas, loads)), seconds


def moeless_balance(loads: np.ndarray, num_devices: int, extra: int, headroom: int) -> tuple[np.ndarray, float]:
    fleet = uniform_fleet(num_devices, (loads.shape[1] + extra) // num_devices + headroom)
    start = time.perf_counter()
    plan = plan_moeless(loads, fleet, extra)
    seconds = time.perf_counter() - start
    return balancedness(device_loads(plan.replicas, loads)), seconds


def balance_section(load_sets: dict[str, np.ndarray], device_counts: list[int], matrices: int) -> list[dict]:
    print("\n## 1. Balancedness at the same replica budget (max device tokens / mean; 1.0 is perfect)\n")
    print("| loads | devices | extra copies | slots/device (EPLB / MoEless) | EPLB mean | MoEless mean | "
          "EPLB worst | MoEless worst | layers worse / better / total | MoEless s per plan (median, max) | "
          "EPLB s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, loads in load_sets.items():
        picks = np.linspace(0, loads.shape[0] - 1, min(matrices, loads.shape[0])).round().astype(int)
        for num_devices in device_counts:
            for extra in (num_devices, 2 * num_devices):
                if (loads.shape[2] + extra) % num_devices:
                    continue
                for headroom in (0, 2):
                    eplb_b, moe_b, moe_s, eplb_s = [], [], [], []
                    for w in picks:
                        b, s = eplb_balance(loads[w], num_devices, extra)
                        eplb_b.append(b)
                        eplb_s.append(s)
                        b, s = moeless_balance(loads[w], num_devices, extra, headroom)
                        moe_b.append(b)
                        moe_s.append(s)
                    eb, mb = np.concatenate(eplb_b), np.concatenate(moe_b)
                    slots = (loads.shape[2] + extra) // num_devices
                    row = {
                        "loads": name, "devices": num_devices, "extra": extra, "slots_eplb": slots,
                        "slots_moeless": slots + headroom, "eplb_mean": float(eb.mean()),
                        "moeless_mean": float(mb.mean()), "eplb_worst": float(eb.max()),
                        "moeless_worst": float(mb.max()), "layers_worse": int((mb > eb + 1e-9).sum()),
                        "layers_better": int((mb < eb - 1e-9).sum()), "layers": int(eb.size),
                        "moeless_s_median": statistics.median(moe_s), "moeless_s_max": max(moe_s),
                        "eplb_s_median": statistics.median(eplb_s),
                    }
                    rows.append(row)
                    print(f"| {name} | {num_devices} | {extra} | {slots} / {slots + headroom} | "
                          f"{row['eplb_mean']:.4f} | {row['moeless_mean']:.4f} | {row['eplb_worst']:.4f} | "
                          f"{row['moeless_worst']:.4f} | {row['layers_worse']} / {row['layers_better']} / "
                          f"{row['layers']} | {row['moeless_s_median']:.3f}, {row['moeless_s_max']:.3f} | "
                          f"{row['eplb_s_median']:.3f} |", flush=True)
    return rows


def heterogeneous_section(loads: np.ndarray, matrices: int) -> list[dict]:
    print("\n## 1b. Mixed fleet: half the devices twice as slow (seconds of the slowest device per layer)\n")
    print("| devices | extra copies | slots/device (EPLB / MoEless) | EPLB max device ms | MoEless max device ms | "
          "MoEless / EPLB | layers worse / total |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    picks = np.linspace(0, loads.shape[0] - 1, min(matrices, loads.shape[0])).round().astype(int)
    for num_devices in (8, 16, 32):
        extra = num_devices
        slots = (loads.shape[2] + extra) // num_devices
        slow = np.r_[np.ones(num_devices // 2), 2 * np.ones(num_devices - num_devices // 2)]
        fleet = DeviceFleet(capacity_experts=np.full(num_devices, slots + slots // 2), fixed_s=FIXED_S * slow,
                            per_token_s=PER_TOKEN_S * slow)
        eplb_t, moe_t = [], []
        for w in picks:
            phy2log = eplb_phy2log(loads[w], loads.shape[2] + extra, num_devices)
            eplb_t.append(device_times(replicas_from_phy2log(phy2log, loads.shape[2], num_devices), loads[w],
                                       fleet).max(1))
            moe_t.append(plan_moeless(loads[w], fleet, extra).device_time_s.max(1))
        et, mt = np.concatenate(eplb_t), np.concatenate(moe_t)
        row = {"devices": num_devices, "extra": extra, "slots_eplb": slots, "slots_moeless": slots + slots // 2,
               "eplb_ms": 1e3 * float(et.mean()), "moeless_ms": 1e3 * float(mt.mean()),
               "layers_worse": int((mt > et * (1 + 1e-9)).sum()), "layers": int(et.size)}
        rows.append(row)
        print(f"| {num_devices} | {extra} | {slots} / {slots + slots // 2} | {row['eplb_ms']:.3f} | "
              f"{row['moeless_ms']:.3f} | {row['moeless_ms'] / row['eplb_ms']:.3f} | {row['layers_worse']} / "
              f"{row['layers']} |", flush=True)
    return rows


def split_windows(num_windows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warm-up 8, then fit / validation / test in ratio 5 : 2 : 3."""
    usable = num_windows - 8
    fit_end = 8 + usable * 5 // 10
    val_end = fit_end + usable * 2 // 10
    return np.arange(8, fit_end), np.arange(fit_end, val_end), np.arange(val_end, num_windows)


def predictor_section(name: str, loads: np.ndarray, routing=None, window_of_token=None, pregate=None,
                      per_layer: bool = True) -> dict:
    fit, val, test = split_windows(loads.shape[0])
    predictor = fit_load_predictor(loads, fit, val, routing=routing, window_of_token=window_of_token)
    # The strongest moving average: one window length for all layers, picked on validation.
    lengths = (2, 4, 8, 16, 32)
    totals = loads.sum(-1, keepdims=True)
    val_err = [score_predictions(history_shares(loads, "moving_average", h) * totals, loads, val).wape.mean()
               for h in lengths]
    best_h = lengths[int(np.argmin(val_err))]
    scores = {
        "chosen": score_predictions(predict_loads(predictor, loads), loads, test),
        "moving_average_10": score_predictions(predict_loads(predictor, loads, method="moving_average"), loads, test),
        f"moving_average_{best_h}": score_predictions(history_shares(loads, "moving_average", best_h) * totals,
                                                      loads, test),
        "last": score_predictions(predict_loads(predictor, loads, method="last"), loads, test),
        "even": score_predictions(predict_loads(predictor, loads, method="even"), loads, test),
    }
    if "transition" in predictor.names:
        scores["transition"] = score_predictions(predict_loads(predictor, loads, method="transition"), loads, test)
    if pregate is not None:
        gated = fit_load_predictor(loads, fit, val, routing=routing, window_of_token=window_of_token, pregate=pregate)
        scores["chosen_with_pregate"] = score_predictions(predict_loads(gated, loads, pregate=pregate), loads, test)
    ma = scores["moving_average_10"]
    chosen = scores["chosen"]
    print(f"\n### {name}: {loads.shape[1]} layers x {loads.shape[2]} experts, windows fit {len(fit)} / "
          f"validation {len(val)} / test {len(test)}\n")
    print("| predictor | mean WAPE | mean straggler recall | layers with lower WAPE than MA(10) |")
    print("|---|---|---|---|")
    for key, s in scores.items():
        print(f"| {key} | {s.wape.mean():.4f} | {np.nanmean(s.straggler_recall):.4f} | "
              f"{int((s.wape < ma.wape).sum())} / {len(s.wape)} |")
    print(f"\nchosen per layer: {dict(Counter(predictor.choice))}")
    if per_layer:
        print("\n| layer | chosen | WAPE chosen | WAPE MA(10) | WAPE MA(best) | WAPE last | recall chosen | "
              "recall MA(10) |")
        print("|---|---|---|---|---|---|---|---|")
        best = scores[f"moving_average_{best_h}"]
        for layer in range(loads.shape[1]):
            print(f"| {layer} | {predictor.choice[layer]} | {chosen.wape[layer]:.4f} | {ma.wape[layer]:.4f} | "
                  f"{best.wape[layer]:.4f} | {scores['last'].wape[layer]:.4f} | "
                  f"{chosen.straggler_recall[layer]:.3f} | {ma.straggler_recall[layer]:.3f} |")
    return {
        "choice": list(predictor.choice),
        "best_moving_average_window": best_h,
        "scores": {k: {"wape": s.wape.tolist(), "straggler_recall": s.straggler_recall.tolist()}
                   for k, s in scores.items()},
    }


def simulation_section(loads: np.ndarray, window_s: np.ndarray, device_counts: list[int], extra: int,
                       churn_penalty_s: float) -> list[dict]:
    fit, val, test = split_windows(loads.shape[0])
    predictor = fit_load_predictor(loads, fit, val)
    predicted = predict_loads(predictor, loads)
    rows = []
    for num_devices in device_counts:
        num_experts = loads.shape[2]
        fleet = uniform_fleet(num_devices, (num_experts + extra) // num_devices + 2, fixed_s=FIXED_S,
                              per_token_s=PER_TOKEN_S, expert_gb=EXPERT_GB, cold_start_s=COLD_START_S,
                              price_per_gb_s=PRICE_PER_GB_S, device_memory_gb=DEVICE_GB)
        start = time.perf_counter()
        results = compare_strategies(loads, fleet, extra, predicted, test, window_s, history_window=10,
                                     churn_penalty_s=churn_penalty_s)
        seconds = time.perf_counter() - start
        eplb10, eplb10_init = eplb_schedule(loads, num_devices, extra, test, history_window=10, interval=10)
        results["eplb_every_10"] = replay(loads[test], eplb10, fleet, window_s[test], eplb10_init, name="eplb_every_10")
        loose, loose_init = moeless_schedule(predicted, fleet, extra, test, churn_penalty_s=0.0)
        results["moeless_predicted_no_churn_penalty"] = replay(loads[test], loose, fleet, window_s[test], loose_init)
        total_s = float(window_s[test].sum())
        static_cost = static_deployment_cost(fleet, total_s)
        base = results["static"].summary()["moe_time_per_window_s"]
        print(f"\n### {num_devices} devices, {extra} extra copies, {num_experts + extra} copies max "
              f"({(num_experts + extra) // num_devices} + 2 slots per device), {len(test)} windows, "
              f"{total_s:.0f} s (replay took {seconds:.1f} s)\n")
        print("| strategy | MoE time per window (s) | vs static | balancedness mean / worst | copies alive per "
              "window | created | moved | cold starts | serverless cost ($) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            s = r.summary()
            print(f"| {name} | {s['moe_time_per_window_s']:.4f} | {s['moe_time_per_window_s'] / base - 1:+.1%} | "
                  f"{s['balancedness']:.3f} / {s['balancedness_worst']:.3f} | {s['replicas_alive']:.0f} | "
                  f"{s['replicas_created']} | {s['replicas_moved']} | {s['cold_starts']} | {s['cost']:.4f} |")
            rows.append({"devices": num_devices, "extra": extra, "strategy": name, **s})
        print(f"| static expert-parallel deployment ({num_devices} x {DEVICE_GB:.0f} GB all the time) | | | | | | | | "
              f"{static_cost:.4f} |")
        moeless_cost = results["moeless_predicted"].cost
        print(f"\nMoEless-predicted serverless cost vs the static deployment: {moeless_cost / static_cost - 1:+.1%}; "
              f"EPLB (same copies, billed the same way): {results['eplb'].cost / static_cost - 1:+.1%}")
        per_layer = {n: results[n].layer_time_s.mean(0) for n in ("static", "eplb", "moeless_predicted")}
        print("\nper-layer straggler latency (ms, mean over windows), layers 0-57 in steps of 8:")
        for n, v in per_layer.items():
            print(f"  {n}: " + " ".join(f"{1e3 * v[i]:.3f}" for i in range(0, len(v), 8)))
        rows.append({"devices": num_devices, "strategy": "static_deployment", "cost": static_cost,
                     "per_layer_ms": {n: (1e3 * v).tolist() for n, v in per_layer.items()}})
    return rows


def churn_section(loads: np.ndarray, window_s: np.ndarray, extra: int, penalties: list[float]) -> list[dict]:
    fit, val, test = split_windows(loads.shape[0])
    predicted = predict_loads(fit_load_predictor(loads, fit, val), loads)
    num_devices, num_experts = 32, loads.shape[2]
    fleet = uniform_fleet(num_devices, (num_experts + extra) // num_devices + 2, fixed_s=FIXED_S,
                          per_token_s=PER_TOKEN_S, expert_gb=EXPERT_GB, cold_start_s=COLD_START_S,
                          price_per_gb_s=PRICE_PER_GB_S)
    print(f"\n## 3b. Churn penalty sweep, MoEless-predicted, {num_devices} devices, {extra} extra copies\n")
    print("| churn penalty (s per new copy) | MoE time per window (s) | balancedness mean | cold starts | "
          "moved | serverless cost ($) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for penalty in penalties:
        placed, initial = moeless_schedule(predicted, fleet, extra, test, churn_penalty_s=penalty)
        s = replay(loads[test], placed, fleet, window_s[test], initial).summary()
        rows.append({"churn_penalty_s": penalty, **s})
        print(f"| {penalty:g} | {s['moe_time_per_window_s']:.4f} | {s['balancedness']:.3f} | {s['cold_starts']} | "
              f"{s['replicas_moved']} | {s['cost']:.4f} |", flush=True)
    return rows


def synthetic_pregate(routing: np.ndarray, window_of_token: np.ndarray, num_experts: int, num_windows: int,
                      accuracy: float, seed: int) -> np.ndarray:
    """Pre-gating stand-in: each pick is right with probability `accuracy`, otherwise a random expert."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(routing.shape) > accuracy
    noisy = np.where(wrong, rng.integers(0, num_experts, routing.shape), routing)
    return loads_from_routing(noisy, window_of_token, num_experts, num_windows)


def predictors(args: argparse.Namespace, main_loads: np.ndarray, load_sets: dict[str, np.ndarray]) -> dict:
    print("\n## 2. Load predictors on held-out windows (WAPE = sum |pred - true| / sum true)")
    report = {"loads": predictor_section(f"zipf {args.zipf}, loads only", main_loads, per_layer=not args.quick)}
    route_windows, route_tokens = (40, 256) if args.quick else (64, 384)
    trace = zipf_drift_routing(num_windows=route_windows, tokens_per_window=route_tokens, zipf_s=args.zipf,
                               seed=args.seed + 2)
    pregate = synthetic_pregate(trace.routing, trace.window_of_token, 256, route_windows, 0.7, args.seed + 3)
    report["routing"] = predictor_section(
        f"zipf {args.zipf}, token routing ({route_tokens} tokens per window), 70%-accurate pre-gating",
        trace.loads, trace.routing, trace.window_of_token, pregate, per_layer=False)
    if args.loads is not None and load_sets[args.loads.stem].shape[0] >= 40:
        report["given"] = predictor_section(args.loads.stem, load_sets[args.loads.stem])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer matrices, windows and configurations")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--only", default="balance,hetero,predictors,simulation,churn",
                        help="comma-separated sections to run")
    parser.add_argument("--loads", type=Path, help="extra [windows, layers, experts] loads (.npy)")
    parser.add_argument("--azure", type=Path, default=AZURE_DEFAULT if AZURE_DEFAULT.exists() else None)
    parser.add_argument("--window-s", type=float, default=30.0, help="scheduling window on the arrival trace")
    parser.add_argument("--zipf", type=float, default=0.8, help="skew of the main synthetic case")
    parser.add_argument("--churn-penalty-s", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    num_windows = 56 if args.quick else 104
    if args.azure is not None:
        tokens = azure_tokens_per_window(args.azure, args.window_s, 4096)[:num_windows]
        num_windows = len(tokens)
        source = f"{args.azure.name}, {args.window_s:.0f} s windows"
    else:
        tokens = np.full(num_windows, 4096)
        source = "constant 4096 tokens per window"
    window_s = np.full(num_windows, args.window_s)
    print(f"# MoEless benchmark\n\nsynthetic loads: 58 layers x 256 experts, top-8, tokens per window from {source} "
          f"(mean {tokens.mean():.0f}, min {tokens.min()}, max {tokens.max()}); seed {args.seed}")
    main_loads = zipf_drift_loads(num_windows=num_windows, tokens_per_window=tokens, zipf_s=args.zipf, seed=args.seed)
    load_sets = {f"zipf {args.zipf}": main_loads}
    if not args.quick:
        for skew in (0.6, 1.0):
            load_sets[f"zipf {skew}"] = zipf_drift_loads(num_windows=8, tokens_per_window=tokens[:8], zipf_s=skew,
                                                         seed=args.seed + 1)
    if args.loads is not None:
        extra_loads = np.load(args.loads)
        load_sets[args.loads.stem] = extra_loads[None] if extra_loads.ndim == 2 else extra_loads
    report: dict = {"source": source, "tokens_per_window": tokens.tolist()}

    sections = set(args.only.split(","))
    devices = [8, 32] if args.quick else [8, 16, 32, 64]
    if "balance" in sections:
        report["balance"] = balance_section(load_sets, devices, matrices=2 if args.quick else 6)
    if "hetero" in sections:
        report["heterogeneous"] = heterogeneous_section(main_loads, matrices=2 if args.quick else 6)
    if "predictors" in sections:
        report["predictors"] = predictors(args, main_loads, load_sets)
    if "simulation" in sections:
        print(f"\n## 3. Replay of the skewed case (zipf {args.zipf}); churn penalty {args.churn_penalty_s} s per "
              "new copy")
        report["simulation"] = simulation_section(main_loads, window_s, [8, 32], extra=32,
                                                  churn_penalty_s=args.churn_penalty_s)
    if "churn" in sections:
        report["churn"] = churn_section(main_loads, window_s, 32, [0.0, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5])
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
