"""`moeserve serve`: an OpenAI-compatible server for a MoE model, executing a plan's expert placement."""

from __future__ import annotations

import ipaddress
import logging
import sys

import typer

from moeserve.cli.app import app
from moeserve.cli.common import console


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
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Most requests decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", min=0,
                                  help="Most requests waiting for a batch slot; beyond it: HTTP 429."),
    max_tokens: int = typer.Option(16, "--default-max-tokens", min=1, help="max_tokens when a request omits it."),
    pricing: str = typer.Option(None, "--pricing",
                                help="Pricing profiles for the cost metric, comma-separated "
                                     "(one CPU and one GPU offering, e.g. aws-lambda-x86,paper-gpu-3x)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    sps_trace: str = typer.Option(None, "--sps-trace", help="A trace of this model: at each request's arrival "
                                  "SPS predicts its experts and their functions are pre-warmed (Remoe)."),
    replica_scaling: bool = typer.Option(False, "--replica-scaling", help="MoEless: add replicas of straggler "
                                         "remote experts while serving and retire them when load falls."),
    scaling_window: float = typer.Option(10.0, "--scaling-window", min=0.1, help="Seconds of routing per decision."),
    json_out: bool = typer.Option(False, "--json", help="When ready, print one JSON line on stdout: url, model, "
                                  "plan, expert functions (for scripts; with --port 0 it gives the port)."),
) -> None:
    """Serve a MoE model over an OpenAI-compatible HTTP API with continuous batching.

    Routes: /v1/completions, /v1/chat/completions (stream or not), /v1/models, /health, /metrics.
    SIGINT or SIGTERM drains the requests already accepted, stops the expert functions, and exits.

    Example: moeserve serve demo --port 8000, then
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "def add(a, b):", "max_tokens": 20}'
    """
    import torch

    from moeserve.serving.api import serve
    from moeserve.serving.engine import Engine

    setup_logging(log_level)
    if threads:
        torch.set_num_threads(threads)
    if not is_loopback(host) and not api_key:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it")
    if plan is None and not all_local:
        import tempfile
        from pathlib import Path

        from moeserve.serving.spot_plan import plan_on_the_spot

        made = plan_on_the_spot(model, Path(tempfile.mkdtemp(prefix="moeserve-spot-")))
        if made is None:
            logging.getLogger("moeserve").info(
                "no hardware profile matches this model: all experts local (make a plan with `moeserve profile "
                "MODEL --hardware` and `moeserve plan`)")
        plan = str(made) if made else None
    engine = Engine.from_model_dir(model, plan=plan, device=device, pricing=pricing, max_batch=max_batch,
                                   max_queue=max_queue)
    if sps_trace:
        from moeserve.serving.prewarm import prewarmer_from_trace

        engine.on_arrival = prewarmer_from_trace(sps_trace, model, engine)

    scaler = None
    if replica_scaling and engine.pool is not None and engine.dispatch is not None:
        from moeserve.serving.replica_scaling import ReplicaScaler

        scaler = ReplicaScaler(engine.dispatch, engine.pool, window_s=scaling_window).start()
        engine.add_routing_listener(scaler.observe)

    def announce(url: str) -> None:
        if json_out:
            from moeserve.cli.common import emit_json_line

            emit_json_line({"url": url, "model": model, "plan": plan, "functions": len(engine.pool.placement.functions)
                            if getattr(engine, "pool", None) is not None else 0})

    try:
        serve(engine, host=host, port=port, api_key=api_key, default_max_tokens=max_tokens,
              log_level="warning" if log_level.lower() != "debug" else "info", on_bound=announce)
    finally:
        if scaler is not None:
            scaler.stop()
