"""OpenAI-compatible HTTP API over an `Engine` (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events or not; n
choices, prompt lists, logprobs, penalties), GET /v1/models, POST /tokenize, POST /detokenize, GET /version,
GET /health, GET /metrics (Prometheus), GET /openapi.json (this API's schema). With an API key every route
but /health needs `Authorization: Bearer KEY`. Errors are JSON `{"error": {"message", "type", "param", "code"}}`.
The request bodies and what is refused: serving/protocol.py; the completion work: serving/openai.py.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve import __version__, defaults
from moeserve.engine.engine import Engine
from moeserve.engine.metrics import CONTENT_TYPE
from moeserve.errors import MoeServeError
from moeserve.serving.openai import Completions, error
from moeserve.serving.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("moeserve.serving")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server's settings. api_key None or "": no key; request_timeout_s 0: no limit."""

    api_key: str | None = None
    default_max_tokens: int = defaults.DEFAULT_MAX_TOKENS
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    request_timeout_s: float = defaults.REQUEST_TIMEOUT_S

    def __post_init__(self):
        object.__setattr__(self, "api_key", self.api_key or None)
        if self.default_max_tokens < 1:
            raise MoeServeError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_body_bytes < 1024:
            raise MoeServeError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not (self.request_timeout_s >= 0 and math.isfinite(self.request_timeout_s)):
            raise MoeServeError(f"request_timeout_s must be a finite number >= 0, got {self.request_timeout_s}")


def create_app(engine: Engine, config: ServerConfig | None = None, owns_engine: bool = True) -> FastAPI:
    """The ASGI app. With `owns_engine` the app starts the engine and drains/stops it on shutdown."""
    limits = config or ServerConfig()
    api_key = limits.api_key

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if owns_engine:
            engine.shutdown(drain=True)

    # max_body_size: a larger body is refused with 413 (by its Content-Length, or once the bytes received pass
    # it) before JSON parsing, validation or the tokenizer see it
    app = FastAPI(title="moeserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", max_body_size=limits.max_body_bytes)
    completions_ = Completions(engine, limits.request_timeout_s, limits.default_max_tokens)
    routes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/health", "/openapi.json",
              "/tokenize", "/detokenize", "/version"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key is not None and path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
                response = error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                  "authentication_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
                engine.metrics.requests.labels(path if path in routes else "other", "401").inc()
                return response
        response = await call_next(request)
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
            engine.metrics.requests.labels(path if path in routes else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(StarletteHTTPException)
    async def on_httperror(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if exc.status_code == 413:
            return error(413, f"request body over the server's limit of {limits.max_body_bytes} bytes",
                          code="body_too_large")
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON")
        if not where and first.get("type") == "model_attributes_type":
            return error(400, "the request body must be a JSON object (Content-Type: application/json)")
        return error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.exception_handler(MoeServeError)
    async def on_bad_input(request: Request, exc: MoeServeError):
        return error(400, str(exc))

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
            "id": name, "object": "model", "created": engine.created, "owned_by": "moeserve",
            "root": engine.model_path, "max_model_len": engine.context_limit} for name in engine.served_names]}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if not engine.serves(body.model):
            return error(404, f"model {body.model!r} not found", param="model", code="model_not_found")
        if body.prompt is not None:
            ids = await run_in_threadpool(engine.encode_prompt, body.prompt)
        else:
            ids = await run_in_threadpool(engine.encode_chat, [{"role": m.role, "content": m.text()}
                                                               for m in body.messages])
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_limit}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if not engine.serves(body.model):
            return error(404, f"model {body.model!r} not found", param="model", code="model_not_found")
        return {"prompt": await run_in_threadpool(engine.decode, engine.encode_prompt(body.tokens))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        encodes = [functools.partial(engine.encode_prompt, p) for p in body.prompts()]
        handles = await completions_.submit(body, encodes, None)
        return handles if isinstance(handles, JSONResponse) else await completions_.respond(body, handles, False,
                                                                                             request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        handles = await completions_.submit(body, [lambda: engine.encode_chat(messages)],
                                            body.max_completion_tokens or body.max_tokens)
        return handles if isinstance(handles, JSONResponse) else await completions_.respond(body, handles, True,
                                                                                             request)

    return app
