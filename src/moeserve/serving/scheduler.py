"""Continuous batching: requests join and leave the running batch between model steps.

One iteration (`Scheduler.step`):
1. admit waiting requests while the batch has room (`max_batch`) and the iteration's prefill budget
   (`max_prefill_tokens`) lasts, at least one;
2. prefill each newcomer on its own (batch 1, no padding: bit-identical to `generate`'s prefill, and no
   pad token ever reaches the MoE layers), choose its first token and append its KV rows to the batch;
3. one batched decode forward over every running request (left-padded KV, see kv_batch.py), one new
   token each; finished requests leave the batch at once and waiting ones take their place next step.

Everything here runs on the engine's scheduler thread except `add`, `cancel` and `pending`, which other
threads call (they only touch the waiting queue, under a lock).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moeserve.serving.kv_batch import KVBatch, new_cache
from moeserve.serving.sampling import SamplingParams, TextAssembler, choose_tokens, new_generator

log = logging.getLogger("moeserve.serving")
_ids = itertools.count(1)


class QueueFull(Exception):
    """The waiting queue is at `max_queue`: the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server busy: retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class GenerationRequest:
    """One request as the scheduler sees it (already tokenized and validated)."""

    prompt_ids: list[int]
    params: SamplingParams
    return_routed_experts: bool = False
    stream_text: bool = True  # decode text at every token (needed for streaming); else once at the end
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass(frozen=True)
class StepEvent:
    """What a request receives after each of its tokens.

    routed: per new token, expert ids [moe_layers][top_k] (only with return_routed_experts).
    """

    text: str
    token_ids: list[int]
    routed: list[list[list[int]]] | None = None
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


@dataclass
class _Live:
    request: GenerationRequest
    emit: Callable[[StepEvent], None]
    arrived: float
    generator: torch.Generator | None = None
    text: TextAssembler | None = None
    generated: list[int] = field(default_factory=list)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cancelled: bool = False


