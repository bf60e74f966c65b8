from __future__ import annotations

import json

import numpy as np

from cli_run import run_cli
from moeserve.traces.format import ExpertTrace


def test_import_vllm_style_routing_then_stats(tmp_path, tiny_model_dirs):
    rng = np.random.default_rng(0)
    lengths = [7, 4, 9]
    routing = np.stack([[rng.choice(16, 4, replace=False) for _ in range(2)] for _ in range(sum(lengths))])
    np.savez(tmp_path / "r.npz", routed_experts=routing, request_lengths=np.array(lengths),
             prompt_lengths=np.array([5, 2, 6]))
    r = run_cli("trace", "import", tmp_path / "r.npz", "--model", tiny_model_dirs["deepseek_v3"],
                "--out", tmp_path / "t.trace", "--json")
    assert r.code == 0, r.err
    trace = ExpertTrace.open(tmp_path / "t.trace")
    assert np.array_equal(trace["expert_ids"], routing)
    assert trace.meta.moe_layer_indices == [1, 2]
    assert trace["phase"].tolist() == [0] * 5 + [1] * 2 + [0] * 2 + [1] * 2 + [0] * 6 + [1] * 3
    r = run_cli("trace", "stats", tmp_path / "t.trace", "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["requests"] == 3 and s["tokens"] == 20 and len(s["per_layer"]["entropy"]) == 2


def test_import_errors(tmp_path, tiny_model_dirs):
    np.save(tmp_path / "bad.npy", np.zeros((5, 3, 4), dtype=np.int64))
    r = run_cli("trace", "import", tmp_path / "bad.npy", "--model", tiny_model_dirs["deepseek_v3"],
                "--lengths", tmp_path / "none.txt", "--out", tmp_path / "t")
    assert r.code == 2 and "MoE layers" in r.err
    np.save(tmp_path / "ok.npy", np.full((5, 2, 4), 20, dtype=np.int64))
    (tmp_path / "len.txt").write_text("2 3\n")
    r = run_cli("trace", "import", tmp_path / "ok.npy", "--num-experts", "16", "--lengths", tmp_path / "len.txt",
                "--out", tmp_path / "t")
    assert r.code == 2 and "outside [0, 16)" in r.err
    assert not (tmp_path / "t").exists()
    r = run_cli("trace", "stats", tmp_path / "missing.trace")
    assert r.code == 2 and "not found" in r.err
