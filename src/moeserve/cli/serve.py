"""`moeserve serve`: an OpenAI-compatible server for a MoE model, executing a plan's expert placement."""

from __future__ import annotations

import ipaddress
import logging
import sys

import typer

from moeserve import defaults
from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json_line
from moeserve.cli.validate import NON_NEGATIVE, POSITIVE, choice, number
from moeserve.errors import MoeServeError


def setup_logging(level: str) -> None:
    """Engine logs ("moeserve.*") as plain lines on stderr."""
    logger = logging.getLogger("moeserve")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s moeserve %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve_cmd(
    model: str = typer.Argument("demo", help="A local Hugging Face MoE model directory, or 'demo'."),
    plan: str = typer.Option(None, "--plan", help="A plan (plan.yaml) whose expert placement to execute "
                             "(default: a Remoe plan made on the spot when a hardware profile matches the model)."),
    all_local: bool = typer.Option(False, "--all-local", help="No plan: every expert in the main process."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free port, printed at start)."),
    api_key: str = typer.Option(None, "--api-key", envvar="MOESERVE_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on every route but /health."),
    device: str = typer.Option("auto", "--device", help="auto (the plan's main.device; "
                                "cuda when available), cpu or cuda."),
    max_batch: int = typer.Option(defaults.MAX_BATCH, "--max-batch", min=1, help="Most requests decoded together."),
    max_queue: int = typer.Option(defaults.MAX_QUEUE, "--max-queue", min=0,
                                  help="Most requests waiting for a batch slot; beyond it: HTTP 429."),
    max_tokens: int = typer.Option(defaults.DEFAULT_MAX_TOKENS, "--default-max-tokens", min=1, help="max_tokens when a request omits it."),
    pricing: str = typer.Option(None, "--pricing",
                                help="Pricing profiles for the cost metric, comma-separated "
                                     "(one CPU and one GPU offering, e.g. aws-lambda-x86,paper-gpu-3x)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    sps_trace: str = typer.Option(None, "--sps-trace", help="A trace of this model: at each request's arrival "
                                  "SPS predicts its experts and their functions are pre-warmed (Remoe)."),
    replica_scaling: bool = typer.Option(False, "--replica-scaling", help="MoEless: add replicas of straggler "
                                         "remote experts while serving and retire them when load falls."),
    scaling_window: float = typer.Option(10.0, "--scaling-window", parser=number(low=0.1), help="Seconds of routing per decision."),
    max_model_len: int = typer.Option(None, "--max-model-len", min=2, help="Most tokens per request, prompt and "
                                      "output together (default: the model's context length)."),
    max_body_bytes: int = typer.Option(defaults.MAX_BODY_BYTES, "--max-body-bytes", min=1024,
                                       help="Largest request body accepted; beyond it: HTTP 413."),
    request_timeout: float = typer.Option(defaults.REQUEST_TIMEOUT_S, "--request-timeout", parser=NON_NEGATIVE,
                                          help="Seconds a request may take from arrival to its last token "
                                               "before it is cancelled (HTTP 504; 0: no limit)."),
    served_model_name: list[str] = typer.Option(None, "--served-model-name", help="A name clients may use in "
                                                "`model` (repeat for aliases; default: the model directory's name)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's; float32 for half precision on the "
                              "CPU), float32, bfloat16 or float16."),
    chat_template: str = typer.Option(None, "--chat-template", help="A Jinja chat template, or a file holding "
                                      "one (default: the tokenizer's)."),
    expert_cache: int = typer.Option(None, "--expert-cache", min=1, help="Keep at most C experts per MoE layer in "
                                     "memory; a miss reads the expert from the checkpoint (page cache bypassed). "
                                     "Every expert local, no plan. See docs/expert-cache.md."),
    cache_policy: str = typer.Option(defaults.EXPERT_CACHE_POLICY, "--cache-policy", parser=choice(*defaults.EXPERT_CACHE_POLICIES),
                                     help="With --expert-cache: which resident to evict (lru or lfu)."),
    prefetch: str = typer.Option(defaults.EXPERT_CACHE_PREFETCH, "--prefetch", parser=choice(*defaults.EXPERT_CACHE_PREFETCHES), help="With --expert-cache: "
                                 "'router' reads the next layer's likely experts (its router on this layer's input) "
                                 "on a background thread."),
    backend: str = typer.Option("process", "--backend", parser=choice("process", "ray"),
                                help="Where expert functions run: process (OS processes on this machine) or ray "
                                     "(Ray Serve deployments; needs moeserve[ray]; docs/scale-out.md)."),
    ray_address: str = typer.Option(None, "--ray-address", help="With --backend ray: the Ray cluster to join "
                                    "(e.g. ray://head:10001 or auto; default: start a local Ray and stop it on exit)."),
    ray_max_replicas: int = typer.Option(defaults.RAY_MAX_REPLICAS, "--ray-max-replicas", min=1, help="With --backend "
                                         "ray: most replicas Serve's autoscaler gives one expert function."),
    ray_target: float = typer.Option(defaults.RAY_TARGET_ONGOING_REQUESTS, "--ray-target", parser=POSITIVE,
                                     help="With --backend ray: call-seconds per second per replica the autoscaler "
                                          "aims at (1: a replica always busy with one call; lower scales out sooner)."),
    json_out: bool = typer.Option(False, "--json", help="When ready, print one JSON line on stdout: url, model, "
                                  "plan, expert functions (for scripts; with --port 0 it gives the port)."),
) -> None:
    """Serve a MoE model over an OpenAI-compatible HTTP API with continuous batching.

    Routes: /v1/completions, /v1/chat/completions (stream or not), /v1/models, /tokenize, /detokenize,
    /version, /health, /metrics.
    SIGINT or SIGTERM drains the requests already accepted, stops the expert functions, and exits.

    Example: moeserve serve demo --port 8000 (or --expert-cache 8: 8 of 32 experts per layer in memory; or
    --plan demo-plan.yaml --backend ray), then
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "def add(a, b):", "max_tokens": 20}'
    """
    import torch

    from moeserve.engine.build import EngineOptions
    from moeserve.engine.config import EngineConfig
    from moeserve.experts.expert_cache import ExpertCacheOptions
    from moeserve.serving.api import ServerConfig
    from moeserve.serving.server import run_server

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise MoeServeError(f"unknown --log-level {log_level!r}: use debug, info, warning or error")
    setup_logging(log_level)
    if threads:
        torch.set_num_threads(threads)
    if not is_loopback(host) and not api_key:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it")
    options = EngineOptions(model, plan, all_local, device, EngineConfig(max_batch, max_queue, max_model_len=max_model_len),
                            tuple(p for p in (pricing or "").split(",") if p), sps_trace, replica_scaling, scaling_window,
                            tuple(served_model_name or ()), dtype, chat_template, backend=backend, ray_address=ray_address,
                            ray_max_replicas=ray_max_replicas, ray_target=ray_target,
                            expert_cache=ExpertCacheOptions(expert_cache, cache_policy, prefetch) if expert_cache else None)
    config = ServerConfig(api_key, max_tokens, max_body_bytes, request_timeout)

    def ready(url: str, engine) -> None:
        if json_out:
            emit_json_line({"url": url, "model": model, "plan": plan, "backend": backend,
                            "functions": len(engine.placement.functions) if engine.placement else 0})

    run_server(options, config, host, port, "info" if log_level.lower() == "debug" else "warning", ready)
