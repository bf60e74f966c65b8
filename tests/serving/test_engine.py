"""The engine's continuous batching gives `generate`'s tokens, whatever the batch around a request."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.engine.kv_batch import KVBatch
from moeserve.engine.sampling import SamplingParams, TextAssembler, choose_tokens, new_generator, top_p_filter
from moeserve.engine.scheduler import EngineClosed, QueueFull
from moeserve.models.loading import DEMO_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0.0)


def _prompts(n: int, vocab: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, longest))] for _ in range(n)]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_concurrent_greedy_equals_generate(family, loaded, reference):
    """7 requests of different lengths through a batch of 3: requests join and leave mid-flight.

    deepseek_v3 has MLA attention (keys and values of different widths); gpt_oss sliding-window layers
    (window 16, exceeded here), so the left-padded batch must keep windows right.
    """
    model, tok = loaded(family)
    prompts = _prompts(7, model.config.vocab_size, seed=1, longest=24)
    lengths = [3 + 5 * i % 29 for i in range(7)]
    expected = [reference(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(model, tok, EngineConfig(max_batch=3)).start()
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY), stream_text=False)
                   for p, n in zip(prompts, lengths, strict=True)]
        got = [h.result(timeout=60) for h in handles]
    finally:
        engine.shutdown()
    assert [c.token_ids for c in got] == expected
    eos = model.generation_config.eos_token_id
    for c, ids in zip(got, expected, strict=True):
        assert c.text == tok.decode(ids, skip_special_tokens=True)
        assert c.finish_reason == ("stop" if ids[-1] == eos else "length")


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="the demo model is not built yet")
def test_demo_model_greedy_equals_generate(reference):
    from moeserve.models.loading import load_model, load_tokenizer

    model, tok = load_model("demo"), load_tokenizer("demo")
    texts = ["def add(a, b):", "The history of the city", "A dictionary is"]
    prompts = [tok(t)["input_ids"] for t in texts]
    expected = [reference(model, p, n) for p, n in zip(prompts, (20, 8, 14), strict=True)]
    engine = Engine(model, tok, EngineConfig(max_batch=2)).start()
    try:
        got = [h.result(timeout=120).token_ids for h in
               [engine.submit(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, (20, 8, 14), strict=True)]]
    finally:
        engine.shutdown()
    assert got == expected


def test_routed_experts_are_the_ones_generate_used(loaded):
    from moeserve.models.adapter import moe_layers
    from moeserve.traces.capture import RoutingCapture

    model, tok = loaded("qwen3_moe")
    layers = moe_layers(model)
    prompt = [5, 9, 17, 33, 60]
    with RoutingCapture(model, layers) as cap, torch.inference_mode():
        model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    # token i was chosen by forward call i: the prefill's last row, then one row per decode step
    expected = [torch.stack([ids[-1] for ids in call.ids]).tolist() for call in cap.calls]
    engine = Engine(model, tok, EngineConfig(max_batch=2)).start()
    try:
        other = engine.submit([7, 8], SamplingParams(max_tokens=6, **GREEDY), return_routed_experts=True)
        mine = engine.submit(prompt, SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY),
                             return_routed_experts=True).result(timeout=60)
        other.result(timeout=60)
        counts = engine.metrics.routed_counts()
    finally:
        engine.shutdown()
    assert mine.routed_experts == expected
    # every prompt token and every fed-back token was routed once per layer to top_k experts
    top_k = layers[0].top_k
    tokens = (len(prompt) + 5) + (2 + 5)
    assert counts.shape == (len(layers), layers[0].num_experts)
    assert counts.sum(axis=1).tolist() == [tokens * top_k] * len(layers)


def test_seeded_sampling_ignores_batch_neighbours(loaded):
    model, tok = loaded("mixtral")
    prompt = [4, 8, 15, 16, 23, 42]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    engine = Engine(model, tok, EngineConfig(max_batch=4)).start()
    try:
        alone = engine.generate(prompt, params).token_ids
        crowd = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0.7, seed=i))
                 for i, p in enumerate(_prompts(3, 128, seed=5))]
        again = engine.submit(prompt, params)
        together = again.result(timeout=60).token_ids
        [h.result(timeout=60) for h in crowd]
        other_seed = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99))
        nucleus_of_one = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=3))
        greedy = engine.generate(prompt, SamplingParams(max_tokens=12, **GREEDY))
    finally:
        engine.shutdown()
    assert alone == together
    assert other_seed.token_ids != alone
    assert nucleus_of_one.token_ids == greedy.token_ids  # top_p -> 0 keeps only the most likely token


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    for top_p in (0.3, 0.5, 0.7, 0.9, 0.97, 1.0):  # away from the cumulative sums (float ties)
        kept = top_p_filter(probs.clone(), top_p)
        # brute force: most likely first, add tokens until the mass before the next reaches top_p
        order, mass, keep = torch.argsort(probs, descending=True).tolist(), 0.0, set()
        for i in order:
            if mass >= top_p - 1e-9:
                break
            keep.add(i)
            mass += float(probs[i])
        assert {i for i in range(5) if kept[i] > 0} == keep
        np.testing.assert_allclose(kept.sum().item(), 1.0, rtol=1e-6)
        np.testing.assert_allclose(kept[sorted(keep)].numpy(), (probs[sorted(keep)] / probs[sorted(keep)].sum()).numpy(),
                                   rtol=1e-6)


@pytest.mark.parametrize("temperature", [5e-324, 1e-30, 9e-6])
def test_vanishing_temperatures_are_greedy_not_nan(temperature):
    """Found by the API fuzz test: logits / 5e-324 overflowed float32 and sampling raised (HTTP 500)."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 30
    params = [SamplingParams(temperature=temperature, seed=1)] * 3
    assert choose_tokens(logits, params, [new_generator(1) for _ in range(3)]) == logits.argmax(-1).tolist()
    hot = [SamplingParams(temperature=1e-3, seed=1)] * 3  # small but sampled: still finite probabilities
    assert len(choose_tokens(logits, hot, [new_generator(1) for _ in range(3)])) == 3
    # the fuzz test's second find: top_p = 5e-324 is 0 in float32 and dropped every token
    nucleus = [SamplingParams(temperature=1.0, top_p=5e-324, seed=1)] * 3
    assert choose_tokens(logits, nucleus, [new_generator(1) for _ in range(3)]) == logits.argmax(-1).tolist()


