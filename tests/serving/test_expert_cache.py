"""Serving with an expert cache: the engine's counts are the simulator's, tokens are unchanged, misses read
the checkpoint for real, the weights of non-residents are gone, bad input is one line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_run import run_cli
from moeserve.cache import chunked_step_sets, simulate_cache, split_step, step_expert_sets
from moeserve.cache.online import OnlinePolicy
from moeserve.engine.build import EngineOptions, build_engine
from moeserve.engine.sampling import SamplingParams
from moeserve.errors import MoeServeError
from moeserve.experts.expert_cache import ExpertCacheOptions
from moeserve.models.adapter import require_moe_layers
from moeserve.models.checkpoint import CheckpointExperts
from moeserve.models.direct_read import ALIGN, DirectExpertReader
from moeserve.models.loading import load_model, resolve_model_path

PROMPTS = ["def add(a, b):", "The history of the city", "Dictionary: apple, noun."]
TOKENS = 12


def _serve(options: EngineOptions, concurrent: bool = False):
    """Greedy generation of PROMPTS -> (token ids per prompt, routing per forward, engine)."""
    engine = build_engine(options)
    forwards: list[np.ndarray] = []
    engine.add_routing_listener(lambda ids: forwards.append(ids.numpy().copy()))
    engine.start()
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    try:
        if concurrent:
            handles = [engine.submit(p, params, stream_text=False) for p in PROMPTS]
            outs = [h.result() for h in handles]
        else:
            outs = [engine.generate(p, params) for p in PROMPTS]
        return [o.token_ids for o in outs], forwards, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def all_resident():
    return {c: _serve(EngineOptions("demo", all_local=True, device="cpu"), c)[0] for c in (False, True)}


def _replay(forwards: list[np.ndarray], capacity: int, policy: str, num_experts: int):
    """The simulator on the engine's recorded routing: one step per forward, chunked as the engine does."""
    routing = np.concatenate(forwards)
    step_of_token = np.repeat(np.arange(len(forwards)), [len(f) for f in forwards])
    sets = chunked_step_sets(step_expert_sets(routing, step_of_token, num_experts), capacity)
    return simulate_cache(sets, num_experts, capacity, policy, warm=True, engine="numpy")


