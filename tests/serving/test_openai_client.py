"""The API as a vLLM user meets it: through the `openai` Python client itself, pointed at a real server."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.engine.sampling import SamplingParams, apply_penalties
from moeserve.serving.api import ServerConfig
from moeserve.serving.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_queue=32), served_names=("tiny", "alias"))
    with BackgroundServer(engine, ServerConfig(api_key="k")) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="k", max_retries=0, timeout=120)
        yield client, s.url, engine, model, tok
    engine.shutdown()


def test_completion_and_chat_equal_generate(server, reference):
    client, _, engine, model, tok = server
    text = "what is the capital of france?"
    want = reference(model, tok(text)["input_ids"], 12)
    r = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(tok(text)["input_ids"])
    messages = [{"role": "user", "content": "solve 12 plus 30"}]
    want = reference(model, engine.encode_chat(messages), 8)
    r = client.chat.completions.create(model="alias", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert {m.id for m in client.models.list().data} == {"tiny", "alias"}


def test_streaming_adds_up(server):
    client, *_ = server
    whole = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=10, temperature=0)
    parts = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the quick brown fox", max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].text
    chat = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)
        if c.choices]
    assert "".join(chat) == client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0).choices[0].message.content


def test_logprobs_are_the_models_own(server):
    client, _, engine, model, tok = server
    text = "def add(a, b):"
    ids = tok(text)["input_ids"]
    r = client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0]
    got = choice.model_extra["token_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(got):
        assert choice.logprobs.token_logprobs[i] == pytest.approx(float(logp[i, token]), abs=1e-4)
        top = torch.topk(logp[i], 3)
        assert list(choice.logprobs.top_logprobs[i].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert choice.logprobs.tokens[i] == tok.decode([token])  # greedy: the chosen token is the top one
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)  # greedy


def test_n_choices_and_prompt_lists(server):
    client, *_ = server
    r = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=8, temperature=1.0, n=2, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    alone = [client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=8, temperature=1.0, seed=s)
             .choices[0].text for s in (7, 8)]
    assert [c.text for c in r.choices] == alone  # choice j is the request seeded seed + j
    r = client.completions.create(model="tiny", prompt=["abc", "solve 12"], max_tokens=4, temperature=0, n=2)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    streamed = {}
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                                max_tokens=5, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert sorted(streamed) == [0, 1] and streamed[0] == streamed[1]


def test_unsupported_fields_are_refused_not_ignored(server):
    client, *_ = server
    for extra in ({"response_format": {"type": "json_object"}},
                  {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **extra)


def test_penalties_follow_their_definitions(server):
    client, *_ = server
    plain = client.completions.create(model="tiny", prompt="a a a a", max_tokens=12, temperature=0)
    penalised = client.completions.create(model="tiny", prompt="a a a a", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].text != plain.choices[0].text
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = apply_penalties(logits, [p], prompts=[[0]], outputs=[[3, 3, 2]])
    # token 3: generated twice -> -0.5 - 0.5 = -1, then seen -> positive / 2; token 2: once -> -0.75, then /2
    # (0.5 - 0.75 = -0.25 is negative: x 2); token 0: only in the prompt -> 2 / 2; token 1 untouched
    assert out.tolist() == [[1.0, -1.0, -0.5, 1.0]]


def test_tokenize_detokenize_version(server):
    _, url, engine, model, tok = server
    headers = {"Authorization": "Bearer k"}
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}, headers=headers).json()
    assert r["tokens"] == tok("hello world")["input_ids"] and r["count"] == len(r["tokens"])
    back = httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}, headers=headers).json()
    assert back["prompt"] == tok.decode(r["tokens"], skip_special_tokens=True)
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}, headers=headers).json()
    assert chat["tokens"] == engine.encode_chat([{"role": "user", "content": "x"}])
    assert httpx.get(f"{url}/version", headers=headers).json()["version"]
