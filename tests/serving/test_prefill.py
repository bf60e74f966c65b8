"""Batched and chunked prefill: several prompts in one forward with no pad token routed or recorded; long
prompts in chunks under a per-step token budget, interleaved with decode; `generate`'s tokens either way."""

from __future__ import annotations

import random

import pytest

from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.engine.sampling import SamplingParams
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def _prompts(n: int, vocab: int, seed: int, shortest: int, longest: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(shortest, longest))] for _ in range(n)]


def _seq(n: int) -> Sequence:
    return Sequence(list(range(3, 3 + n)), GREEDY)


def test_schedule_spends_the_token_budget_in_arrival_order():
    sched = Scheduler(EngineConfig(max_batch=4, max_prefill_tokens=10))
    a, b, c, d = _seq(3), _seq(4), _seq(25), _seq(2)
    for s in (a, b, c, d):
        sched.add(s)
    step = sched.schedule()  # a and b fit whole (7 tokens); c does not fit the 3 left: its first chunk
    assert step.admitted == [a, b] and step.chunk == (c, 0, 3) and not step.chunk_done
    for s in step.admitted:
        sched.start_running(s)
    step = sched.schedule()  # c goes on with a full budget; d (and its slot) wait behind it
    assert step.chunk == (c, 3, 13) and step.admitted == [] and step.running == [a, b]
    step = sched.schedule()
    assert step.chunk == (c, 13, 23) and step.admitted == []
    step = sched.schedule()  # c's last 2 tokens, then d fits in what is left
    assert step.chunk == (c, 23, 25) and step.chunk_done and step.admitted == [d]
    assert sched.pending() == (0, 2)


def test_a_cancelled_chunked_prefill_leaves_the_schedule():
    sched = Scheduler(EngineConfig(max_prefill_tokens=4))
    c = _seq(10)
    sched.add(c)
    assert sched.schedule().chunk == (c, 0, 4)
    c.cancelled = True
    step = sched.schedule()
    assert step.cancelled == [c] and step.chunk is None and not sched.has_work()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_batched_prefill_routes_no_pad_and_matches_generate(family, loaded, reference):
    """Six prompts of different lengths queued before the engine starts are prefilled in one padded forward:
    the experts see exactly the prompts' tokens (pads never reach them, nor the routing record), and
    every request gets `generate`'s tokens."""
    model, tok = loaded(family)
    prompts = _prompts(6, model.config.vocab_size, seed=5, shortest=2, longest=20)
    expected = [reference(model, p, 6) for p in prompts]
    engine = Engine(model, tok, EngineConfig(max_batch=8, max_prefill_tokens=512))
    seen, recorded, forwards = [], [], []
    originals = {d: d.base for d in engine.dispatch.layers.values()}
    for d in engine.dispatch.layers.values():
        base, route = d.base, d._route

        def spy_base(module, x, idx, w, base=base):  # what reaches the experts, per layer call
            seen.append(x.shape[0])
            return base(module, x, idx, w)

        def spy_route(module, x, idx, w, route=route):
            forwards.append(x.shape[0])
            return route(module, x, idx, w)

        d.base, d._route = spy_base, spy_route
    engine.add_routing_listener(lambda ids: recorded.append(ids.shape[0]))
    handles = [engine.submit(p, SamplingParams(max_tokens=6, temperature=0.0), stream_text=False) for p in prompts]
    engine.start()
    try:
        got = [h.result(timeout=120).token_ids for h in handles]
    finally:
        engine.shutdown()
        for d, base in originals.items():  # the dispatch may be shared with later tests' engines
            d.base = base
            del d._route
    assert got == expected
    layers = len(engine.dispatch.layers)
    real = sum(len(p) for p in prompts)
    assert forwards[:layers] == [real] * layers  # the prefill: one forward, its real tokens only
    assert seen[:layers] == [real] * layers
    assert recorded[0] == real  # routing of every prompt position, and of nothing else


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_chunked_prefill_interleaves_with_decode_and_matches_generate(family, loaded, reference):
    """A budget of 7 tokens per step: prompts up to 30 tokens (over gpt_oss's window of 16) are prefilled
    in chunks while other requests decode; the tokens are `generate`'s."""
    model, tok = loaded(family)
    prompts = _prompts(5, model.config.vocab_size, seed=9, shortest=1, longest=30)
    lengths = [4 + 3 * i for i in range(5)]
    expected = [reference(model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(model, tok, EngineConfig(max_batch=3, max_prefill_tokens=7)).start()
    chunks = []
    schedule = engine.scheduler.schedule

    def spy():
        step = schedule()
        if step.chunk is not None:
            chunks.append((step.chunk[2] - step.chunk[1], len(step.running)))
        return step

    engine.scheduler.schedule = spy
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0), stream_text=False)
                   for p, n in zip(prompts, lengths, strict=True)]
        got = [h.result(timeout=120).token_ids for h in handles]
    finally:
        engine.shutdown()
    assert got == expected
    assert chunks and all(n <= 7 for n, _ in chunks)
    assert any(running for _, running in chunks)  # some chunk ran in a step that also decoded others
