from __future__ import annotations

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.traces.activation import activation_matrix, prompt_vector, soft_cosine
from moeserve.traces.format import ExpertTrace, TraceMeta


def make_trace(num_experts=32, layers=3, top_k=4, lengths=(5, 7, 3), seed=0, probs=False):
    rng = np.random.default_rng(seed)
    t = sum(lengths)
    ids = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(t)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    phase = np.concatenate([[0] * (n - min(2, n - 1)) + [1] * min(2, n - 1) for n in lengths])
    meta = TraceMeta(num_moe_layers=layers, num_experts=num_experts, top_k=top_k, moe_layer_indices=list(range(layers)),
                     prompt_ids=[f"p{i}" for i in range(len(lengths))], domains=["a", "b", None])
    acts = np.stack([activation_matrix(ids[offsets[r]:offsets[r + 1]], num_experts) for r in range(len(lengths))])
    return ExpertTrace.from_arrays(
        meta, expert_ids=ids, expert_weights=rng.random((t, layers, top_k)), phase=phase,
        request_offsets=offsets, token_ids=rng.integers(0, 100, t), prefill_activation=acts,
        decode_activation=acts, prompt_vectors=rng.standard_normal((len(lengths), 8)),
        router_probs=rng.random((t, layers, num_experts)) if probs else None,
    )


def test_round_trip_same_arrays(tmp_path):
    trace = make_trace(probs=True)
    path = trace.save(tmp_path / "t.trace")
    back = ExpertTrace.open(path)
    assert back.meta.domains == ["a", "b", None] and back.meta.prompt_ids == ["p0", "p1", "p2"]
    for name in ("expert_ids", "expert_weights", "phase", "request_offsets", "token_ids", "prefill_activation",
                 "decode_activation", "prompt_vectors", "router_probs"):
        assert np.array_equal(back[name], trace[name]), name
        assert back[name].dtype == trace[name].dtype
    assert back["expert_ids"].dtype == np.uint8
    assert back.num_requests == 3 and back.num_tokens == 15
    assert back.request_slice(1) == slice(5, 12)


def test_a_trace_written_before_0_2_still_opens(tmp_path):
    """Older traces name the MoE-layer count `num_layers` (ModelGeometry.num_layers counts every layer)."""
    import json

    from safetensors.numpy import save_file

    trace = make_trace()
    path = trace.save(tmp_path / "new.trace")
    old = ExpertTrace.open(path)
    header = json.loads(json.dumps(vars(old.meta)))
    header["num_layers"] = header.pop("num_moe_layers")
    tensors = {name: old[name] for name in header["crc32"]}
    save_file(tensors, str(tmp_path / "old.trace"), metadata={"moeserve": json.dumps(header)})
    back = ExpertTrace.open(tmp_path / "old.trace")
    assert back.meta.num_moe_layers == 3 and np.array_equal(back["expert_ids"], trace["expert_ids"])


def test_many_experts_use_int16(tmp_path):
    trace = make_trace(num_experts=300)
    back = ExpertTrace.open(trace.save(tmp_path / "t"))
    assert back["expert_ids"].dtype == np.int16 and back["expert_ids"].max() < 300


def test_truncated_trace_is_refused(tmp_path):
    path = make_trace().save(tmp_path / "t")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(MoeServeError, match="truncated|corrupt|not a readable"):
        trace = ExpertTrace.open(path)
        trace["expert_ids"], trace["prompt_vectors"]


def test_corrupted_bytes_are_refused(tmp_path):
    path = make_trace().save(tmp_path / "t")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the last tensor's data
    path.write_bytes(bytes(data))
    trace = ExpertTrace.open(path)
    with pytest.raises(MoeServeError, match="checksum"):
        for name in sorted(trace.meta.crc32):
            trace[name]


def test_not_a_trace(tmp_path):
    (tmp_path / "x").write_text("hello")
    with pytest.raises(MoeServeError):
        ExpertTrace.open(tmp_path / "x")
    with pytest.raises(MoeServeError, match="not found"):
        ExpertTrace.open(tmp_path / "nope")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import moeserve.traces.format

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(moeserve.traces.format, "save_file", boom)
    with pytest.raises(RuntimeError):
        make_trace().save(tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_activation_matrix_rows_sum_to_one():
    ids = np.array([[[0, 1]], [[1, 2]]])  # 2 tokens, 1 layer, top-2
    act = activation_matrix(ids, 4)
    assert np.allclose(act, [[0.25, 0.5, 0.25, 0.0]])


def test_soft_cosine_equals_cosine_of_summed_normalised_embeddings():
    """Remoe's soft cosine over token embeddings with 0/1 alignment vectors == cos(u_a, u_b)."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((50, 16))
    a_tokens, b_tokens = rng.integers(0, 50, 9), rng.integers(0, 50, 13)
    positions = np.concatenate([a_tokens, b_tokens])  # one coordinate per token position of either prompt
    unit = emb[positions] / np.linalg.norm(emb[positions], axis=1, keepdims=True)
    s = unit @ unit.T  # S_ij = cos(e_i, e_j)
    a = np.r_[np.ones(9), np.zeros(13)]
    b = np.r_[np.zeros(9), np.ones(13)]
    u_a, u_b = prompt_vector(emb[a_tokens]), prompt_vector(emb[b_tokens])
    plain = float(u_a @ u_b / np.linalg.norm(u_a) / np.linalg.norm(u_b))
    assert soft_cosine(a, b, s) == pytest.approx(plain, abs=1e-6)
