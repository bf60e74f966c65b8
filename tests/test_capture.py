"""Captured routing is the routing the model really used, in prefill and in decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve.models.adapter import moe_layers
from moeserve.models.routing import select_experts
from moeserve.traces.capture import RoutingCapture
from moeserve.traces.format import DECODE, PREFILL
from moeserve.traces.record import generate_with_routing
from tiny_models import tiny_model


class ToyTokenizer:
    """Whitespace 'tokenizer' over a tiny vocabulary, enough to drive generate() on tiny models."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, 0, 2
        self.padding_side, self.chat_template, self.name_or_path = "left", None, "toy"

    def __call__(self, texts, return_tensors=None, padding=True, truncation=True, max_length=512, **_):
        rows = [[3 + (sum(map(ord, w)) % (self.vocab_size - 3)) for w in t.split()][:max_length] for t in texts]
        width = max(map(len, rows))
        ids = [[0] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "deepseek_v2", "gpt_oss", "qwen2_moe", "olmoe", "granitemoe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_ids_equal_ids_recomputed_from_router_scores(family):
    model = tiny_model(family, seed=3)
    layers = moe_layers(model)
    logits_seen = []

    def on_router(module, args, output, pos):
        logits_seen[-1][pos] = output[0].detach()

    handles = [layer.router.register_forward_hook(lambda m, a, o, p=p: on_router(m, a, o, p))
               for p, layer in enumerate(layers)]
    handles.append(model.register_forward_pre_hook(lambda m, a: logits_seen.append({})))
    ids = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(4))
    with RoutingCapture(model, layers) as cap, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                       pad_token_id=0, min_new_tokens=6)
    for h in handles:
        h.remove()
    assert len(cap.calls) == 6  # one prefill + five decode steps
    assert cap.calls[0].ids[0].shape[0] == 11 and all(c.ids[0].shape[0] == 1 for c in cap.calls[1:])
    for call, logits in zip(cap.calls, logits_seen, strict=True):
        for pos, layer in enumerate(layers):
            bias = getattr(layer.router, "e_score_correction_bias", None)
            w, e = select_experts(logits[pos], layer.rule, layer.top_k, selection_bias=bias)
            captured = call.ids[pos]
            assert torch.equal(captured.sort(dim=-1).values, e.sort(dim=-1).values), (family, pos)
            order_c, order_e = captured.argsort(dim=-1), e.argsort(dim=-1)
            assert torch.allclose(call.weights[pos].gather(1, order_c), w.gather(1, order_e), atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_batched_capture_equals_one_by_one(family):
    """Left-padded batches give each request the routing it gets alone, prefill and decode."""
    model = tiny_model(family, seed=5)
    tok = ToyTokenizer(128)
    texts = ["a b c d e f g", "h i j", "k l m n o"]
    alone = [generate_with_routing(model, tok, [t], gen_tokens=5)[0] for t in texts]
    batched = generate_with_routing(model, tok, texts, gen_tokens=5)
    for a, b in zip(alone, batched, strict=True):
        assert a.prompt_len == b.prompt_len
        assert np.array_equal(a.token_ids, b.token_ids)
        assert np.array_equal(a.phase, b.phase)
        assert (a.phase == PREFILL).sum() == a.prompt_len and (a.phase == DECODE).sum() == 4
        same = np.all(np.sort(a.ids, axis=-1) == np.sort(b.ids, axis=-1), axis=-1)
        assert same.mean() >= 0.98  # masked attention differs from unpadded only by float rounding


def test_eos_stops_the_decode_rows():
    model = tiny_model("qwen3_moe", seed=6)
    tok = ToyTokenizer(128)
    first = generate_with_routing(model, tok, ["p q r s"], gen_tokens=6)[0]
    model.generation_config.eos_token_id = first.generated[2]  # make the third generated token an EOS
    cut = generate_with_routing(model, tok, ["p q r s"], gen_tokens=6)[0]
    assert (cut.phase == DECODE).sum() == 2  # g1, g2 were fed; g3 = EOS ends the request
    assert np.array_equal(cut.ids, first.ids[: cut.prompt_len + 2])
