"""Run prompts through a model with greedy generation and record an ExpertTrace (`moeserve profile`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeserve.errors import MoeServeError
from moeserve.models.adapter import require_moe_layers
from moeserve.traces.activation import activation_matrix, prompt_vector
from moeserve.traces.capture import RoutingCapture, stack_layers
from moeserve.traces.format import DECODE, PREFILL, ExpertTrace, TraceMeta


@dataclass
class RequestRouting:
    """One request's captured routing. ids/weights: [tokens, L, K]; probs: [tokens, L, E] or None."""

    token_ids: np.ndarray  # [tokens] int
    phase: np.ndarray  # [tokens] uint8
    ids: np.ndarray
    weights: np.ndarray
    probs: np.ndarray | None
    prompt_len: int
    generated: list[int]  # every generated token (the last one is never fed back)


def render_prompt(prompt, tokenizer) -> str:
    """Chat prompts go through the tokenizer's chat template when it has one."""
    if getattr(prompt, "messages", None) and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
    return prompt.text


def _fed_decode_tokens(generated: list[int], gen_tokens: int, eos_ids: set[int]) -> int:
    """How many generated tokens were fed back through the model (and so have routing rows)."""
    stop = next((i for i, t in enumerate(generated) if t in eos_ids), len(generated))
    return max(0, min(stop, gen_tokens - 1))


@torch.no_grad()
def generate_with_routing(
    model, tokenizer, texts: Sequence[str], gen_tokens: int, max_prompt_tokens: int = 512,
    router_probs: bool = False,
) -> list[RequestRouting]:
    """Greedy-generate `gen_tokens` tokens for a batch of prompts and capture their routing.

    Prefill rows are the prompt's tokens; decode rows are the generated tokens that were fed back
    (token g_j is routed in decode step j, so the last generated token has no row). Padding and
    anything after an end-of-sequence token are dropped.
    """
    layers = require_moe_layers(model)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                    max_length=max_prompt_tokens, add_special_tokens=True)
    input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if input_ids.shape[1] == 0 or (mask.sum(dim=1) == 0).any():
        raise MoeServeError("a prompt tokenised to zero tokens")
    batch, seq = input_ids.shape
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    with RoutingCapture(model, layers, router_probs=router_probs) as cap:
        if gen_tokens > 0:
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=gen_tokens, min_new_tokens=0,
                do_sample=False, pad_token_id=pad_id, num_beams=1,
            )
        else:
            model(input_ids=input_ids, attention_mask=mask)
            out = input_ids
    prefill = cap.calls[0]
    pre_ids = stack_layers(prefill.ids).view(batch, seq, len(layers), -1)
    pre_w = stack_layers(prefill.weights).view(batch, seq, len(layers), -1)
    pre_p = stack_layers(prefill.probs).view(batch, seq, len(layers), -1) if router_probs else None
    steps = cap.calls[1:]
    dec_ids = [stack_layers(c.ids) for c in steps]  # each [B, L, K]
    dec_w = [stack_layers(c.weights) for c in steps]
    dec_p = [stack_layers(c.probs) for c in steps] if router_probs else None
    results = []
    real = mask.bool().cpu()
    for b in range(batch):
        generated = out[b, seq:].tolist()
        fed = _fed_decode_tokens(generated, gen_tokens, eos_ids)
        keep = real[b]
        ids = [pre_ids[b][keep]] + [dec_ids[j][b : b + 1] for j in range(fed)]
        weights = [pre_w[b][keep]] + [dec_w[j][b : b + 1] for j in range(fed)]
        probs = None
        if router_probs:
            probs = torch.cat([pre_p[b][keep]] + [dec_p[j][b : b + 1] for j in range(fed)]).numpy()
        n_prompt = int(keep.sum())
        token_ids = input_ids[b][keep.to(device)].tolist() + generated[:fed]
        results.append(RequestRouting(
            token_ids=np.asarray(token_ids, dtype=np.int64),
            phase=np.asarray([PREFILL] * n_prompt + [DECODE] * fed, dtype=np.uint8),
            ids=torch.cat(ids).numpy(),
            weights=torch.cat(weights).numpy(),
            probs=probs,
            prompt_len=n_prompt,
            generated=generated,
        ))
    return results


def build_trace(
    model, tokenizer, prompts: Sequence, *, gen_tokens: int, batch_size: int = 1, max_prompt_tokens: int = 512,
    router_probs: bool = False, model_name: str = "", source: str = "", geometry: dict | None = None,
    fingerprint: str | None = None, on_batch: Callable[[int, int], None] | None = None,
) -> ExpertTrace:
    """Profile `prompts` (objects with .text, .domain, .id, .messages) into one ExpertTrace."""
    if not prompts:
        raise MoeServeError("no prompts to profile")
    if gen_tokens < 0 or batch_size < 1:
        raise MoeServeError("--gen-tokens must be >= 0 and --batch-size >= 1")
    layers = require_moe_layers(model)
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_pos:  # leave room for the generated tokens inside the model's context
        if max_pos <= gen_tokens:
            raise MoeServeError(f"--gen-tokens {gen_tokens} does not fit the model's {max_pos}-token context")
        max_prompt_tokens = min(max_prompt_tokens, max_pos - gen_tokens)
    emb = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    per_request: list[RequestRouting] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        per_request += generate_with_routing(
            model, tokenizer, [render_prompt(p, tokenizer) for p in chunk], gen_tokens,
            max_prompt_tokens=max_prompt_tokens, router_probs=router_probs,
        )
        if on_batch:
            on_batch(len(per_request), len(prompts))
    num_experts, top_k = layers[0].num_experts, layers[0].top_k
    lengths = [len(r.token_ids) for r in per_request]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pre_act = np.stack([activation_matrix(r.ids[: r.prompt_len], num_experts) for r in per_request])
    dec_act = np.stack([activation_matrix(r.ids[r.prompt_len :], num_experts) for r in per_request])
    vectors = np.stack([prompt_vector(emb[r.token_ids[: r.prompt_len]]) for r in per_request])
    meta = TraceMeta(
        num_moe_layers=len(layers), num_experts=num_experts, top_k=top_k,
        moe_layer_indices=[layer.index for layer in layers], model=model_name, geometry=geometry,
        checkpoint_fingerprint=fingerprint,
        tokenizer=getattr(tokenizer, "name_or_path", None), source=source,
        generation={"gen_tokens": gen_tokens, "greedy": True, "batch_size": batch_size,
                    "max_prompt_tokens": max_prompt_tokens, "dtype": str(next(model.parameters()).dtype),
                    "device": str(next(model.parameters()).device)},
        prompt_ids=[p.id for p in prompts], domains=[p.domain for p in prompts], texts=[p.text for p in prompts],
    )
    return ExpertTrace.from_arrays(
        meta,
        expert_ids=np.concatenate([r.ids for r in per_request]),
        expert_weights=np.concatenate([r.weights for r in per_request]),
        phase=np.concatenate([r.phase for r in per_request]),
        request_offsets=offsets,
        token_ids=np.concatenate([r.token_ids for r in per_request]),
        prefill_activation=pre_act,
        decode_activation=dec_act,
        prompt_vectors=vectors,
        router_probs=np.concatenate([r.probs for r in per_request]) if router_probs else None,
    )
