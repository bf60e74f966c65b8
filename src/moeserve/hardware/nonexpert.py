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
from moeserve.hardware.timing import time_calls_s

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


def register_null_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NULL_EXPERTS, _null_experts)


@contextlib.contextmanager
def null_experts(model) -> Iterator[None]:
    """Run `model` with zero-cost routed experts inside the block; its experts implementation is restored
    after. MoeServeError if the model's experts do not dispatch through the experts interface."""
    register_null_experts()
    if hasattr(model, "set_experts_implementation"):
        before = model.get_experts_implementation()
        model.set_experts_implementation(NULL_EXPERTS)
        restore = lambda: model.set_experts_implementation(before)  # noqa: E731
    else:  # older transformers: the config attribute is what the experts read
        before = model.config._experts_implementation
        model.config._experts_implementation = NULL_EXPERTS
        restore = lambda: setattr(model.config, "_experts_implementation", before)  # noqa: E731
    try:
        yield
    finally:
        restore()


def _num_layers(model) -> int:
    from moeserve.models.adapter import decoder_layers

    return len(decoder_layers(model))


def _vocab_size(model) -> int:
    from moeserve.models.adapter import text_config

    return int(text_config(model).vocab_size)


def _crop_last_token(cache) -> None:
    """Drop the token a decode step appended, so every timed step sees the same context length."""
    with contextlib.suppress(Exception):  # a cache type that cannot crop just grows by one per step
        cache.crop(-1)


@dataclass(frozen=True)
class NonExpertTiming:
    """prefill_lengths: [P], prefill_s: [P]; decode_batches: [D], decode_s: [D]; seconds per layer."""

    num_layers: int
    prefill_lengths: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_batches: tuple[int, ...]
    decode_s: tuple[float, ...]
    context_len: int


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
        if _counter.calls == before:
            raise MoeServeError(f"{type(model).__name__}: its experts do not dispatch through transformers' "
                                "experts interface, so their cost cannot be removed from the measurement")
        # logits_to_keep=1: serving needs the last position's logits only
        prefill_calls = [lambda ids=tokens(1, n): model(input_ids=ids, use_cache=False, logits_to_keep=1)
                         for n in prefill_lengths]
        prefill_s = [t / num_layers for t in time_calls_s(prefill_calls, device, repeats, warmup)]
        for n in prefill_lengths:
            if progress is not None:
                progress(f"non-expert prefill, {n} tokens")
        decode_calls, drop_new_tokens = [], []
        for batch in decode_batches:
            cache = model(input_ids=tokens(batch, context_len), use_cache=True, logits_to_keep=1).past_key_values
            step = tokens(batch, 1)
            decode_calls.append(lambda cache=cache, step=step: model(input_ids=step, past_key_values=cache,
                                                                     use_cache=True))
            drop_new_tokens.append(lambda cache=cache: _crop_last_token(cache))
        decode_s = [t / num_layers for t in time_calls_s(decode_calls, device, repeats, warmup, drop_new_tokens)]
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
    )
