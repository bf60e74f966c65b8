"""Running the API: a bound socket, uvicorn with a graceful SIGTERM drain, a server on a thread, and
`run_server` (what `moeserve serve` does: build the engine, serve it, stop it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from moeserve.engine.build import EngineOptions, build_engine
from moeserve.engine.engine import Engine
from moeserve.errors import MoeServeError
from moeserve.serving.api import ServerConfig, create_app

log = logging.getLogger("moeserve.serving")


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


def _server(app: FastAPI, log_level: str = "warning", graceful_timeout_s: float | None = None) -> uvicorn.Server:
    class Server(uvicorn.Server):
        # uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would kill the process
        # with the signal's status; a drained server exits normally instead.
        def capture_signals(self):
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


def serve(engine: Engine, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", on_bound: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain accepted requests and stop the engine and its expert functions.

    on_bound(url) is called once the listening socket is bound (connections queue from then on)."""
    sock = bind(host, port)
    server = _server(create_app(engine, config), log_level)
    url = f"http://{host}:{sock.getsockname()[1]}"
    log.info("serving %s on %s", engine.model_name, url)
    if on_bound is not None:
        on_bound(url)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        engine.shutdown(drain=True)


def run_server(options: EngineOptions, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "warning", on_ready: Callable[[str, Engine], None] | None = None) -> None:
    """`moeserve serve`: build the engine the options describe and serve it until a signal.
    on_ready(url, engine): once the socket is bound."""
    engine = build_engine(options)
    serve(engine, config, host, port, log_level,
          on_bound=None if on_ready is None else (lambda url: on_ready(url, engine)))


class BackgroundServer:
    """A server on a thread (tests, `moeserve bench --model`): `with BackgroundServer(engine) as s: s.url`."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 owns_engine: bool = False):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = _server(create_app(engine, config, owns_engine=owns_engine))
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
