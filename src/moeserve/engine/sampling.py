"""Per-request token choice (penalties, greedy, temperature, top-p, seed), log-probabilities, and text
assembly with stop strings.

Greedy rows take `argmax` of the logits, exactly as `generate(do_sample=False)` does. Sampled rows each
own a `torch.Generator` seeded from the request's `seed`, so a seeded request draws the same tokens
whatever other requests share its batch. Penalties follow OpenAI's definitions (presence and frequency
over the tokens generated so far) and Hugging Face's repetition penalty (over prompt and output);
log-probabilities are those of the model's own distribution, before penalties and temperature (as
vLLM reports them by default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moeserve.errors import MoeServeError

SAMPLING_EPS = 1e-5  # below this temperature, sampling is greedy: logits / T would overflow float32


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 means greedy; stop strings end the text before them."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted per occurrence in what was generated
    repetition_penalty: float = 1.0  # [0.01, 2]: >1 divides positive / multiplies negative logits of seen tokens
    logprobs: int | None = None  # per token, its log-probability and the top-`logprobs` alternatives

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it that sampling is argmax anyway (vLLM's rule: < 1e-5)."""
        return self.temperature < SAMPLING_EPS

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MoeServeError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise MoeServeError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise MoeServeError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise MoeServeError("stop must be at most 4 non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise MoeServeError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.01 <= self.repetition_penalty <= 2.0:  # smaller divisors overflow float32 logits
            raise MoeServeError(f"repetition_penalty must be in [0.01, 2], got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise MoeServeError(f"logprobs must be in [0, 20], got {self.logprobs}")


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded when asked, otherwise from the OS's entropy."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling).

    probs: [V] float, sums to 1 -> [V] float, renormalised.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop = mass_before >= top_p
    drop[..., 0] = False  # the most likely token always survives (even a top_p that is 0 in float32)
    sorted_probs[drop] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability and the most likely alternatives: top [(token id, logprob)]."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Penalised logits [B, V] float32 (a copy; rows without penalties unchanged). prompts / outputs: the
    token ids each row's request was given and has generated so far."""
    out = logits.float().clone()
    for row, p in enumerate(params):
        if not p.penalised:
            continue
        vocab = out.shape[1]
        generated = torch.bincount(torch.tensor(outputs[row], dtype=torch.long), minlength=vocab)[:vocab]
        generated = generated.to(out.device, out.dtype)
        out[row] -= p.frequency_penalty * generated + p.presence_penalty * (generated > 0).to(out.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompts[row]) | set(outputs[row])), dtype=torch.long, device=out.device)
            values = out[row, seen]
            out[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                   ) -> list[TokenLogprobs | None]:
    """Per row, the chosen token's log-probability under the model's distribution and its top-n
    alternatives (n = the row's `logprobs`), or None when the row did not ask. logits: [B, V] raw."""
    if all(p.logprobs is None for p in params):
        return [None] * len(params)
    logp = torch.log_softmax(logits.float(), dim=-1)
    result: list[TokenLogprobs | None] = []
    for row, (p, token) in enumerate(zip(params, tokens, strict=True)):
        if p.logprobs is None:
            result.append(None)
            continue
        top = torch.topk(logp[row], p.logprobs) if p.logprobs else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        result.append(TokenLogprobs(float(logp[row, token]), pairs))
    return result


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                  ) -> list[int]:
    """Next token of every row. logits: [B, V] (any float dtype; penalties already applied) -> B token ids."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        row_logits = logits[row].float()
        # shifted so the largest is 0: a tiny temperature (5e-324) gives -inf for the others, never inf - inf
        probs = torch.softmax((row_logits - row_logits.max()) / p.temperature, dim=-1)
        probs = top_p_filter(probs, p.top_p)
        chosen[row] = int(torch.multinomial(probs.to(g.device), 1, generator=g).item())
    return chosen


class TextAssembler:
    """Turns a growing list of token ids into text deltas that never show a stop string or half a character.

    The whole generated sequence is decoded each time (robust to tokenizers whose pieces depend on their
    neighbours). A delta holds back any tail that could still become a stop string, and a trailing
    U+FFFD (an incomplete UTF-8 sequence); `finish()` releases what is held, so the deltas always add up
    to `final_text`.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""  # decoded text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of `text` already handed out
        self.pieces: list[str] = []  # what was handed out
        self.stopped = False

    def _held_back(self, text: str) -> int:
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        if text.endswith("\ufffd"):
            held = max(held, 1)
        return held

    def push(self, token_ids: list[int]) -> str:
        """All generated ids so far -> the new text to send (may be ""); sets `stopped` on a stop string."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        search_from = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self.finish()
        self.text = text
        end = len(text) - self._held_back(text)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        self.pieces.append(delta)
        return delta

    def finish(self) -> str:
        """Everything not yet handed out (held-back characters included)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        self.pieces.append(delta)
        return delta

    @property
    def final_text(self) -> str:
        """The concatenation of every delta (equal to the decoded text unless the tokenizer revised it)."""
        return "".join(self.pieces)
