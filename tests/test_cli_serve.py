"""`moeserve serve` (a real process: SIGTERM drains) and `moeserve bench`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import moeserve.cli.bench  # noqa: F401  (registers the commands until the app's _register lists them)
import moeserve.cli.serve  # noqa: F401
from cli_run import run_cli

ENTRY = "import moeserve.cli.serve; from moeserve.cli.app import main; main()"


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_sigterm_drains_accepted_requests(tiny_model_dirs):
    from moeserve.models.loading import load_model

    model_dir = tiny_model_dirs["qwen3_moe"]
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "serve", str(model_dir), "--port", "0", "--max-batch", "1", "--threads", "1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
        else:
            pytest.fail("server did not start:\n" + "".join(lines))
        tail = []
        reader = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)
        reader.start()

        prompts = [[5 + i, 9, 30 + i] for i in range(5)]
        body = dict(max_tokens=100, temperature=0, ignore_eos=True, return_token_ids=True)
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": p, **body}, timeout=120)
                       for p in prompts]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait until the server holds all five requests
                m = httpx.get(f"{url}/metrics", timeout=10).text
                accepted = sum(_metric(m, n) for n in ("moeserve_queue_depth", "moeserve_running_requests",
                                                        "moeserve_finished_requests_total"))
                if accepted == 5:
                    break
                time.sleep(0.005)
            waiting_at_sigterm = _metric(m, "moeserve_queue_depth")
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert waiting_at_sigterm >= 1  # some requests had not even started when the signal came
    assert [r.status_code for r in responses] == [200] * 5
    model = load_model(model_dir)
    model.generation_config.eos_token_id = None  # ignore_eos: an EOS is generated and fed back like any token
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        refs = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=100, pad_token_id=0)[0, 3:].tolist()
                for p in prompts]
    torch.set_num_threads(threads)
    for ref, r in zip(refs, responses, strict=True):
        assert r.json()["choices"][0]["token_ids"] == ref
    log = "".join(tail)
    assert "draining" in log and "engine stopped" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_serve_bad_input_exits_2(tmp_path, tiny_model_dirs):
    r = run_cli("serve", str(tmp_path / "missing"))
    assert r.code == 2 and "model directory not found" in r.err
    r = run_cli("serve", str(tiny_model_dirs["dense"]), "--port", "0")
    assert r.code == 2 and "dense model" in r.err
    r = run_cli("serve", str(tiny_model_dirs["qwen3_moe"]), "--device", "tpu")
    assert r.code == 2 and "unknown device" in r.err
    r = run_cli("serve", str(tiny_model_dirs["qwen3_moe"]), "--backend", "k8s")
    assert r.code == 2 and "--backend" in r.err and "process, ray" in r.err
    r = run_cli("serve", str(tiny_model_dirs["qwen3_moe"]), "--ray-address", "auto")
    assert r.code == 2 and "--ray-address needs --backend ray" in r.err
    r = run_cli("serve", str(tiny_model_dirs["qwen3_moe"]), "--backend", "ray", "--ray-target", "nan")
    assert r.code == 2 and "--ray-target" in r.err and len(r.err.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = run_cli("serve", str(tiny_model_dirs["qwen3_moe"]), "--port", str(busy.getsockname()[1]))
    assert r.code == 2 and "cannot listen" in r.err


def test_bench_only_targets_this_machine():
    r = run_cli("bench", "--url", "http://example.com:8000")
    assert r.code == 2 and "only targets this machine" in r.err
    r = run_cli("bench", "--url", "http://127.0.0.1:9", "--model", "demo")
    assert r.code == 2 and "not both" in r.err
    r = run_cli("bench", "--workload", "bursty")
    assert r.code == 2 and "unknown workload" in r.err


def test_bench_replays_and_runs_the_hf_baseline(tmp_path, tiny_model_dirs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\nwhat is the capital of france?\nsolve 12 plus 30\ndef add(a, b):\n")
    plot = tmp_path / "bench.png"
    r = run_cli("bench", "--model", str(tiny_model_dirs["qwen3_moe"]), "--workload", "poisson", "--rate", "4",
                "--duration", "2", "--max-tokens", "6", "--prompts", str(prompts), "--baseline", "hf",
                "--device", "cpu", "--threads", "1", "--plot", str(plot), "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    server, baseline = out["results"]
    assert server["requests"] >= 2 and server["completed"] == server["requests"] and server["errors"] == 0
    assert baseline["name"] == "transformers generate (FIFO)" and baseline["completed"] >= 1
    for s in (server, baseline):
        assert s["ttft_s"]["p50"] > 0 and s["ttft_s"]["p50"] <= s["ttft_s"]["p90"] <= s["ttft_s"]["p99"]
        assert s["output_tokens_per_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_calibrates_and_cuts_what_runs_past_its_duration(loaded):
    """The automatic rate is what the server sustained in a closed loop (x LOAD_FRACTION), and requests still
    running GRACE_S after the last arrival are cut instead of holding the run for minutes."""
    import asyncio

    from moeserve.engine.config import EngineConfig
    from moeserve.engine.engine import Engine
    from moeserve.serving import bench
    from moeserve.serving.api import ServerConfig
    from moeserve.serving.server import BackgroundServer

    model, tok = loaded("qwen3_moe")
    engine = Engine(model, tok, EngineConfig(max_batch=2))
    with BackgroundServer(engine, ServerConfig()) as server:
        sample = [bench.BenchRequest(0.0, "the quick brown fox", 8)] * 64
        rate, sustained = bench.calibrate_rate(server.url, sample, 2)
        assert rate == pytest.approx(bench.LOAD_FRACTION * sustained) and sustained > 0
        original = engine.step

        def slow_step():
            time.sleep(0.5)
            original()

        engine.step = slow_step  # every request now takes > 10 s
        try:
            long = [bench.BenchRequest(0.1 * i, "the quick brown fox", 60) for i in range(3)]
            results, wall = asyncio.run(bench.replay(server.url, long, duration_s=1.0, grace_s=2.0))
        finally:
            engine.step = original
    engine.shutdown(drain=False)
    assert wall < 1.0 + 2.0 + 5.0  # the deadline, not the requests' 30 s of work
    assert [r.error for r in results] == ["unfinished at the deadline"] * 3
    summary = bench.summarize("t", results, wall)
    assert (summary.errors, summary.cut, summary.rejected) == (3, 3, 0)


def test_fifo_replay_adds_the_wait_of_a_one_at_a_time_server():
    from moeserve.serving.bench import RequestResult, fifo_replay

    # service: (ttft, e2e) per request; arrivals at 0, 1, 1.5, 10
    service = [RequestResult(0.0, True, 200, 5, 10, ttft, 0.1, e2e) for ttft, e2e in
               ((0.2, 2.0), (0.1, 1.0), (0.3, 0.5), (0.2, 1.0))]
    results, wall = fifo_replay([0.0, 1.0, 1.5, 10.0], service)
    # starts: 0, 2 (waits 1), 3 (waits 1.5), 10 (idle server, no wait)
    assert [round(r.ttft_s, 6) for r in results] == [0.2, 1.1, 1.8, 0.2]
    assert [round(r.e2e_s, 6) for r in results] == [2.0, 2.0, 2.0, 1.0]
    assert wall == 11.0


def test_serve_json_announces_the_bound_url(tiny_model_dirs):
    """--json prints one line when ready; with --port 0 it is how a script learns the port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "serve", str(tiny_model_dirs["qwen3_moe"]), "--port", "0", "--json",
         "--all-local", "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        announced = json.loads(proc.stdout.readline())
        assert announced["url"].startswith("http://127.0.0.1:") and announced["functions"] == 0
        assert httpx.get(announced["url"] + "/health", timeout=30).json() == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
