"""RequestHandle: how a caller follows one request, token by token or to its Completion."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from moeserve.engine.sampling import TokenLogprobs
from moeserve.engine.sequence import Sequence, StepEvent


@dataclass(frozen=True)
class Completion:
    """A finished request. routed_experts: per generated token, expert ids [moe_layers][top_k]."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    routed_experts: list[list[list[int]]] | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # per generated token, when asked for


class RequestHandle:
    """The events of one request, read synchronously (`events`, `result`) or from an event loop
    (`aevents`, `aresult`) when the handle was made with that loop."""

    def __init__(self, request: Sequence, loop: asyncio.AbstractEventLoop | None = None):
        self.request, self.loop = request, loop
        self._sync: queue.SimpleQueue[StepEvent] = queue.SimpleQueue()
        self._async: asyncio.Queue[StepEvent] | None = asyncio.Queue() if loop is not None else None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def put(self, event: StepEvent) -> None:
        """Called on the scheduler thread."""
        if self.loop is None:
            self._sync.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def events(self, timeout: float | None = None) -> Iterator[StepEvent]:
        while True:
            event = self._sync.get(timeout=timeout)
            yield event
            if event.finished:
                return

    async def aevents(self) -> AsyncIterator[StepEvent]:
        while True:
            event = await self._async.get()
            yield event
            if event.finished:
                return

    def _collect(self, events: list[StepEvent]) -> Completion:
        last = events[-1]
        routed = [r for e in events for r in (e.routed or [])] if self.request.return_routed_experts else None
        logprobs = [lp for e in events for lp in (e.logprobs or [])] if self.request.params.logprobs is not None \
            else None
        return Completion(self.request_id, "".join(e.text for e in events),
                          [t for e in events for t in e.token_ids], last.finish_reason or "error",
                          len(self.request.prompt_ids), routed, last.error, logprobs)

    def result(self, timeout: float | None = None) -> Completion:
        return self._collect(list(self.events(timeout)))

    async def aresult(self) -> Completion:
        return self._collect([e async for e in self.aevents()])
