"""Greedy generation through the moeserve dispatch is token-for-token that of plain transformers, for an
all-local placement, half the experts remote, and replicas; also when a function is killed mid-request."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from moeserve.errors import MoeServeError
from moeserve.experts.dispatch import EXPERTS_IMPLEMENTATION, install_dispatch
from moeserve.experts.process_backend import ProcessBackend
from moeserve.models.adapter import moe_layers
from moeserve.models.loading import DEMO_MODEL_DIR, load_model
from moeserve.plan.placement import ExpertFunction, ExpertPlacement

FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss"]  # + DeepSeek's shared experts, GPT-OSS's biases
NEW_TOKENS = 10


def generate(model, prompts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


def half_remote(model, tag: str) -> ExpertPlacement:
    """Experts [0, E/2) local, [E/2, E) in one function per MoE layer."""
    layers = moe_layers(model)
    n = layers[0].num_experts
    return ExpertPlacement({la.index: tuple(range(n // 2)) for la in layers},
                           tuple(ExpertFunction(f"{tag}-{la.index}", la.index, tuple(range(n // 2, n)))
                                 for la in layers))


def with_replica(model, half: ExpertPlacement, tag: str) -> ExpertPlacement:
    """First MoE layer: [0, E/4) local, [E/4, E) in a new function, so [E/2, E) has two replicas."""
    layers = moe_layers(model)
    first, n = layers[0].index, layers[0].num_experts
    replica = ExpertFunction(f"{tag}-replica", first, tuple(range(n // 4, n)))
    return ExpertPlacement({**half.local, first: tuple(range(n // 4))}, half.functions + (replica,))


class Engine:
    """A model, its reference generation, the two remote placements and one pool serving both."""

    def __init__(self, tag: str, model_dir, prompt_shape: tuple[int, int] = (2, 6)):
        self.model_dir = str(model_dir)
        self.model = load_model(model_dir)
        g = torch.Generator().manual_seed(7)
        self.prompts = torch.randint(3, self.model.config.vocab_size, prompt_shape, generator=g)
        self.reference = generate(self.model, self.prompts)
        self.half = half_remote(self.model, tag)
        self.replicas = with_replica(self.model, self.half, tag)
        # one pool for both placements: the half-remote dispatch uses only its own functions
        self.pool = ProcessBackend.from_model(self.model, self.model_dir, self.replicas)


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    engines = {f: Engine(f, tiny_model_dirs[f]) for f in FAMILIES}
    for e in engines.values():  # spawn all at once, then wait
        e.pool.start(wait=False)
    for e in engines.values():
        e.pool.prewarm(list(e.pool.specs()), wait=True)
    yield engines
    for e in engines.values():
        e.pool.stop()


def run_with(engine: Engine, placement: ExpertPlacement, pool=None, **kwargs):
    handle = install_dispatch(engine.model, placement, pool, **kwargs)
    try:
        return generate(engine.model, engine.prompts), handle.stats()
    finally:
        if not handle.released:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_all_local(engines, family):
    e = engines[family]
    layers = moe_layers(e.model)
    placement = ExpertPlacement.all_local([la.index for la in layers], layers[0].num_experts)
    before = e.model.config._experts_implementation
    handle = install_dispatch(e.model, placement)
    assert e.model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    assert torch.equal(generate(e.model, e.prompts), e.reference)
    assert handle.stats() == {}  # no layer had remote work
    handle.remove()
    assert e.model.config._experts_implementation == before
    assert all(not hasattr(la.experts, "_moeserve_dispatch") for la in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_half_remote(engines, family):
    e = engines[family]
    out, stats = run_with(e, e.half, e.pool)
    assert torch.equal(out, e.reference)
    assert sorted(stats) == sorted(la.index for la in moe_layers(e.model))
    for s in stats.values():
        assert s["calls"] == NEW_TOKENS and s["remote_pairs"] > 0 and s["local_pairs"] > 0
        assert s["fallback_pairs"] == 0
    metrics = e.pool.metrics()
    assert metrics["failures"] == 0
    assert sum(s["remote_pairs"] for s in stats.values()) == metrics["pairs"]
    assert all(metrics["functions"][f.id]["calls"] > 0 for f in e.half.functions)
    assert metrics["functions"][e.replicas.functions[-1].id]["calls"] == 0  # not in this placement


@pytest.mark.parametrize("family", FAMILIES)
def test_replicas(engines, family):
    e = engines[family]
    replica = e.replicas.functions[-1]
    before = e.pool.metrics()["functions"]
    out, stats = run_with(e, e.replicas, e.pool)
    assert torch.equal(out, e.reference)
    after = e.pool.metrics()
    assert after["failures"] == 0 and sum(s["fallback_pairs"] for s in stats.values()) == 0
    for fid in (replica.id, f"{family}-{replica.layer}"):  # both replicas of the first layer took work
        assert after["functions"][fid]["calls"] > before[fid]["calls"], fid


def _kill_on_call(pool: ProcessBackend, victim: str, nth: int):
    """Make the pool SIGKILL `victim` right after sending it its `nth` call (the call is then in flight)."""
    sent = {"n": 0, "pid": None}
    original = pool.call

    def call(function_id, *args):
        rc = original(function_id, *args)
        if function_id == victim:
            sent["n"] += 1
            if sent["n"] == nth:
                sent["pid"] = pool.pids()[victim]
                os.kill(sent["pid"], signal.SIGKILL)
        return rc

    pool.call = call
    return sent


def test_killed_function_replica_takes_over(engines):
    e = engines["qwen3_moe"]
    replica = e.replicas.functions[-1]
    victim = f"qwen3_moe-{replica.layer}"
    before = e.pool.metrics()
    sent = _kill_on_call(e.pool, victim, nth=3)
    try:
        out, stats = run_with(e, e.replicas, e.pool)
    finally:
        del e.pool.call
    assert sent["pid"] is not None
    assert torch.equal(out, e.reference)
    after = e.pool.metrics()
    assert after["functions"][victim]["failures"] == before["functions"][victim]["failures"] + 1
    assert after["functions"][victim]["restarts"] == before["functions"][victim]["restarts"] + 1
    assert sum(s["retries"] for s in stats.values()) == 1  # the in-flight call went to the replica
    assert sum(s["fallback_pairs"] for s in stats.values()) == 0
    e.pool.prewarm([victim], wait=True)
    assert e.pool.pids()[victim] != sent["pid"]


def test_released_weights_and_killed_function(engines):
    """Remote experts freed in the main process: memory drops by their bytes, and the pairs of a killed
    function's in-flight call (no replica) are computed from the checkpoint, giving the same tokens."""
    e = engines["qwen3_moe"]
    model = load_model(e.model_dir)

    def param_bytes():
        return sum(p.numel() * p.element_size() for p in model.parameters())

    full = param_bytes()
    victim = e.half.functions[0].id
    e.pool.prewarm(list(e.pool.specs()), wait=True)
    before = e.pool.metrics()
    sent = _kill_on_call(e.pool, victim, nth=2)
    try:
        handle = install_dispatch(model, e.half, e.pool, release_remote_weights=True)
        remote_bytes = sum(len(f.experts) for f in e.half.functions) * sum(
            t.numel() * t.element_size() for t in
            (moe_layers(e.model)[0].experts.gate_up_proj[0], moe_layers(e.model)[0].experts.down_proj[0]))
        assert full - param_bytes() == remote_bytes
        out = generate(model, e.prompts)
    finally:
        del e.pool.call
    assert sent["pid"] is not None
    assert torch.equal(out, e.reference)
    stats = handle.stats()
    assert stats[e.half.functions[0].layer]["fallback_pairs"] > 0
    after = e.pool.metrics()
    assert after["functions"][victim]["failures"] == before["functions"][victim]["failures"] + 1
    with pytest.raises(MoeServeError, match="reload"):
        handle.remove()


def test_placement_with_remote_experts_needs_a_pool(engines):
    e = engines["qwen3_moe"]
    with pytest.raises(MoeServeError, match="no expert backend"):
        install_dispatch(e.model, e.half)
    handle = install_dispatch(e.model, ExpertPlacement.all_local([la.index for la in moe_layers(e.model)], 8))
    with pytest.raises(MoeServeError, match="already installed"):
        install_dispatch(e.model, e.half, e.pool)
    handle.remove()


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not built yet (assets/demo)")
def test_demo_model():
    e = Engine("demo", DEMO_MODEL_DIR, prompt_shape=(1, 12))
    layers = moe_layers(e.model)
    all_local = ExpertPlacement.all_local([la.index for la in layers], layers[0].num_experts)
    assert torch.equal(run_with(e, all_local)[0], e.reference)
    with e.pool:
        for placement in (e.half, e.replicas):
            assert torch.equal(run_with(e, placement, e.pool)[0], e.reference)
        metrics = e.pool.metrics()
    assert metrics["failures"] == 0
    assert all(f["calls"] > 0 for f in metrics["functions"].values())