class _CharTokenizer:
    """One character per token id (ids = code points); a U+FFFD piece stands for half a character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop", [("END",), ("xyz", "ND"), ()])
def test_text_assembler_streams_up_to_the_stop_string(stop):
    text = "abc ENDING \ufffd tail"
    asm = TextAssembler(_CharTokenizer(), stop)
    pieces, ids = [], []
    for ch in text:
        ids.append(ord(ch))
        piece = asm.push(ids)
        pieces.append(piece)
        if stop:
            # nothing sent may ever contain a stop string or end half-way into one
            sent = "".join(pieces)
            assert not any(s in sent for s in stop)
        if asm.stopped:
            break
    else:
        pieces.append(asm.finish())
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    assert "".join(pieces) == text[:cut] == asm.final_text
    assert asm.stopped == bool(stop)


def test_stop_string_and_eos_end_like_generate(loaded, reference):
    model, tok = loaded("qwen3_moe")
    prompt = tok("the quick brown fox")["input_ids"]
    ids = reference(model, prompt, 30)
    full = tok.decode(ids, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    engine = Engine(model, tok, EngineConfig(max_batch=2)).start()
    try:
        c = engine.generate(prompt, SamplingParams(max_tokens=30, stop=(stop,), **GREEDY))
        streamed = engine.submit(prompt, SamplingParams(max_tokens=30, stop=(stop,), **GREEDY))
        pieces = [e.text for e in streamed.events(timeout=60)]
    finally:
        engine.shutdown()
    assert c.finish_reason == "stop" and c.text == full[: full.find(stop)]
    assert "".join(pieces) == c.text

    first_new = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    model.generation_config.eos_token_id = ids[first_new]  # make that token an end of sequence
    try:
        eos_ref = reference(model, prompt, 30)
        engine = Engine(model, tok).start()
        e = engine.generate(prompt, SamplingParams(max_tokens=30, **GREEDY))
        engine.shutdown()
    finally:
        model.generation_config.eos_token_id = 2
    assert e.token_ids == eos_ref == ids[: first_new + 1] and e.finish_reason == "stop"


def test_queue_bound_and_retry_after(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=1, max_queue=2))  # not started: nothing leaves the queue
    engine.submit([5, 6], SamplingParams(max_tokens=4, **GREEDY))
    engine.submit([5, 7], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(QueueFull) as info:
        engine.submit([5, 8], SamplingParams(max_tokens=4, **GREEDY))
    assert info.value.retry_after_s >= 1
    engine.start()
    engine.shutdown(drain=True)
    assert engine.scheduler.pending() == (0, 0)


def test_shutdown_drains_every_accepted_request(loaded, reference):
    model, tok = loaded("mixtral")
    prompts = _prompts(4, 128, seed=7)
    engine = Engine(model, tok, EngineConfig(max_batch=2)).start()
    handles = [engine.submit(p, SamplingParams(max_tokens=12, **GREEDY)) for p in prompts]
    engine.shutdown(drain=True)  # returns only once the queue and the batch are empty
    with pytest.raises(EngineClosed):
        engine.submit([5], SamplingParams(max_tokens=2))
    assert [h.result(timeout=1).token_ids for h in handles] == [reference(model, p, 12) for p in prompts]


def test_cancel_frees_the_slot(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=1))
    gate, decode = threading.Event(), engine._decode

    def gated_decode():
        gate.wait(timeout=30)
        decode()

    engine._decode = gated_decode
    engine.start()
    try:
        long = engine.submit([5, 6], SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY))
        events = long.events(timeout=60)
        next(events)  # prefilled: its first token is out, its first decode step waits for the gate
        engine.cancel(long.request_id)
        gate.set()
        rest = list(events)
        short = engine.generate([5, 7], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    finally:
        engine.shutdown()
    assert rest[-1].finish_reason == "cancelled"
    assert sum(len(e.token_ids) for e in rest) == 1  # the step in flight when cancel came, then nothing
    assert len(short.token_ids) == 3


def test_kv_batch_keep_drops_columns_nobody_needs():
    from transformers import DynamicCache

    def single(length: int, value: float) -> KVBatch:
        cache = DynamicCache()
        cache.update(torch.full((1, 2, length, 4), value), torch.full((1, 2, length, 3), value), 0)
        return KVBatch.single(cache, length, torch.device("cpu"))

    batch = single(2, 1.0)
    batch.extend(single(5, 2.0))
    batch.extend(single(3, 3.0))
    assert batch.mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = batch.cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 4) and keys[0, :, :3].abs().sum() == 0 and (keys[0, :, 3:] == 1).all()
    batch.keep([2, 0])  # the longest row leaves: two columns become padding for everyone
    assert batch.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert (batch.cache.layers[0].values[0] == 3).all() and batch.cache.layers[0].values.shape == (2, 2, 3, 3)
    mask, positions = batch.step_inputs()
    assert positions.tolist() == [[3], [2]] and mask.shape == (2, 4)


def test_half_the_experts_remote_through_the_pool(tiny_model_dirs, reference):
    """The seam to the expert pool: a dispatch inside the model's forward, the engine unchanged."""
    from moeserve.experts.dispatch import install_dispatch
    from moeserve.experts.process_backend import ProcessBackend
    from moeserve.models.adapter import moe_layers
    from moeserve.models.loading import load_model, load_tokenizer
    from moeserve.plan.placement import ExpertFunction, ExpertPlacement

    model_dir = tiny_model_dirs["qwen3_moe"]
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    prompts = _prompts(4, model.config.vocab_size, seed=3, longest=12)
    expected = [reference(model, p, 10) for p in prompts]
    layers = moe_layers(model)
    n = layers[0].num_experts
    placement = ExpertPlacement({la.index: tuple(range(n // 2)) for la in layers},
                                tuple(ExpertFunction(f"f{la.index}", la.index, tuple(range(n // 2, n))) for la in layers))
    pool = ProcessBackend.from_model(model, str(model_dir), placement).start()
    dispatch = install_dispatch(model, placement, pool, release_remote_weights=True)
    engine = Engine(model, tok, EngineConfig(max_batch=3), dispatch=dispatch).start()
    try:
        got = [h.result(timeout=120).token_ids
               for h in [engine.submit(p, SamplingParams(max_tokens=10, **GREEDY)) for p in prompts]]
        scraped = engine.metrics.render().decode()
        counts = engine.metrics.routed_counts()
    finally:
        engine.shutdown()  # stops the pool too
    assert got == expected
    assert pool.pids() == {}
    remote_calls = sum(float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                       if line.startswith("moeserve_remote_calls_total{"))
    assert remote_calls > 0 and counts.shape == (len(layers), n) and counts[:, n // 2:].sum() > 0