@pytest.mark.parametrize(("capacity", "policy", "prefetch", "concurrent"), [
    (4, "lru", "none", False), (8, "lfu", "none", True), (16, "lru", "router", False), (6, "lfu", "router", True),
])
def test_engine_counts_equal_the_simulator_and_tokens_are_unchanged(all_resident, capacity, policy, prefetch,
                                                                    concurrent):
    options = EngineOptions("demo", device="cpu", expert_cache=ExpertCacheOptions(capacity, policy, prefetch))
    tokens, forwards, engine = _serve(options, concurrent)
    assert tokens == all_resident[concurrent]
    stats = engine.dispatch.cache_stats()
    layers = sorted(stats)
    sim = _replay(forwards, capacity, policy, engine.layers[0].num_experts)
    assert [stats[i]["hits"] for i in layers] == sim.hits.tolist()
    assert [stats[i]["misses"] for i in layers] == sim.misses.tolist()
    assert 0 < sim.overall_hit_rate < 1
    for i in layers:
        assert stats[i]["resident"] <= capacity
        # every demand miss read the expert's aligned span once (112 KiB for the demo's 108 KiB experts)
        assert stats[i]["bytes_read"] == (stats[i]["misses"] - stats[i]["prefetch_used"]) * _aligned_expert_bytes()
    if prefetch == "router":
        assert sum(s["prefetch_reads"] for s in stats.values()) > 0
    # the experts modules hold no weights: only the caches do
    assert all(la.experts.down_proj.shape[0] == 0 for la in engine.layers)
    metrics = engine.metrics.render().decode()
    assert f'moeserve_expert_cache_hits_total{{layer="{layers[0]}"}} {float(stats[layers[0]]["hits"])}' in metrics
    assert "moeserve_expert_cache_read_bytes_total" in metrics and "moeserve_expert_cache_stall_seconds_total" in metrics


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _aligned_expert_bytes() -> int:
    """The demo's expert 0 of layer 0: its three tensors' span, widened to 4 KiB boundaries (read independently)."""
    start, header = _header(resolve_model_path("demo") / "model.safetensors")
    offsets = [v["data_offsets"] for k, v in header.items() if ".layers.0.mlp.experts.0." in k]
    lo, hi = start + min(o[0] for o in offsets), start + max(o[1] for o in offsets)
    return -(-hi // ALIGN) * ALIGN - lo // ALIGN * ALIGN


@pytest.mark.parametrize("mode", ["direct", "dropcache"])
def test_a_miss_reads_the_file_now(tmp_path, mode):
    model_dir = tmp_path / "demo"
    shutil.copytree(resolve_model_path("demo"), model_dir)
    reader = DirectExpertReader(model_dir, mode)
    with CheckpointExperts(model_dir) as ckpt:
        layout_source = build_layout()
        want = ckpt.read(0, 5, layout_source)
    got, n = reader.read(0, 5, layout_source)
    assert torch.equal(got.gate, want.gate) and torch.equal(got.up, want.up) and torch.equal(got.down, want.down)
    assert n == reader.bytes_read == _aligned_expert_bytes() and reader.reads == 1
    # overwrite the expert's bytes in the file: the next read sees the new bytes (nothing kept in memory)
    start, header = _header(model_dir / "model.safetensors")
    lo, hi = header["model.layers.0.mlp.experts.5.up_proj.weight"]["data_offsets"]
    with open(model_dir / "model.safetensors", "r+b") as f:
        f.seek(start + lo)
        f.write(bytes(hi - lo))
    again, _ = reader.read(0, 5, layout_source)
    assert torch.count_nonzero(again.up) == 0 and torch.equal(again.down, want.down)
    assert reader.bytes_read == 2 * n and reader.mode == mode
    reader.close()


def build_layout():
    return require_moe_layers(load_model(resolve_model_path("demo"), device=torch.device("cpu")))[0].layout


def test_online_policy_chunks_and_evicts_like_the_simulator():
    rng = np.random.default_rng(3)
    sets = [np.unique(rng.integers(0, 16, size=rng.integers(1, 9))) for _ in range(300)]
    for policy in ("lru", "lfu"):
        online = OnlinePolicy(16, 3, policy)
        hits = sum(len(online.access(chunk).hits) for s in sets for chunk in split_step(s, 3))
        padded = np.full((len(sets), 1, 8), -1)
        for t, s in enumerate(sets):
            padded[t, 0, :len(s)] = s
        assert hits == simulate_cache(chunked_step_sets(padded, 3), 16, 3, policy, warm=True).hits[0]
    with pytest.raises(MoeServeError, match="belady needs the future"):
        OnlinePolicy(16, 3, "belady")


@pytest.mark.parametrize(("args", "message"), [
    (("--expert-cache", "0"), "--expert-cache"),
    (("--expert-cache", "33"), "give 1 to 32 experts per layer"),
    (("--expert-cache", "4", "--cache-policy", "belady"), "must be one of lru, lfu, got belady"),
    (("--expert-cache", "4", "--prefetch", "oracle"), "must be one of none, router, got oracle"),
    (("--expert-cache", "4", "--plan", "plan.yaml"), "without --plan"),
])
def test_bad_expert_cache_options_are_one_line(args, message):
    r = run_cli("serve", "demo", "--port", "0", *args)
    assert r.code == 2 and message in r.err and "Traceback" not in r.err


def test_bench_expert_cache_needs_the_model_served_in_process():
    r = run_cli("bench", "--url", "http://127.0.0.1:9", "--expert-cache", "4")
    assert r.code == 2 and "the bench serves the model itself" in r.err
