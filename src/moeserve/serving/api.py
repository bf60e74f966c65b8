"""OpenAI-compatible HTTP API over an `Engine` (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events or not),
GET /v1/models, GET /health, GET /metrics (Prometheus). With an API key every route but /health needs
`Authorization: Bearer KEY`. Errors are JSON `{"error": {"message", "type", "param", "code"}}`.

Extensions to the OpenAI request: `return_routed_experts` (per generated token, the expert ids chosen
in each MoE layer), `return_token_ids`, `ignore_eos`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve.errors import MoeServeError
from moeserve.serving.engine import Completion, Engine, RequestHandle
from moeserve.serving.metrics import CONTENT_TYPE
from moeserve.serving.sampling import SamplingParams
from moeserve.serving.scheduler import EngineClosed, QueueFull

log = logging.getLogger("moeserve.serving")


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Any = None
    return_routed_experts: bool = False
    return_token_ids: bool = False
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported (leave it at 0)")
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    def params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MoeServeError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: Engine, api_key: str | None = None, default_max_tokens: int = 16,
               owns_engine: bool = True) -> FastAPI:
    """The ASGI app. With `owns_engine` the app starts the engine and drains/stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if owns_engine:
            engine.shutdown(drain=True)

    app = FastAPI(title="moeserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    moe_layers = [la.index for la in engine.layers]
    routes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/health"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key is not None and path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                  "authentication_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
                engine.metrics.requests.labels(path if path in routes else "other", "401").inc()
                return response
        response = await call_next(request)
        if path.startswith("/v1/"):
            engine.metrics.requests.labels(path if path in routes else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        if not where and first.get("type") == "model_attributes_type":
            return _error(400, "the request body must be a JSON object (Content-Type: application/json)")
        return _error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.exception_handler(MoeServeError)
    async def on_bad_input(request: Request, exc: MoeServeError):
        return _error(400, str(exc))

    @app.get("/health")
    async def health():
        if engine.closing:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "moeserve",
            "root": engine.model_path, "max_model_len": engine.context_limit}]}

    def _submit(body: _Sampling, prompt, max_tokens: int | None) -> RequestHandle | JSONResponse:
        if body.model is not None and body.model != engine.model_name:
            return _error(404, f"model {body.model!r} not found (this server serves {engine.model_name!r})",
                          param="model", code="model_not_found")
        params = body.params(default_max_tokens)
        if max_tokens is not None:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        try:
            return engine.submit(prompt, params, return_routed_experts=body.return_routed_experts,
                                 stream_text=body.stream, loop=asyncio.get_running_loop())
        except QueueFull as exc:
            return _error(429, str(exc), "rate_limit_error", headers={"Retry-After": str(exc.retry_after_s)})
        except EngineClosed as exc:
            return _error(503, str(exc), "service_unavailable")

    def _extras(body: _Sampling, token_ids: list[int], routed) -> dict:
        extra: dict[str, Any] = {}
        if body.return_token_ids:
            extra["token_ids"] = token_ids
        if body.return_routed_experts:
            extra["routed_experts"] = routed or []
        return extra

    def _usage(c: Completion) -> dict:
        n = len(c.token_ids)
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n, "total_tokens": c.prompt_tokens + n}

    async def _respond(body: _Sampling, handle: RequestHandle, chat: bool) -> Response:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": engine.model_name}
        if body.return_routed_experts:
            head["moe_layers"] = moe_layers
        if not body.stream:
            c = await handle.aresult()
            if c.finish_reason == "error":
                return _error(500, f"generation failed: {c.error}", "server_error")
            choice = ({"index": 0, "message": {"role": "assistant", "content": c.text}} if chat
                      else {"index": 0, "text": c.text, "logprobs": None})
            choice.update(finish_reason=c.finish_reason, **_extras(body, c.token_ids, c.routed_experts))
            return JSONResponse({**head, "choices": [choice], "usage": _usage(c)})
        return StreamingResponse(_stream(body, handle, chat, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(body: _Sampling, handle: RequestHandle, chat: bool, head: dict) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        finished, n_tokens = False, 0
        try:
            if chat:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
            async for event in handle.aevents():
                finished, n_tokens = event.finished, n_tokens + len(event.token_ids)
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error"}})
                    break
                if not (event.text or event.finished or body.return_token_ids or body.return_routed_experts):
                    continue
                if chat:
                    choice = {"index": 0, "delta": {"content": event.text} if event.text else {}}
                else:
                    choice = {"index": 0, "text": event.text, "logprobs": None}
                choice.update(finish_reason=event.finish_reason, **_extras(body, event.token_ids, event.routed))
                yield _sse({**head, "choices": [choice]})
            if (body.stream_options or {}).get("include_usage"):
                p = len(handle.request.prompt_ids)
                usage = {"prompt_tokens": p, "completion_tokens": n_tokens, "total_tokens": p + n_tokens}
                yield _sse({**head, "choices": [], "usage": usage})
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client went away: free the batch slot
                engine.cancel(handle.request_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        handle = _submit(body, body.prompt, None)
        return handle if isinstance(handle, JSONResponse) else await _respond(body, handle, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        handle = _submit(body, ids, body.max_completion_tokens or body.max_tokens)
        return handle if isinstance(handle, JSONResponse) else await _respond(body, handle, chat=True)

    return app


# ------------------------------------------------------------------------------------------ running
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MoeServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server(app: FastAPI, log_level: str = "warning", graceful_timeout_s: float | None = None):
    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would kill the process
        # with the signal's status; a drained server exits normally instead.
        def capture_signals(self):
            import contextlib
            import signal

            @contextlib.contextmanager
            def handlers():
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, h in previous.items():
                        signal.signal(s, h)

            return handlers()

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                log.info("signal %d: draining in-flight requests, then stopping", sig)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                            access_log=False)
    return Server(config)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          default_max_tokens: int = 16, log_level: str = "warning", on_bound=None) -> None:
    """Serve until SIGINT/SIGTERM, then drain accepted requests and stop the engine and its pool.

    on_bound(url) is called once the listening socket is bound (connections queue from then on)."""
    sock = bind(host, port)
    server = _server(create_app(engine, api_key, default_max_tokens), log_level)
    url = f"http://{host}:{sock.getsockname()[1]}"
    log.info("serving %s on %s", engine.model_name, url)
    if on_bound is not None:
        on_bound(url)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        engine.shutdown(drain=True)


class BackgroundServer:
    """A server on a thread (tests, `moeserve bench --model`): `with BackgroundServer(engine) as s: s.url`."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 owns_engine: bool = False):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = _server(create_app(engine, api_key, owns_engine=owns_engine))
        self.thread = threading.Thread(target=self._run, name="moeserve-http", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
