from __future__ import annotations

import numpy as np
import pytest

from moeserve.traces.stats import consecutive_overlap, js_divergence, trace_stats
from test_trace_format import make_trace


def naive_overlap(ids, offsets, k):
    vals = []
    for r in range(len(offsets) - 1):
        for t in range(offsets[r] + 1, offsets[r + 1]):
            vals.append([len(set(ids[t, l_]) & set(ids[t - 1, l_])) / k for l_ in range(ids.shape[1])])
    return np.mean(vals, axis=0)


def test_overlap_matches_naive_and_ignores_request_boundaries():
    trace = make_trace(num_experts=6, top_k=3, lengths=(4, 9, 1, 5), seed=3)
    ids, off = trace["expert_ids"], trace["request_offsets"]
    assert np.allclose(consecutive_overlap(ids, off), naive_overlap(ids, off, 3))


def test_decode_only_overlap_pairs_consecutive_decode_tokens():
    ids = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 4]], [[5, 6]], [[5, 7]]])  # 6 tokens, 1 layer, top-2
    off = np.array([0, 4, 6])
    decode = np.array([False, False, True, True, False, True])
    # decode pairs: (2,3) in request 0 only -> |{2,3} & {2,4}| / 2 = 0.5; request 1 has one decode token
    assert consecutive_overlap(ids, off, decode).tolist() == [0.5]


def test_overlap_of_identical_tokens_is_one():
    ids = np.tile(np.array([[[1, 2]]]), (5, 1, 1))
    assert consecutive_overlap(ids, np.array([0, 5])).tolist() == [1.0]


def test_jsd_bounds():
    p = np.array([1.0, 0, 0, 0])
    q = np.array([0, 0, 0, 1.0])
    assert js_divergence(p, q) == pytest.approx(1.0)
    assert js_divergence(p, p) == pytest.approx(0.0)


def test_stats_shapes_and_ranges():
    s = trace_stats(make_trace(seed=2)).to_dict()
    assert len(s["entropy"]) == 3
    assert all(0 < h <= 1 for h in s["entropy"])
    assert all(a <= b <= 1 for a, b in zip(s["hot10_share"], s["hot25_share"], strict=True))
    assert all(d is not None and d > 0 for d in s["domain_jsd"])
