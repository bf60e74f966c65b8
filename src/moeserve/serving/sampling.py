"""Per-request token choice (greedy, temperature, top-p, seed) and text assembly with stop strings.

Greedy rows take `argmax` of the logits, exactly as `generate(do_sample=False)` does. Sampled rows each
own a `torch.Generator` seeded from the request's `seed`, so a seeded request draws the same tokens
whatever other requests share its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moeserve.errors import MoeServeError


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 means greedy; stop strings end the text before them."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MoeServeError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise MoeServeError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise MoeServeError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise MoeServeError("stop must be at most 4 non-empty strings")


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
    sorted_probs[mass_before >= top_p] = 0.0  # the most likely token always survives (mass_before = 0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                  ) -> list[int]:
    """Next token of every row. logits: [B, V] (any float dtype) -> B token ids."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
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
