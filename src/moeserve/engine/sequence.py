"""Sequence: one request as the engine carries it from arrival to its last token.

The scheduler queues and admits sequences, the model runner computes their next tokens, the engine's
postprocessing appends them, applies the stop rules and sends each token's event to the request's
listener (`emit`). `StepEvent` is what a request receives per token; `FinishedStats` is what the metrics
receive when it ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeserve.engine.sampling import SamplingParams, TextAssembler, TokenLogprobs


@dataclass(frozen=True)
class StepEvent:
    """What a request receives after each of its tokens.

    routed: per new token, expert ids [moe_layers][top_k] (only with return_routed_experts).
    """

    text: str
    token_ids: list[int]
    routed: list[list[list[int]]] | None = None
    logprobs: list[TokenLogprobs] | None = None  # per new token, when the request asked for logprobs
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclass(frozen=True)
class FinishedStats:
    """Timings of a finished request, for the metrics (seconds from its arrival)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float
    finish_reason: str


def _new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


@dataclass(eq=False)  # compared by identity: the scheduler's lists hold each once
class Sequence:
    """One request (already tokenised and validated) and its state.

    prompt_ids: [prompt tokens]; generated: the tokens chosen so far (the last one not yet fed back).
    """

    prompt_ids: list[int]
    params: SamplingParams
    return_routed_experts: bool = False
    stream_text: bool = True  # decode text at every token (needed for streaming); else once at the end
    request_id: str = field(default_factory=_new_request_id)
    emit: Callable[[StepEvent], None] = field(default=lambda event: None, repr=False)
    arrived: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = field(default=None, repr=False)
    text: TextAssembler | None = field(default=None, repr=False)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cancelled: bool = False
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens."""
        return len(self.prompt_ids) + len(self.generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def stats(self, now: float) -> FinishedStats:
        n = len(self.generated)
        return FinishedStats(
            request_id=self.request_id,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=n,
            queue_s=(self.admitted or now) - self.arrived,
            ttft_s=None if self.first_token is None else self.first_token - self.arrived,
            tpot_s=(self.last_token - self.first_token) / (n - 1) if n > 1 else None,
            e2e_s=now - self.arrived,
            finish_reason=self.finish_reason or "error",
        )