class Scheduler:
    """Continuous batching over a Hugging Face causal LM (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_prefill_tokens: int = 2048,
        routing_layers: list | None = None,
        on_finished: Callable[[FinishedStats], None] | None = None,
        on_routed: Callable[[torch.Tensor], None] | None = None,
    ):
        from moeserve.models.adapter import text_config

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.device = next(model.parameters()).device
        config = text_config(model)
        self.context_limit = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.eos_ids = _eos_ids(model, tokenizer)
        self.routing_layers = routing_layers or []
        self.on_finished, self.on_routed = on_finished, on_routed
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._capture = None
        self._lock = threading.RLock()
        self.waiting: deque[_Live] = deque()
        self.running: list[_Live] = []  # row i of `batch` is running[i]
        self._unfinished: dict[str, _Live] = {}  # every accepted request until it finishes
        self.batch = KVBatch()
        self.mean_e2e_s = 1.0  # moving average, for Retry-After
        self.busy_s = 0.0  # time spent in model steps (what a serverless main function is billed for)

    # ----------------------------------------------------------------------- called from any thread
    def add(self, request: GenerationRequest, emit: Callable[[StepEvent], None]) -> None:
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self.retry_after_s())
            live = _Live(request, emit, time.perf_counter())
            self.waiting.append(live)
            self._unfinished[request.request_id] = live

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary (its slot is freed; it gets finish_reason "cancelled")."""
        with self._lock:
            live = self._unfinished.get(request_id)
            if live is not None:
                live.cancelled = True

    def pending(self) -> tuple[int, int]:
        """(waiting, running) request counts."""
        with self._lock:
            return len(self.waiting), len(self.running)

    def retry_after_s(self) -> int:
        """A guess of when a queue slot frees: the queue's share of work over the batch's parallelism."""
        queued = len(self.waiting) + 1
        return max(1, min(60, round(self.mean_e2e_s * queued / self.max_batch)))

    # --------------------------------------------------------------------- scheduler thread only
    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: admit and prefill newcomers, then one decode step for the whole batch."""
        if self._capture is None and self.routing_layers:
            from moeserve.traces.capture import RoutingCapture

            self._capture = RoutingCapture(self.model, self.routing_layers).__enter__()
        start = time.perf_counter()
        self._drop_cancelled()
        for live in self._admit():
            self._guarded([live], self._prefill, live)
        if self.running:
            self._guarded(list(self.running), self._decode)
        self.busy_s += time.perf_counter() - start

    def close(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def _admit(self) -> list[_Live]:
        admitted, budget = [], self.max_prefill_tokens
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                cost = len(self.waiting[0].request.prompt_ids)
                if admitted and cost > budget:
                    break
                live = self.waiting.popleft()
                if live.cancelled:
                    self._finish(live, "cancelled")
                    continue
                budget -= cost
                admitted.append(live)
        return admitted

    def _guarded(self, lives: list[_Live], fn: Callable, *args) -> None:
        """Run a model step; if it raises, fail the requests it served instead of the whole engine."""
        try:
            fn(*args)
        except Exception as exc:  # a bug or a dead device: the requests get an error, the server lives on
            log.exception("model step failed for %d request(s)", len(lives))
            failed = {id(live) for live in lives}
            for live in lives:
                live.emit(StepEvent("", [], finished=True, finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                self._finish(live, "error", emit=False)
            keep = [i for i, live in enumerate(self.running) if id(live) not in failed]
            with self._lock:
                self.running = [self.running[i] for i in keep]
            self.batch.keep(keep)

    def _drop_cancelled(self) -> None:
        with self._lock:
            dropped = [live for live in self.waiting if live.cancelled]
            if dropped:
                self.waiting = deque(live for live in self.waiting if not live.cancelled)
        for live in dropped:
            self._finish(live, "cancelled")
        keep = [i for i, live in enumerate(self.running) if not live.cancelled]
        if len(keep) == len(self.running):
            return
        for live in self.running:
            if live.cancelled:
                self._finish(live, "cancelled")
        with self._lock:
            self.running = [self.running[i] for i in keep]
        self.batch.keep(keep)

    def _forward(self, **inputs) -> torch.Tensor:
        """Run the model; -> last-position logits [B, V] float32."""
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1
        out = self.model(**inputs, use_cache=True)
        return out.logits[:, -1, :].float()

    def _routing(self) -> torch.Tensor | None:
        """Routing of the last forward: [rows, moe_layers, top_k] long on the CPU, or None (dense model)."""
        if self._capture is None:
            return None
        call = self._capture.calls[-1]
        self._capture.calls.clear()
        ids = torch.stack([t for t in call.ids], dim=1).cpu()
        if self.on_routed is not None:
            self.on_routed(ids)
        return ids

    def _prefill(self, live: _Live) -> None:
        request = live.request
        live.admitted = time.perf_counter()
        if not request.params.greedy:
            live.generator = new_generator(request.params.seed, self.device)
        live.text = TextAssembler(self.tokenizer, request.params.stop)
        cache = new_cache()
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        logits = self._forward(input_ids=ids, past_key_values=cache)
        routing = self._routing()
        token = choose_tokens(logits, [request.params], [live.generator])[0]
        last_row = None if routing is None else routing[-1:]
        if self._accept(live, token, last_row):
            return
        self.batch.extend(KVBatch.single(cache, len(request.prompt_ids), self.device))
        with self._lock:
            self.running.append(live)

    def _decode(self) -> None:
        mask, positions = self.batch.step_inputs()
        ids = torch.tensor([[live.generated[-1]] for live in self.running], dtype=torch.long, device=self.device)
        logits = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=self.batch.cache)
        self.batch.advance(mask)
        routing = self._routing()
        tokens = choose_tokens(logits, [live.request.params for live in self.running],
                               [live.generator for live in self.running])
        keep = [row for row, (live, token) in enumerate(zip(self.running, tokens, strict=True))
                if not self._accept(live, token, None if routing is None else routing[row:row + 1])]
        if len(keep) < len(self.running):
            with self._lock:
                self.running = [self.running[i] for i in keep]
            self.batch.keep(keep)

    def _accept(self, live: _Live, token: int, routing: torch.Tensor | None) -> bool:
        """Record a new token, send it to the request; -> whether the request is finished."""
        now = time.perf_counter()
        request, params = live.request, live.request.params
        live.generated.append(token)
        live.first_token = live.first_token or now
        live.last_token = now
        reason = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        elif len(live.generated) >= params.max_tokens:
            reason = "length"
        elif self.context_limit and len(request.prompt_ids) + len(live.generated) >= self.context_limit:
            reason = "length"
        text = ""
        if request.stream_text or params.stop:
            text = live.text.push(live.generated)
            if live.text.stopped:
                reason = "stop"
        elif reason is not None:
            text = live.text.push(live.generated)
        if reason is not None:
            text += live.text.finish()
        routed = routing.tolist() if request.return_routed_experts and routing is not None else None
        live.emit(StepEvent(text, [token], routed, finished=reason is not None, finish_reason=reason))
        if reason is not None:
            self._finish(live, reason, emit=False)
        return reason is not None

    def _finish(self, live: _Live, reason: str, emit: bool = True) -> None:
        now = time.perf_counter()
        with self._lock:
            self._unfinished.pop(live.request.request_id, None)
        if emit:
            live.emit(StepEvent("", [], finished=True, finish_reason=reason))
        e2e = now - live.arrived
        self.mean_e2e_s = 0.9 * self.mean_e2e_s + 0.1 * e2e
        if self.on_finished is None:
            return
        n = len(live.generated)
        self.on_finished(FinishedStats(
            request_id=live.request.request_id,
            prompt_tokens=len(live.request.prompt_ids),
            completion_tokens=n,
            queue_s=(live.admitted or now) - live.arrived,
            ttft_s=None if live.first_token is None else live.first_token - live.arrived,
            tpot_s=(live.last_token - live.first_token) / (n - 1) if n > 1 else None,
            e2e_s=e2e,
            finish_reason=reason,
        ))


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids as `generate` uses them: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {int(eos)}
