"""ReMoE router fine-tuning: only routers change, reuse goes up, the output is a usable model."""

from __future__ import annotations

import json

import pytest
import torch

from cli_run import run_cli
from moeserve.errors import MoeServeError
from moeserve.finetune.losses import kl_to_reference, reuse_loss, reuse_targets
from moeserve.finetune.router_training import router_parameters
from moeserve.models.adapter import moe_layers
from moeserve.traces.format import ExpertTrace
from tiny_models import tiny_model


def test_reuse_targets_window_and_decay():
    chosen = torch.tensor([[[0, 1], [2, 3], [0, 4]]])  # 1 sequence, 3 tokens, top-2, 5 experts
    t = reuse_targets(chosen, 5, window=2, decay=0.5)
    assert t[0, 0].tolist() == [0, 0, 0, 0, 0]
    assert t[0, 1].tolist() == [1, 1, 0, 0, 0]
    assert t[0, 2].tolist() == [0.5, 0.5, 1, 1, 0]  # most recent use wins


def test_reuse_loss_and_kl_extremes():
    chosen = torch.tensor([[[0], [0]]])
    targets = reuse_targets(chosen, 3)
    all_on_prev = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]]])
    assert reuse_loss(all_on_prev, targets).item() == pytest.approx(0.0)
    p = torch.softmax(torch.randn(1, 4, 6), -1)
    assert kl_to_reference(p, p).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_finetune_changes_only_routers_and_raises_reuse(family, tiny_model_dirs, tmp_path):
    out = tmp_path / "ft"
    r = run_cli("finetune-router", tiny_model_dirs[family], "--prompts", "builtin:mixed", "--max-prompts", "40",
                "--steps", "25", "--seq-len", "32", "--lr", "0.02", "--reuse-weight", "2", "--kl-weight", "0.01",
                "--out", out, "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    model = tiny_model(family)
    router_names = {n for n, p in model.named_parameters()
                    if any(p is q for layer in moe_layers(model) for q in layer.router.parameters())}
    assert report["router_tensors_changed"] and set(report["router_tensors_changed"]) <= router_names
    assert report["summary"]["overlap_after"] > report["summary"]["overlap_before"]
    assert set(report["perplexity"]) == {"chat", "code", "math", "qa"}
    for row in report["cache"]:
        assert row["belady_before"] >= row["lru_before"] - 1e-12 and row["belady_after"] >= row["lru_after"] - 1e-12
    # a complete HF directory, usable as MODEL by the other commands
    assert (out / "router.safetensors").is_file() and (out / "finetune-report.json").is_file()
    r = run_cli("profile", out, "--prompts", "builtin:math", "--max-prompts", "2", "--gen-tokens", "2",
                "--out", tmp_path / "t.trace")
    assert r.code == 0, r.err
    assert ExpertTrace.open(tmp_path / "t.trace").num_requests == 2


def test_router_without_weights_is_refused():
    model = tiny_model("qwen3_moe")
    layers = moe_layers(model)
    for layer in layers:
        layer.router = torch.nn.Identity()  # a router with no parameters
    with pytest.raises(MoeServeError, match="no trainable weights"):
        router_parameters(layers)


@pytest.mark.parametrize("case", ["dense", "steps", "unwritable", "exists"])
def test_bad_input_leaves_no_output(case, tiny_model_dirs, tmp_path):
    out = tmp_path / "ft"
    model, steps = tiny_model_dirs["qwen3_moe"], "5"
    if case == "dense":
        model = tiny_model_dirs["dense"]
    elif case == "steps":
        steps = "0"
    elif case == "unwritable":  # below a regular file: no user, root included, can create it
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "ft"
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    r = run_cli("finetune-router", model, "--prompts", "builtin:mixed", "--max-prompts", "20", "--steps", steps,
                "--seq-len", "16", "--out", out)
    assert r.code == 2, (case, r.err)
    assert r.err.strip().count("\n") == 0
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    elif case != "unwritable":
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ft.")] == []
