"""Per-layer latency of a model's non-expert work (attention, norms, router, shared experts).

The model runs as-is except that its routed experts are swapped, through transformers v5's experts
interface, for an implementation that returns zeros at no cost. What is left is the work every token
pays whatever the expert placement; dividing by the number of decoder layers gives a per-layer cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moeserve.errors import MoeServeError
from moeserve.hardware.timing import time_calls
from moeserve.models import experts_interface
from moeserve.models.adapter import decoder_layers, moe_layers, text_config
from moeserve.models.cache_names import cache_kwarg, output_cache

NULL_EXPERTS = "moeserve_null"


@dataclass
class _CallCounter:
    calls: int = 0


_counter = _CallCounter()


def _null_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  *args, **kwargs) -> torch.Tensor:
    """Experts that cost nothing: hidden_states [T, H] -> zeros [T, H]."""
    _counter.calls += 1
    return torch.zeros_like(hidden_states)


@contextlib.contextmanager
def null_experts(model) -> Iterator[None]:
    """Run `model` with zero-cost routed experts inside the block; its experts implementation is restored
    after. MoeServeError if the model's experts do not dispatch through the experts interface."""
    experts_interface.register(NULL_EXPERTS, _null_experts)
    with experts_interface.using(model, NULL_EXPERTS):
        yield


def _num_layers(model) -> int:

    return len(decoder_layers(model))


def _vocab_size(model) -> int:

    return int(text_config(model).vocab_size)


def _crop_last_token(cache) -> None:
    """Drop the token a decode step appended, so every timed step sees the same context length."""
    with contextlib.suppress(Exception):  # a cache type that cannot crop just grows by one per step
        cache.crop(-1)


@dataclass(frozen=True)
class NonExpertTiming:
    """prefill_lengths: [P], prefill_s: [P]; decode_batches: [D], decode_s: [D]; seconds per layer (the fastest
    repeat); *_spread: p90 / fastest - 1 per point."""

    num_layers: int
    prefill_lengths: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_batches: tuple[int, ...]
    decode_s: tuple[float, ...]
    context_len: int
    prefill_spread: tuple[float, ...] = ()
    decode_spread: tuple[float, ...] = ()


def measure_non_expert(model, prefill_lengths=(16, 64, 256), decode_batches=(1, 2, 4, 8, 16, 32),
                       context_len: int = 64, repeats: int = 10, warmup: int = 2,
                       progress: Callable[[str], None] | None = None) -> NonExpertTiming:
    """Time prefill (one sequence of each length) and decode (one token for each of `batch` sequences
    with `context_len` cached tokens) with null experts; return seconds per decoder layer.

    progress: optional callable(step_name) for each point once it is measured.
    """
    device = next(model.parameters()).device
    num_layers = _num_layers(model)
    vocab = _vocab_size(model)
    generator = torch.Generator().manual_seed(0)

    def tokens(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=generator).to(device)

    with torch.inference_mode(), null_experts(model):
        before = _counter.calls
        model(input_ids=tokens(1, 2), use_cache=False)
        if _counter.calls == before and moe_layers(model):
            raise MoeServeError(f"{type(model).__name__}: its experts do not dispatch through transformers' "
                                "experts interface, so their cost cannot be removed from the measurement")
        # logits_to_keep=1: serving needs the last position's logits only
        prefill_calls = [lambda ids=tokens(1, n): model(input_ids=ids, use_cache=False, logits_to_keep=1)
                         for n in prefill_lengths]
        prefill = time_calls(prefill_calls, device, repeats, warmup)
        prefill_s = [t.best_s / num_layers for t in prefill]
        for n in prefill_lengths:
            if progress is not None:
                progress(f"non-expert prefill, {n} tokens")
        decode_calls, drop_new_tokens = [], []
        for batch in decode_batches:
            cache = output_cache(model(input_ids=tokens(batch, context_len), use_cache=True, logits_to_keep=1))
            step = tokens(batch, 1)
            decode_calls.append(lambda cache=cache, step=step: model(input_ids=step, **{cache_kwarg(model): cache},
                                                                     use_cache=True))
            drop_new_tokens.append(lambda cache=cache: _crop_last_token(cache))
        decode = time_calls(decode_calls, device, repeats, warmup, drop_new_tokens)
        decode_s = [t.best_s / num_layers for t in decode]
        for batch in decode_batches:
            if progress is not None:
                progress(f"non-expert decode, batch {batch}")
    return NonExpertTiming(
        num_layers=num_layers,
        prefill_lengths=tuple(int(v) for v in prefill_lengths),
        prefill_s=tuple(prefill_s),
        decode_batches=tuple(int(v) for v in decode_batches),
        decode_s=tuple(decode_s),
        context_len=int(context_len),
        prefill_spread=tuple(t.spread for t in prefill),
        decode_spread=tuple(t.spread for t in decode),
    )
