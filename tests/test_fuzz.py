"""Fuzzing: the HTTP API from its own OpenAPI schema (schemathesis) and every CLI command (hypothesis).

Asserted for every generated case: no 5xx, no traceback; for the CLI also exit code 0 or 2, one line on
stderr when it is 2, and nothing left behind in the output directory when a command fails.
`MOESERVE_FUZZ_EXAMPLES` raises the number of cases (the suite runs a few dozen per target).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from cli_run import run_cli
from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.serving.api import ServerConfig
from moeserve.serving.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = int(os.environ.get("MOESERVE_FUZZ_EXAMPLES", "25"))
KEY = "fuzz-key"
TRIED: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def cases_tried(tmp_path_factory):
    """Leaves the count of generated cases per target beside the run (for the record, not a check)."""
    yield
    (tmp_path_factory.getbasetemp() / "fuzz-cases.json").write_text(json.dumps(dict(TRIED), indent=2))
    print("fuzz cases tried:", json.dumps(dict(TRIED)))


@pytest.fixture(scope="module")
def api(loaded):
    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_queue=16, max_model_len=48), model_name="tiny")
    with BackgroundServer(engine, ServerConfig(api_key=KEY, max_body_bytes=256 << 10, request_timeout_s=30)) as server:
        spec = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        yield server.url, schemathesis.openapi.from_dict(spec)
    engine.shutdown()


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_api_never_answers_5xx(api, mode):
    url, schema = api
    operations = _operations(schema)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for op in operations:
        try:
            _fuzz_operation(url, op, mode)()
        except Unsatisfiable:  # a route without inputs has no invalid variant (GET /health)
            assert mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET"


def _fuzz_operation(url, op, mode):
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case):
        TRIED[f"{op.method.upper()} {op.path} ({mode.value})"] += 1
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert response.status_code < 500, (case.body, response.text[:300])
        assert "Traceback" not in response.text

    return fuzz


# ---------------------------------------------------------------------------------------------------- CLI
NUMBERS = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["nan", "-inf", "inf", "0", "-0", "1e400", "", "abc", "0x10", "1_000"]))
WORDS = st.one_of(st.text(max_size=12), st.sampled_from(["demo", ".", "..", "/", "/proc/none/x", "-", "--"]))


def _command_cases(model, trace):
    """command -> (fixed leading arguments, {option: value strategy}). Every case is cheap when valid."""
    return {
        "inspect": ([], {"": st.sampled_from([str(model), "demo", "/nowhere", str(trace)])}),
        "trace stats": ([], {"": st.sampled_from([str(trace), "/nowhere", str(model)])}),
        "plan": ([str(trace)], {"--slo-ttft": NUMBERS, "--slo-tpot": NUMBERS, "--confidence": NUMBERS,
                                "--keep-alive": NUMBERS, "--network-rtt": NUMBERS, "--strategy": WORDS,
                                "--gpus": NUMBERS, "--window": NUMBERS, "--replica-budget": NUMBERS,
                                "--hardware": WORDS, "--pricing": WORDS, "--model": WORDS}),
        "profile": ([str(model), "--max-prompts", "2", "--gen-tokens", "1"],
                    {"--prompts": st.sampled_from(["builtin:mixed", "builtin:none", "x.csv", "/nowhere.jsonl"]),
                     "--batch-size": NUMBERS, "--max-prompt-tokens": NUMBERS, "--device": WORDS, "--seed": NUMBERS}),
        "finetune-router": ([str(model), "--steps", "1", "--max-prompts", "4", "--seq-len", "8", "--batch-size", "1"],
                            {"--lr": NUMBERS, "--reuse-weight": NUMBERS, "--kl-weight": NUMBERS,
                             "--eval-fraction": NUMBERS, "--window": NUMBERS, "--prompts": WORDS}),
        "serve": ([str(model), "--port", "-1"], {"--max-batch": NUMBERS, "--request-timeout": NUMBERS,
                                                 "--max-body-bytes": NUMBERS, "--host": WORDS}),
        "bench": (["--url", "http://127.0.0.1:9"], {"--rate": NUMBERS, "--duration": NUMBERS,
                                                    "--workload": WORDS, "--max-tokens": NUMBERS}),
        "trace import": ([str(trace)], {"--num-experts": NUMBERS, "--model": WORDS}),
        "trace synth": (["--model", str(model), "--like", str(trace)],
                        {"--requests": st.sampled_from(["0", "-1", "3", "abc", "1e400", "nan", "100001"]),
                         "--seed": NUMBERS, "--model": WORDS}),
    }


@pytest.fixture(scope="module")
def cli_inputs(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    trace = root / "t.trace"
    r = run_cli("profile", tiny_model_dirs["qwen3_moe"], "--prompts", "builtin:mixed", "--max-prompts", "10",
                "--gen-tokens", "3", "--batch-size", "5", "--out", trace)
    assert r.code == 0, r.err
    return tiny_model_dirs["qwen3_moe"], trace, root


@pytest.mark.parametrize("command", ["inspect", "trace stats", "plan", "profile", "finetune-router", "serve", "bench",
                                     "trace import", "trace synth"])
def test_cli_exits_0_or_2_with_one_line_and_leaves_nothing(cli_inputs, command):
    model, trace, root = cli_inputs
    fixed, options = _command_cases(model, trace)[command]
    out_flag = {"plan": "--out", "profile": "--out", "finetune-router": "--out", "trace import": "--out",
                "trace synth": "--out"}.get(command)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        TRIED[f"moeserve {command}"] += 1
        args = list(fixed)
        if "" in options:  # the positional argument
            args.append(data.draw(options[""]))
        flags = sorted(k for k in options if k)
        for flag in data.draw(st.lists(st.sampled_from(flags), unique=True, max_size=3)) if flags else []:
            args += [flag, data.draw(options[flag])]
        out_dir = root / "out"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        if out_flag:
            args += [out_flag, str(out_dir / ("ft" if command == "finetune-router" else "o.bin"))]
        r = run_cli(*command.split(), *args)
        assert r.code in (0, 2), (args, r.code, r.err)
        assert "Traceback" not in r.err and "internal error" not in r.err, (args, r.err)
        if r.code == 2:
            assert len(r.err.strip().splitlines()) == 1, (args, r.err)
            assert list(out_dir.iterdir()) == [], (args, list(out_dir.iterdir()))

    fuzz()
