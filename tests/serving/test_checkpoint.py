"""Reading single experts from safetensors equals the loaded model's expert weights, for every family."""

from __future__ import annotations

import pytest
import torch

from moeserve.errors import MoeServeError
from moeserve.models.adapter import expert_weights, moe_layers
from moeserve.models.checkpoint import CheckpointExperts, read_experts
from moeserve.models.loading import DEMO_MODEL_DIR, load_model
from tiny_models import TINY_CONFIGS, tiny_model


def assert_same_experts(model, model_dir) -> None:
    layers = moe_layers(model)
    with CheckpointExperts(model_dir) as ckpt:
        assert ckpt.layers() == [la.index for la in layers]
        for la in layers:
            for e in range(la.num_experts):
                want = expert_weights(la, e).tensors()
                got = ckpt.read(la.index, e, la.layout, la.experts.down_proj.dtype).tensors()
                assert got.keys() == want.keys(), (la.index, e)
                for name in want:
                    assert torch.equal(got[name], want[name]), (la.index, e, name)
                    assert got[name].is_contiguous()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_read_equals_loaded_model(tiny_model_dirs, family):
    assert_same_experts(load_model(tiny_model_dirs[family]), tiny_model_dirs[family])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "granitemoe"])
def test_sharded_checkpoint(tmp_path, family):
    model = tiny_model(family, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_same_experts(load_model(tmp_path), tmp_path)


def test_dtype_cast_and_read_experts(tiny_model_dirs):
    model = load_model(tiny_model_dirs["gpt_oss"])
    la = moe_layers(model)[-1]
    got = read_experts(tiny_model_dirs["gpt_oss"], la.index, [1, 6], la.layout, torch.bfloat16)
    assert sorted(got) == [1, 6]
    for e, w in got.items():
        for name, t in expert_weights(la, e).tensors().items():
            assert w.tensors()[name].dtype == torch.bfloat16
            assert torch.equal(w.tensors()[name], t.to(torch.bfloat16))


def test_missing_layer_and_expert(tiny_model_dirs):
    model = load_model(tiny_model_dirs["deepseek_v3"])
    la = moe_layers(model)[0]
    with CheckpointExperts(tiny_model_dirs["deepseek_v3"]) as ckpt:
        assert 0 not in ckpt.layers()  # first_k_dense_replace=1: layer 0 is dense
        with pytest.raises(MoeServeError, match="layer 0"):
            ckpt.read(0, 0, la.layout)
        with pytest.raises(MoeServeError, match="expert 99"):
            ckpt.read(la.index, 99, la.layout)
    with CheckpointExperts(tiny_model_dirs["dense"]) as ckpt:
        assert ckpt.layers() == []


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not built yet (assets/demo)")
def test_demo_model():
    assert_same_experts(load_model("demo"), DEMO_MODEL_DIR)  # bf16 on disk, read at the loaded dtype
