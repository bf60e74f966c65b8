"""The completion endpoints' work: queue a request's sequences (n per prompt, several prompts), wait for them
or stream them, and shape OpenAI's responses (choices, usage, logprobs in each endpoint's format).

Everything here runs on the HTTP event loop; tokenising runs on a worker thread; a request that outlives
the server's time limit, or whose client leaves, has every one of its sequences cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from moeserve.engine.engine import Engine
from moeserve.engine.handle import Completion, RequestHandle
from moeserve.engine.sampling import TokenLogprobs
from moeserve.engine.scheduler import EngineClosed, QueueFull
from moeserve.errors import MoeServeError
from moeserve.serving.protocol import Sampling

log = logging.getLogger("moeserve.serving")
MAX_SEQUENCES = 64  # n x prompts of one request


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def client_gone(request: Request) -> None:
    """Return once the client has closed its connection (the body is read by then: what is left to
    receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Completions:
    """/v1/completions and /v1/chat/completions over one engine."""

    def __init__(self, engine: Engine, timeout_s: float, default_max_tokens: int):
        self.engine, self.timeout_s, self.default_max_tokens = engine, timeout_s, default_max_tokens

    # ------------------------------------------------------------------------------------- submit
    async def submit(self, body: Sampling, encodes: list[Callable[[], list[int]]], max_tokens: int | None
                     ) -> list[RequestHandle] | JSONResponse:
        """Tokenise each prompt on a worker thread (never on the event loop), then queue `n` sequences per
        prompt (seeded requests: seed + j for the j-th). All queued or none (429/503 cancel the rest)."""
        if not self.engine.serves(body.model):
            return error(404, f"model {body.model!r} not found (this server serves {self.engine.model_name!r})",
                         param="model", code="model_not_found")
        if len(encodes) * body.n > MAX_SEQUENCES:
            raise MoeServeError(f"n x prompts is {len(encodes) * body.n}: at most {MAX_SEQUENCES} per request")
        params = body.params(self.default_max_tokens)
        if max_tokens is not None:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        params.validate()
        prompts = [await run_in_threadpool(encode) for encode in encodes]
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                for j in range(body.n):
                    seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                    handles.append(self.engine.submit(ids, seeded, return_routed_experts=body.return_routed_experts,
                                                      stream_text=body.stream, loop=asyncio.get_running_loop()))
        except (QueueFull, EngineClosed) as exc:
            for h in handles:
                self.engine.cancel(h.request_id)
            if isinstance(exc, QueueFull):
                return error(429, str(exc), "rate_limit_error", headers={"Retry-After": str(exc.retry_after_s)})
            return error(503, str(exc), "service_unavailable")
        return handles

    # --------------------------------------------------------------------------------------- wait
    def timed_out(self) -> JSONResponse:
        return error(504, f"the request did not finish within the server's {self.timeout_s:g} s limit",
                     "timeout_error", code="request_timeout")

    async def wait(self, handles: list[RequestHandle], request: Request) -> list[Completion] | Response:
        """Every sequence's completion; all cancelled (their batch slots freed) if the client goes away or
        the server's time limit passes first."""
        results = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
        gone = asyncio.ensure_future(client_gone(request))
        done, _ = await asyncio.wait({results, gone}, timeout=self.timeout_s or None,
                                     return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if results in done:
            return results.result()
        results.cancel()
        for h in handles:
            self.engine.cancel(h.request_id)
        if gone in done:
            log.info("%s: the client went away, request cancelled", handles[0].request_id)
            return Response(status_code=499)  # nobody reads it
        return self.timed_out()

    # ----------------------------------------------------------------------------------- shaping
    def _logprobs(self, body: Sampling, chat: bool, token_ids: list[int], logprobs: list[TokenLogprobs] | None,
                  offset: int = 0) -> dict | None:
        """OpenAI's logprobs object: chat {"content": [...]}; completions tokens / token_logprobs /
        top_logprobs / text_offset (offsets from the start of this choice's text, `offset` for a stream)."""
        if not body.wants_logprobs or logprobs is None:
            return None
        token = self.engine.token_text
        if chat:
            return {"content": [{
                "token": token(t), "logprob": lp.logprob, "bytes": list(token(t).encode()),
                "top_logprobs": [{"token": token(a), "logprob": v, "bytes": list(token(a).encode())} for a, v in lp.top],
            } for t, lp in zip(token_ids, logprobs, strict=True)]}
        texts = [token(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{token(a): v for a, v in lp.top} for lp in logprobs] if body.top_n else None,
                "text_offset": offsets}

    @staticmethod
    def _extras(body: Sampling, token_ids: list[int], routed) -> dict:
        extra: dict[str, Any] = {}
        if body.return_token_ids:
            extra["token_ids"] = token_ids
        if body.return_routed_experts:
            extra["routed_experts"] = routed or []
        return extra

    def _head(self, body: Sampling, chat: bool, stream: bool) -> dict:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": body.model or self.engine.model_name}
        if body.return_routed_experts:
            head["moe_layers"] = [la.index for la in self.engine.layers]
        return head

    async def respond(self, body: Sampling, handles: list[RequestHandle], chat: bool, request: Request) -> Response:
        if body.stream:
            return StreamingResponse(self.stream(body, handles, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completions = await self.wait(handles, request)
        if isinstance(completions, Response):
            return completions
        failed = next((c for c in completions if c.finish_reason == "error"), None)
        if failed is not None:
            return error(500, f"generation failed: {failed.error}", "server_error")
        choices = []
        for index, c in enumerate(completions):
            logprobs = self._logprobs(body, chat, c.token_ids, c.logprobs)
            choice = ({"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs}
                      if chat else {"index": index, "text": c.text, "logprobs": logprobs})
            choice.update(finish_reason=c.finish_reason, **self._extras(body, c.token_ids, c.routed_experts))
            choices.append(choice)
        prompt_tokens = sum(c.prompt_tokens for c in completions[:: body.n])  # once per prompt, not per choice
        generated = sum(len(c.token_ids) for c in completions)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated}
        return JSONResponse({**self._head(body, chat, False), "choices": choices, "usage": usage})

    async def _events(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, object]]:
        """The events of every sequence, merged as they come: (choice index, StepEvent); ends when all
        finished; raises asyncio.TimeoutError past the server's time limit."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle):
            async for event in handle.aevents():
                await queue.put((index, event))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        open_ = len(handles)
        try:
            while open_:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                index, event = await asyncio.wait_for(queue.get(), remaining)
                open_ -= int(event.finished)
                yield index, event
        finally:
            for task in tasks:
                task.cancel()

    async def stream(self, body: Sampling, handles: list[RequestHandle], chat: bool) -> AsyncIterator[str]:
        head = self._head(body, chat, True)
        finished: set[int] = set()
        generated = [0] * len(handles)
        offsets = [0] * len(handles)
        try:
            if chat:
                for index in range(len(handles)):
                    yield sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            try:
                async for index, event in self._events(handles):
                    generated[index] += len(event.token_ids)
                    if event.finished:
                        finished.add(index)
                    if event.finish_reason == "error":
                        yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error"}})
                        break
                    if not (event.text or event.finished or body.return_token_ids or body.return_routed_experts
                            or body.wants_logprobs):
                        continue
                    logprobs = self._logprobs(body, chat, event.token_ids, event.logprobs, offsets[index])
                    if logprobs is not None and not chat:
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    if chat:
                        choice = {"index": index, "delta": {"content": event.text} if event.text else {},
                                  "logprobs": logprobs}
                    else:
                        choice = {"index": index, "text": event.text, "logprobs": logprobs}
                    choice.update(finish_reason=event.finish_reason,
                                  **self._extras(body, event.token_ids, event.routed))
                    yield sse({**head, "choices": [choice]})
            except asyncio.TimeoutError:
                message = f"the request did not finish within the server's {self.timeout_s:g} s limit"
                yield sse({"error": {"message": message, "type": "timeout_error", "code": "request_timeout"}})
            if (body.stream_options or {}).get("include_usage"):
                p = sum(len(h.request.prompt_ids) for h in handles[:: body.n])
                usage = {"prompt_tokens": p, "completion_tokens": sum(generated), "total_tokens": p + sum(generated)}
                yield sse({**head, "choices": [], "usage": usage})
            yield sse("[DONE]")
        finally:
            for index, h in enumerate(handles):
                if index not in finished:  # the client went away or the time ran out: free the batch slot
                    self.engine.cancel(h.request_id)
