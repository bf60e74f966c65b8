"""The OpenAI-compatible HTTP API, over a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.serving.api import ServerConfig
from moeserve.serving.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_queue=32), model_name="tiny", model_path="/nowhere")
    with BackgroundServer(engine, ServerConfig(api_key=KEY)) as server:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
            yield client, engine, model, tok
    engine.shutdown()


def _sse(response: httpx.Response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_completion_equals_generate(served, reference):
    client, engine, model, tok = served
    text = "what is the capital of france?"
    ids = reference(model, tok(text)["input_ids"], 20)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 20, "temperature": 0,
                                             "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["token_ids"] == ids and choice["text"] == tok.decode(ids, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(tok(text)["input_ids"]), "completion_tokens": len(ids),
                             "total_tokens": len(tok(text)["input_ids"]) + len(ids)}
    # a prompt given as token ids
    r = client.post("/v1/completions", json={"prompt": [9, 8, 7], "max_tokens": 6, "temperature": 0,
                                             "return_token_ids": True})
    assert r.json()["choices"][0]["token_ids"] == reference(model, [9, 8, 7], 6)


def test_chat_completion_equals_generate_on_the_chat_prompt(served, reference):
    client, engine, model, tok = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "solve 12 plus 30"}]
    ids = reference(model, engine.encode_chat(messages), 12)
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 12,
                                                  "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}
    assert choice["token_ids"] == ids


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_add_up_to_the_full_text(served, chat):
    client, *_ = served
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": 25, "temperature": 0, "stop": ["zz"], "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": "the lazy dog"}]} if chat else {"prompt": "the lazy dog"})}
    whole = client.post(path, json=body).json()
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(r)
    pieces = [c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
              for c in chunks if c["choices"]]
    full = whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]
    assert "".join(pieces) == full and len([p for p in pieces if p]) > 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_eight_concurrent_clients_each_get_their_own_answer(served, reference):
    client, engine, model, tok = served
    prompts = [[5 + i, 40 + 3 * i, 7, 90 - i][: 1 + i % 4] for i in range(8)]
    expected = [reference(model, p, 10 + 2 * i) for i, p in enumerate(prompts)]

    def ask(i):
        with httpx.Client(base_url=str(client.base_url), headers=AUTH, timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 10 + 2 * i, "temperature": 0,
                                                "return_token_ids": True, "stream": i % 2 == 1})
            if i % 2:
                return [t for chunk in _sse(r) for t in chunk["choices"][0].get("token_ids", [])]
            return r.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == expected


def test_routed_experts_per_generated_token(served):
    client, engine, *_ = served
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True, "return_routed_experts": True})
    body = r.json()
    routed = body["choices"][0]["routed_experts"]
    layers = engine.layers
    assert body["moe_layers"] == [la.index for la in layers]
    assert len(routed) == 5 and all(len(tok) == len(layers) for tok in routed)
    for tok in routed:
        for layer_ids in tok:
            assert len(layer_ids) == layers[0].top_k == len(set(layer_ids))
            assert all(0 <= e < layers[0].num_experts for e in layer_ids)


def test_api_key_on_every_route_but_health(served):
    client, *_ = served
    base = str(client.base_url)
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, f"{base}{path}", headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128


@pytest.mark.parametrize("body, status, needle", [
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 1}, 400, "at most 64"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "", "max_tokens": 2}, 400, "empty"),
    ({"prompt": [1, 2, 99999]}, 400, "token ids"),
    ({"prompt": "x", "max_tokens": 500}, 400, "context length"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "not found"),
    ({"prompt": ["a", ""]}, 400, "empty"),
])
def test_bad_requests_get_clear_4xx(served, body, status, needle):
    client, *_ = served
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_invalid_json_and_bad_chat(served):
    client, *_ = served
    r = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = client.get("/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert client.get("/v1/completions").status_code == 405


def test_metrics_count_what_was_served(served):
    client, engine, *_ = served
    before = client.get("/metrics").text
    r = client.post("/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 7, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200
    after = client.get("/metrics").text

    def value(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    assert value(after, "moeserve_generation_tokens_total") - value(before, "moeserve_generation_tokens_total") == 7
    assert value(after, "moeserve_prompt_tokens_total") - value(before, "moeserve_prompt_tokens_total") == 3
    assert value(after, "moeserve_time_to_first_token_seconds_count") - value(
        before, "moeserve_time_to_first_token_seconds_count") == 1
    assert value(after, 'moeserve_requests_total{endpoint="/v1/completions",status="200"}') - value(
        before, 'moeserve_requests_total{endpoint="/v1/completions",status="200"}') == 1
    top_k, layers = engine.layers[0].top_k, len(engine.layers)
    routed = value(after, "moeserve_routed_tokens_total") - value(before, "moeserve_routed_tokens_total")
    assert routed == (3 + 6) * top_k * layers  # 3 prompt tokens + 6 fed-back tokens, every MoE layer
    assert "moeserve_queue_depth 0.0" in after and "moeserve_resident_memory_bytes{process=\"main\"}" in after


def test_full_queue_answers_429_with_retry_after(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=1, max_queue=1), model_name="tiny")
    gate, step = threading.Event(), engine.step

    def gated_step():
        gate.wait(timeout=30)
        step()

    engine.step = gated_step  # nothing leaves the queue until the gate opens
    with BackgroundServer(engine, owns_engine=True) as server, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{server.url}/v1/completions",
                            json={"prompt": [5, 6], "max_tokens": 3, "temperature": 0}, timeout=60)
        while engine.scheduler.pending()[0] == 0:  # the first request is queued
            threading.Event().wait(0.01)
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 7], "max_tokens": 3}, timeout=60)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        assert first.result().status_code == 200
    assert engine.closing  # the app owned the engine: its shutdown drained and stopped it
