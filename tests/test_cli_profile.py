from __future__ import annotations

import json

import numpy as np
import pytest

from cli_run import run_cli
from moeserve.traces.format import ExpertTrace


def test_profile_writes_a_trace_and_summary(tiny_model_dirs, tmp_path):
    out = tmp_path / "t.trace"
    r = run_cli("profile", tiny_model_dirs["deepseek_v3"], "--prompts", "builtin:mixed", "--max-prompts", "8",
                "--gen-tokens", "4", "--batch-size", "3", "--router-probs", "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    trace = ExpertTrace.open(out)
    assert s["requests"] == trace.num_requests == 8
    assert s["decode_tokens"] == int((trace["phase"] == 1).sum()) <= 8 * 3
    assert sorted(set(trace.meta.domains)) == ["chat", "code", "math", "qa"]
    assert trace.meta.moe_layer_indices == [1, 2] and trace.meta.geometry["family"] == "deepseek_v3"
    probs = trace["router_probs"].astype(np.float32)
    assert probs.shape == (trace.num_tokens, 2, 16)
    # the chosen experts are among the best-scored ones under the selection bias; scores are sigmoid in (0,1)
    assert (probs > 0).all() and (probs < 1).all()
    pre = trace["prefill_activation"]
    assert np.allclose(pre.sum(-1), 1.0, atol=1e-5)
    assert len(s["per_layer"]["overlap"]) == 2


def test_profile_txt_and_jsonl_sources(tiny_model_dirs, tmp_path):
    (tmp_path / "p.txt").write_text("what is the capital of france?\n\nsolve 12 plus 30\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "def add(a, b):", "domain": "code"}) + "\n")
    for src in ("p.txt", "p.jsonl"):
        out = tmp_path / f"{src}.trace"
        r = run_cli("profile", tiny_model_dirs["qwen3_moe"], "--prompts", tmp_path / src, "--gen-tokens", "2",
                    "--out", out)
        assert r.code == 0, r.err
        assert ExpertTrace.open(out).num_requests == (2 if src == "p.txt" else 1)


@pytest.mark.parametrize("case", ["missing-model", "dense", "empty-file", "malformed", "unknown-builtin", "nothing"])
def test_profile_bad_input_is_one_line_exit_2_and_no_output(case, tiny_model_dirs, tmp_path):
    out = tmp_path / "t.trace"
    model, prompts = tiny_model_dirs["qwen3_moe"], "builtin:mtbench"
    if case == "missing-model":
        model = tmp_path / "nope"
    elif case == "dense":
        model = tiny_model_dirs["dense"]
    elif case == "empty-file":
        (tmp_path / "e.txt").write_text("")
        prompts = tmp_path / "e.txt"
    elif case == "malformed":
        (tmp_path / "m.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
        prompts = tmp_path / "m.jsonl"
    elif case == "unknown-builtin":
        prompts = "builtin:nope"
    args = ["profile", model, "--gen-tokens", "2", "--out", out] + ([] if case == "nothing" else ["--prompts", prompts])
    r = run_cli(*args)
    assert r.code == 2, (case, r)
    assert r.err.strip().count("\n") == 0 and r.err.startswith("moeserve: error:"), r.err
    if case == "dense":
        assert "dense model" in r.err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".t.trace")] == []
