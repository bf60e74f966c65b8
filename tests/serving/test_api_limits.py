"""What one request may cost the server: body size, prompt length, time, a client that leaves."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.serving.api import ServerConfig
from moeserve.serving.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_thread")
ENTRY = "import moeserve.cli.serve; from moeserve.cli.app import main; main()"


@pytest.fixture(scope="module")
def limited(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=2, max_queue=8, max_model_len=64), model_name="tiny")
    with BackgroundServer(engine, ServerConfig(api_key="k", max_body_bytes=64 << 10, request_timeout_s=3.0)) as server:
        yield server.url, engine
    engine.shutdown()


def _post(url, body, key="k", timeout=60):
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=timeout)


def test_body_over_the_limit_is_413_without_reading_it(limited):
    url, _ = limited
    r = _post(url, {"prompt": "a " * 100_000, "max_tokens": 1})
    assert r.status_code == 413  # starlette's own refusal (plain text) when Content-Length is over the limit

    def chunks():  # no Content-Length: refused once the bytes received pass the limit
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"a " * 1024
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"Authorization": "Bearer k",
                                                                       "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_a_prompt_too_long_for_the_context_is_400_before_tokenising(limited):
    url, engine = limited
    t0 = time.monotonic()
    r = _post(url, {"prompt": "word " * 12_000, "max_tokens": 1})  # 60 KB: under the body limit
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert r.elapsed.total_seconds() < 5 and time.monotonic() - t0 < 5
    r = _post(url, {"prompt": [5] * 60, "max_tokens": 10})
    assert r.status_code == 400 and "context length (64)" in r.json()["error"]["message"]


@pytest.mark.parametrize("seed", [10**30, -(10**30)])
def test_out_of_range_seed_is_400(limited, seed):
    url, _ = limited
    r = _post(url, {"prompt": "hi", "max_tokens": 1, "seed": seed})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_api_key_scheme_is_case_insensitive_and_an_empty_key_means_none(limited, loaded):
    url, _ = limited
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                       headers={"Authorization": f"{scheme} k"}, timeout=60)
        assert r.status_code == 200, (scheme, r.text)
    assert _post(url, {"prompt": "hi", "max_tokens": 1}, key="wrong").status_code == 401
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, model_name="tiny")
    with BackgroundServer(engine, ServerConfig(api_key="")) as server:
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                          timeout=60).status_code == 200
    engine.shutdown()


def test_slow_requests_time_out_and_free_their_slot(limited):
    url, engine = limited
    # the tiny model on one thread does 60 tokens well within 3 s: slow it down
    original = engine.step

    def slow_step():
        time.sleep(0.2)
        original()

    engine.step = slow_step
    try:
        r = _post(url, {"prompt": [5, 6], "max_tokens": 60, "ignore_eos": True})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                          json={"prompt": [5, 6], "max_tokens": 60, "ignore_eos": True, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "request_timeout"
    finally:
        engine.step = original
    deadline = time.monotonic() + 10
    while engine.scheduler.pending() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.pending() == (0, 0)


def test_a_non_streaming_client_that_leaves_is_cancelled(limited):
    url, engine = limited
    original = engine.step

    def slow_step():
        time.sleep(0.05)
        original()

    engine.step = slow_step
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json={"prompt": [5, 6], "max_tokens": 60, "ignore_eos": True},
                       headers={"Authorization": "Bearer k"}, timeout=0.5)
        deadline = time.monotonic() + 5
        while engine.scheduler.pending() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.pending() == (0, 0)  # long before its 60 tokens (3 s) would have been done
        cancelled = engine.metrics.finished.labels("cancelled")._value.get()
        assert cancelled >= 1
    finally:
        engine.step = original


def test_a_64_mb_body_is_refused_with_memory_flat_and_health_answering(tiny_model_dirs):
    """A real `moeserve serve` process. A client announces a 64 MB body and sends only its first MiB: the
    413 comes back without the rest ever being sent, the server's memory stays flat and /health answers
    meanwhile; then the whole 64 MB is sent and refused the same way."""
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "serve", str(tiny_model_dirs["qwen3_moe"]), "--all-local",
                             "--port", "0", "--json", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = json.loads(proc.stdout.readline())["url"]
        host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
        server = psutil.Process(proc.pid)
        rss_before = server.memory_info().rss
        size = 64 << 20
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {size}\r\n\r\n".encode() + b'{"prompt": "' + b"x" * (1 << 20))
            status_line = sock.makefile("rb").readline().decode()
            assert " 413 " in status_line, status_line  # answered with 63 MB still unsent
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        health, stop = [], threading.Event()

        def probe():
            while not stop.is_set():
                health.append(httpx.get(f"{url}/health", timeout=60).status_code)
                time.sleep(0.02)

        body = json.dumps({"prompt": "x" * size, "max_tokens": 1}).encode()
        watcher = threading.Thread(target=probe)
        watcher.start()
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=120)
        rss_after = server.memory_info().rss
        time.sleep(0.2)
        stop.set()
        watcher.join()
        assert r.status_code == 413
        assert rss_after - rss_before < 32 << 20  # the body never entered the server
        assert health and set(health) == {200}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
