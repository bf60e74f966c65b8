"""Synthetic traces (traces/synth.py): the generator hits its targets and is deterministic per seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_run import run_cli
from moeserve.traces.format import ExpertTrace
from moeserve.traces.importer import routing_to_trace
from moeserve.traces.stats import trace_stats
from moeserve.traces.synth import RoutingTargets, depth_map, synthesize_routing


def _layout(requests: int = 120, domains: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 60, size=requests)
    return np.concatenate([[0], np.cumsum(lengths)]), np.arange(requests) % domains


def _stats(ids, offsets, domain, experts):
    names = ["a", "b", "c", "d"]
    tr = routing_to_trace(ids, offsets, experts, domains=[names[d] for d in domain])
    return trace_stats(tr)


TARGETS = RoutingTargets(hot10=np.array([0.25, 0.35, 0.45]), overlap=np.array([0.2, 0.35, 0.5]),
                         domain_jsd=np.array([0.03, 0.06, 0.1]))


@pytest.mark.parametrize("experts,top_k", [(64, 4), (128, 8)])
def test_generator_matches_its_targets(experts, top_k):
    offsets, domain = _layout()
    ids, cal = synthesize_routing(TARGETS, offsets, domain, experts, top_k, seed=3)
    assert ids.shape == (offsets[-1], 3, top_k) and ids.min() >= 0 and ids.max() < experts
    assert (np.sort(ids, axis=-1)[..., 1:] != np.sort(ids, axis=-1)[..., :-1]).all()  # distinct per token
    s = _stats(ids, offsets, domain, experts)
    np.testing.assert_allclose(s.hot10_share, TARGETS.hot10, atol=0.03)
    np.testing.assert_allclose(s.overlap, TARGETS.overlap, atol=0.05)
    np.testing.assert_allclose(s.domain_jsd, TARGETS.domain_jsd, atol=0.02)
    assert (np.diff(cal.zipf_s) > 0).all() and (np.diff(cal.rho) > 0).all()  # more skew and reuse asked, more given


def test_generator_is_deterministic_per_seed():
    offsets, domain = _layout(40)
    a, _ = synthesize_routing(TARGETS, offsets, domain, 32, 4, seed=1)
    b, _ = synthesize_routing(TARGETS, offsets, domain, 32, 4, seed=1)
    c, _ = synthesize_routing(TARGETS, offsets, domain, 32, 4, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_depth_map():
    assert depth_map(4, 7).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert depth_map(10, 1).tolist() == [0] and depth_map(3, 3).tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def like_trace(tmp_path_factory):
    """A measured-looking trace (not marked synthetic): 4 layers x 16 experts, top-2, three domains."""
    offsets, domain = _layout(60, seed=5)
    t = RoutingTargets(np.array([0.3, 0.35, 0.4, 0.45]), np.array([0.3, 0.3, 0.4, 0.4]), np.full(4, 0.05))
    ids, _ = synthesize_routing(t, offsets, domain, 16, 2, seed=9)
    tr = routing_to_trace(ids, offsets, 16, prompt_lengths=np.diff(offsets) - 4,
                          domains=[["code", "math", "prose"][d] for d in domain], source="test")
    return tr.save(tmp_path_factory.mktemp("like") / "like.trace")


def test_cli_synth_marks_the_trace_synthetic(like_trace, tmp_path):
    out = tmp_path / "mixtral.trace"
    r = run_cli("trace", "synth", "--model", "mixtral-8x7b", "--like", like_trace, "--out", out, "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    tr = ExpertTrace.open(out)
    assert (tr.meta.num_moe_layers, tr.meta.num_experts, tr.meta.top_k) == (32, 8, 2) == \
        (s["layers"], s["experts"], s["top_k"])
    assert tr.meta.generation["synthetic"] is True and tr.meta.generation["like"] == str(like_trace)
    assert tr.meta.geometry["hidden_size"] == 4096 and tr.meta.domains.count("code") == 20
    assert (tr["phase"] == 1).sum() == 60 * 4  # the like trace's prefill/decode split
    again = tmp_path / "again.trace"
    assert run_cli("trace", "synth", "--model", "mixtral-8x7b", "--like", like_trace, "--out", again).code == 0
    assert np.array_equal(ExpertTrace.open(again)["expert_ids"], tr["expert_ids"])
    r = run_cli("trace", "synth", "--model", "mixtral-8x7b", "--like", out, "--out", tmp_path / "x.trace")
    assert r.code == 2 and "itself synthetic" in r.err
    r = run_cli("trace", "synth", "--model", "mixtral", "--like", like_trace, "--out", tmp_path / "x.trace")
    assert r.code == 2 and "unknown model 'mixtral'" in r.err and len(r.err.strip().splitlines()) == 1
