"""Remoe's request-arrival pre-warming: SPS prediction -> the functions to start."""

from __future__ import annotations

import numpy as np

from cli_run import run_cli
from moeserve.experts.prewarm import SpsPrewarmer, functions_to_prewarm
from moeserve.plan.placement import ExpertFunction, ExpertPlacement


def half_remote(layers=(0, 1), experts=8) -> ExpertPlacement:
    local = {layer: tuple(range(experts // 2)) for layer in layers}
    fns = tuple(ExpertFunction(f"L{layer}-r0", layer, tuple(range(experts // 2, experts))) for layer in layers)
    return ExpertPlacement(local, fns)


def test_functions_to_prewarm_sums_remote_shares_per_function():
    placement = half_remote()
    predicted = np.zeros((2, 8))
    predicted[0, :4] = 0.25  # layer 0: everything predicted on local experts
    predicted[1, 4] = 0.05  # layer 1: 5% on a remote expert
    predicted[1, :4] = 0.95 / 4
    assert functions_to_prewarm(predicted, [0, 1], placement, threshold=0.02) == ["L1-r0"]
    assert functions_to_prewarm(predicted, [0, 1], placement, threshold=0.10) == []
    assert functions_to_prewarm(predicted, [0, 1], placement, threshold=0.0) == ["L0-r0", "L1-r0"]


class RecordingPool:
    def __init__(self):
        self.calls = []

    def prewarm(self, ids, wait=False):
        self.calls.append(list(ids))


def test_prewarmer_on_a_real_trace(tiny_model_dirs, tmp_path):
    from moeserve.models.loading import load_input_embeddings
    from moeserve.remoe.sps import SpsPredictor
    from moeserve.traces.format import ExpertTrace

    model_dir = tiny_model_dirs["qwen3_moe"]
    r = run_cli("profile", model_dir, "--prompts", "builtin:mixed", "--max-prompts", "24", "--gen-tokens", "2",
                "--batch-size", "8", "--out", tmp_path / "t.trace")
    assert r.code == 0, r.err
    trace = ExpertTrace.open(tmp_path / "t.trace")
    predictor = SpsPredictor.build(trace["prompt_vectors"], trace["prefill_activation"].astype(np.float64))
    pool = RecordingPool()
    hook = SpsPrewarmer(predictor, load_input_embeddings(model_dir), [0, 1], half_remote(), pool, threshold=0.0)

    class Request:
        prompt_ids = trace["token_ids"][trace.request_slice(0)][:10].tolist()

    hook(Request())
    assert pool.calls == [["L0-r0", "L1-r0"]] and hook.prewarmed == {"L0-r0": 1, "L1-r0": 1}
    hook.threshold = 1.01  # no function's predicted share can reach this
    hook(Request())
    assert len(pool.calls) == 1
