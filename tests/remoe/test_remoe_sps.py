from __future__ import annotations

import numpy as np
import pytest

from moeserve.errors import MoeServeError
from moeserve.remoe.sps import (
    SpsPredictor,
    build_sps_tree,
    kmedoids_cosine,
    normalise_rows,
    predict_activation,
    recall,
    search_brute_force,
    search_tree,
    softmax_weights,
)
from moeserve.remoe.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(2400, 3, 16, dim=32, seed=7)


def test_kmedoids_medoids_maximise_summed_similarity_and_points_join_the_nearest():
    rng = np.random.default_rng(0)
    x = normalise_rows(rng.standard_normal((300, 8)) + 2.0 * np.repeat(np.eye(8)[:5], 60, axis=0))
    labels, medoids = kmedoids_cosine(x, 5, rng, iterations=20)
    sims = x @ x[medoids].T
    assert np.array_equal(labels, np.argmax(sims, axis=1))
    for c, medoid in enumerate(medoids):
        members = np.flatnonzero(labels == c)
        summed = (x[members] @ x[members].T).sum(axis=1)  # O(s^2) reference
        assert summed[list(members).index(medoid)] == pytest.approx(summed.max(), rel=1e-5)


def test_tree_holds_every_prompt_once_in_small_leaves(trace):
    tree = build_sps_tree(trace.vectors, leaf_size=50, fanout=4, seed=1)
    assert np.array_equal(np.sort(tree.members), np.arange(trace.vectors.shape[0]))
    leaves = tree.child_count == 0
    assert tree.leaf_count[leaves].max() <= 50
    assert tree.leaf_count[leaves].sum() == trace.vectors.shape[0]
    assert tree.child_count.max() <= 4 and tree.depth >= 3


def test_brute_force_equals_a_full_sort(trace):
    queries = trace.vectors[:20] + 0.1
    idx, sims = search_brute_force(trace.vectors, queries, alpha=15)
    full = normalise_rows(queries) @ normalise_rows(trace.vectors).T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :15]
    assert np.allclose(np.take_along_axis(full, expected, axis=1), sims, atol=1e-6)
    assert np.allclose(np.take_along_axis(full, idx, axis=1), sims, atol=1e-6)


def test_tree_search_recall_against_brute_force(trace):
    history, queries = trace.vectors[:2000], trace.vectors[2000:]
    tree = build_sps_tree(history, leaf_size=150, fanout=8, seed=0)
    exact, _ = search_brute_force(history, queries, 15)
    leaves = int((tree.child_count == 0).sum())
    recalls = [recall(search_tree(tree, queries, 15, probe_leaves=p)[0], exact) for p in (1, 3, leaves)]
    assert recalls[0] >= 0.8  # greedy descent + sibling borrowing, the paper's search
    assert recalls[1] >= recalls[0]
    assert recalls[2] == 1.0  # probing every leaf is exhaustive


def test_centroid_routing_is_exhaustive_with_every_leaf_and_rejects_unknown_modes(trace):
    history, queries = trace.vectors[:1500], trace.vectors[2000:2100]
    tree = build_sps_tree(history, leaf_size=100, routing="centroid")
    assert np.allclose(np.linalg.norm(tree.node_vector[1:], axis=1), 1.0, atol=1e-5)
    exact, _ = search_brute_force(history, queries, 15)
    leaves = int((tree.child_count == 0).sum())
    assert recall(search_tree(tree, queries, 15, probe_leaves=leaves)[0], exact) == 1.0
    assert recall(search_tree(tree, queries, 15)[0], exact) >= 0.8
    with pytest.raises(MoeServeError, match="routing"):
        build_sps_tree(history, routing="random")


def test_short_leaves_borrow_and_small_histories_return_everything(trace):
    tree = build_sps_tree(trace.vectors[:400], leaf_size=5, fanout=8, seed=0)
    idx, sims = search_tree(tree, trace.vectors[400:410], alpha=15)
    assert idx.shape == (10, 15) and np.all(np.diff(sims, axis=1) <= 1e-7)
    assert all(len(set(row)) == 15 for row in idx)
    tiny = build_sps_tree(trace.vectors[:7], leaf_size=150)
    idx, _ = search_tree(tiny, trace.vectors[7:9], alpha=15)
    assert idx.shape == (2, 7)


def test_identical_vectors_still_build_a_tree():
    vectors = np.ones((500, 4), dtype=np.float32)
    tree = build_sps_tree(vectors, leaf_size=20)
    assert tree.leaf_count[tree.child_count == 0].max() <= 20
    idx, _ = search_tree(tree, vectors[:1], alpha=15)
    assert idx.shape == (1, 15)


def test_softmax_prediction_and_temperature():
    sims = np.array([[0.9, 0.8, 0.1]], dtype=np.float32)
    w1 = softmax_weights(sims, 1.0)
    assert w1.sum() == pytest.approx(1.0)
    assert w1.max() / w1.min() == pytest.approx(np.exp(0.8))  # cosines in [-1, 1]: nearly uniform at T = 1
    w_sharp = softmax_weights(sims, 0.01)
    assert w_sharp[0, 0] > 0.99
    activations = (
        np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 2)).astype(np.float32)
    )  # [P=3, L=2, K=5]
    pred = predict_activation(np.array([[0, 1, 2]]), sims, activations, 1.0)
    assert np.allclose(pred[0], np.einsum("a,alk->lk", w1[0], activations), atol=1e-6)
    assert np.allclose(pred.sum(axis=-1), 1.0, atol=1e-5)
    with pytest.raises(MoeServeError, match="temperature"):
        softmax_weights(sims, 0.0)


def test_predictor_api_and_input_errors(trace):
    predictor = SpsPredictor.build(trace.vectors[:500], trace.prefill[:500], trace.decode[:500], alpha=10)
    pre, dec = predictor.predict(trace.vectors[500:503])
    assert pre.shape == dec.shape == (3, 3, 16)
    with pytest.raises(MoeServeError, match="no prompts"):
        SpsPredictor.build(np.zeros((0, 4)), np.zeros((0, 3, 16)))
    with pytest.raises(MoeServeError, match="prompts"):
        SpsPredictor.build(trace.vectors[:10], trace.prefill[:9])
    with pytest.raises(MoeServeError, match="dim"):
        predictor.predict(np.ones((1, 5)))
