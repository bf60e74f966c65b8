"""Scheduler: the waiting queue and the running batch; which sequences run in the next step.

`schedule()` drops cancelled sequences, then spends the step's prompt-token budget
(`max_prefill_tokens`), as vLLM's and SGLang's chunked prefill do: first the next chunk of the prompt
being prefilled in chunks (at most one at a time), then waiting prompts that fit whole (prefilled
together in one forward), in arrival order while the batch has room (`max_batch`); a prompt at the head
of the queue that does not fit what is left starts a chunked prefill with it. So one step never
prefills more than the budget, and a long prompt delays the running requests' next token by one chunk,
not by its whole length. It computes nothing: the model runner prefills and decodes, the engine
finishes sequences (`finish`).

`add`, `cancel` and `pending` are called from any thread (they touch the queue under a lock);
`schedule` and `finish` only from the engine's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from moeserve.engine.config import EngineConfig
from moeserve.engine.sequence import Sequence


class QueueFull(Exception):
    """The waiting queue is at `max_queue`: the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server busy: retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class ScheduledStep:
    """One step's work: prefill `chunk` (a sequence, prompt positions [start, end)) and `admitted` (whole
    prompts, together), then decode `running` (in batch row order); `cancelled` left the queue, the
    chunked prefill or the batch and must be finished as cancelled."""

    admitted: list[Sequence] = field(default_factory=list)
    running: list[Sequence] = field(default_factory=list)
    cancelled: list[Sequence] = field(default_factory=list)
    chunk: tuple[Sequence, int, int] | None = None

    @property
    def chunk_done(self) -> bool:
        """Whether `chunk` is its prompt's last (the sequence then joins the batch)."""
        return self.chunk is not None and self.chunk[2] == len(self.chunk[0].prompt_ids)


class Scheduler:
    """Queueing and admission for continuous batching."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._lock = threading.Lock()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the model runner's batch row order
        self.chunked: Sequence | None = None  # the sequence being prefilled in chunks
        self.chunked_done = 0  # its prompt tokens prefilled so far
        self._unfinished: dict[str, Sequence] = {}  # every accepted sequence until it finishes
        self.mean_e2e_s = 1.0  # moving average, for Retry-After

    # ----------------------------------------------------------------------- called from any thread
    def add(self, seq: Sequence) -> None:
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(self._retry_after_s())
            self.waiting.append(seq)
            self._unfinished[seq.request_id] = seq

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary (its slot is freed; it gets finish_reason "cancelled")."""
        with self._lock:
            seq = self._unfinished.get(request_id)
            if seq is not None:
                seq.cancelled = True

    def cancel_all(self) -> None:
        with self._lock:
            for seq in self._unfinished.values():
                seq.cancelled = True

    def pending(self) -> tuple[int, int]:
        """(waiting, running) request counts."""
        with self._lock:
            return len(self.waiting) + (self.chunked is not None), len(self.running)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self.chunked)

    def _retry_after_s(self) -> int:
        """A guess of when a queue slot frees: the queue's share of work over the batch's parallelism."""
        queued = len(self.waiting) + 1
        return max(1, min(60, round(self.mean_e2e_s * queued / self.config.max_batch)))

    # ---------------------------------------------------------------------- the engine's thread only
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        with self._lock:
            step.cancelled = [s for s in self.waiting if s.cancelled] + [s for s in self.running if s.cancelled]
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
            self.running = [s for s in self.running if not s.cancelled]
            if self.chunked is not None and self.chunked.cancelled:
                step.cancelled.append(self.chunked)
                self.chunked = None
            budget = self.config.max_prefill_tokens
            if self.chunked is not None:
                seq, start = self.chunked, self.chunked_done
                end = min(len(seq.prompt_ids), start + budget)
                step.chunk, budget = (seq, start, end), budget - (end - start)
                self.chunked_done = end
                if end == len(seq.prompt_ids):
                    self.chunked = None
            room = self.config.max_batch - len(self.running) - (step.chunk is not None)
            while self.waiting and budget > 0 and len(step.admitted) < room:
                cost = len(self.waiting[0].prompt_ids)
                if cost <= budget:
                    budget -= cost
                    step.admitted.append(self.waiting.popleft())
                    continue
                if step.chunk is None:  # the head of the queue does not fit: its first chunk
                    seq = self.waiting.popleft()
                    step.chunk = (seq, 0, budget)
                    self.chunked, self.chunked_done = seq, budget
                break
            step.running = list(self.running)
        return step

    def start_running(self, seq: Sequence) -> None:
        """A prefilled sequence joins the running batch (as its last row)."""
        with self._lock:
            self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Forget a finished sequence (it leaves the batch if it was in it)."""
        with self._lock:
            self._unfinished.pop(seq.request_id, None)
            if self.chunked is seq:  # failed mid-way through its chunked prefill
                self.chunked = None
            if seq in self.running:
                self.running.remove(seq)
        if seq.admitted is not None:
            e2e = (seq.last_token or seq.admitted) - seq.arrived
            self.mean_e2e_s = 0.9 * self.mean_e2e_s + 0.1 * e2e
