"""build_engine: from a model directory and a plan to a running-ready Engine (what `moeserve serve` runs).

model + plan -> check the plan against the model (before the model loads) -> load the model ->
start the plan's expert functions on a backend -> install the dispatch (remote weights released) ->
Engine, with Remoe's SPS pre-warming and MoEless's replica scaling attached when asked for.
With no plan, a Remoe plan is made on the spot when a shipped hardware profile matches the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve import defaults
from moeserve.engine.config import EngineConfig
from moeserve.engine.engine import Engine
from moeserve.errors import MoeServeError
from moeserve.experts.dispatch import install_dispatch
from moeserve.experts.expert_cache import ExpertCacheOptions, ExpertCaches
from moeserve.experts.prewarm import prewarmer_from_trace
from moeserve.experts.process_backend import ProcessBackend
from moeserve.experts.ray_backend import RayBackend, require_ray
from moeserve.experts.ray_config import RaySettings
from moeserve.experts.replica_scaling import ReplicaScaler
from moeserve.models.adapter import require_moe_layers
from moeserve.models.geometry import inspect_model
from moeserve.models.loading import (
    checkpoint_fingerprint,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from moeserve.plan.placement import ExpertPlacement
from moeserve.plan.schema import Plan, check_plan_matches_model, load_plan
from moeserve.planner import plan_on_the_spot
from moeserve.pricing.profiles import load_pricing

log = logging.getLogger("moeserve.serving")


@dataclass(frozen=True)
class EngineOptions:
    """How to serve a model. plan: a plan file (None: plan on the spot, or all experts local with
    `all_local`); pricing: profile names or files for the cost metric (one CPU and one GPU offering);
    sps_trace: a trace of this model for Remoe's request-arrival pre-warming; replica_scaling: MoEless
    straggler replicas every `scaling_window_s`."""

    model: str = "demo"
    plan: str | None = None
    all_local: bool = False
    device: str = "auto"
    config: EngineConfig = EngineConfig()
    pricing: tuple[str, ...] = ()
    sps_trace: str | None = None
    replica_scaling: bool = False
    scaling_window_s: float = 10.0
    served_names: tuple[str, ...] = ()  # names clients may put in `model` (default: the directory's name)
    dtype: str = "auto"  # auto (the checkpoint's; float32 for half precision on the CPU), float32, bfloat16, float16
    chat_template: str | None = None  # a Jinja template, or the path of a file holding one
    expert_cache: ExpertCacheOptions | None = None  # at most C experts resident per MoE layer (every expert local)
    backend: str = "process"  # where expert functions run: "process" (this machine) or "ray" (Ray Serve)
    ray_address: str | None = None  # with backend "ray": a cluster to join (None: start a local Ray)
    ray_max_replicas: int = defaults.RAY_MAX_REPLICAS  # with backend "ray": Serve's max_replicas per function
    ray_target: float = defaults.RAY_TARGET_ONGOING_REQUESTS  # with backend "ray": busy call-seconds per second per replica


DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("process", "ray")


def read_chat_template(template: str) -> str:
    """A chat template given inline (it holds '{{' or '{%') or as the path of a file holding one."""
    if "{{" in template or "{%" in template:
        return template
    path = Path(template)
    if not path.is_file():
        raise MoeServeError(f"--chat-template {template}: no such file (give a Jinja template or its file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoeServeError(f"--chat-template {template} is not a text file") from None


def warn_absent_devices(plan: Plan, device: torch.device) -> None:
    """Say so when the plan assumed a device this machine does not give the main process."""
    if plan.main.device == "gpu" and device.type != "cuda":
        log.warning("the plan puts the non-expert modules on a GPU (main.device: gpu) but they will run on the "
                    "CPU here: its TTFT/TPOT predictions assumed the GPU (plan for this machine: `moeserve plan "
                    "... --gpu-hardware none`, or the default --gpu-hardware auto on it)")
    elif plan.main.device == "cpu" and device.type == "cuda":
        log.warning("the plan puts the non-expert modules on the CPU (main.device: cpu) but they will run on the "
                    "GPU here (--device cuda was asked for; --device auto follows the plan)")


def placement_for_model(plan: Plan, spec: str) -> ExpertPlacement:
    """The plan's placement, after checking the plan was made for this model (its geometry and, when
    recorded, its checkpoint fingerprint): a plan for another model is refused in one line."""
    check_plan_matches_model(plan, inspect_model(spec).to_dict(), checkpoint_fingerprint(spec), str(spec))
    return plan.expert_placement()


def _plan_for(options: EngineOptions) -> Plan | None:
    if options.plan is not None:
        return load_plan(options.plan)
    if options.all_local or options.expert_cache is not None:
        return None
    made = plan_on_the_spot(options.model)
    if made is None:
        log.info("no hardware profile matches this model: all experts local (make a plan with `moeserve "
                 "profile MODEL --hardware` and `moeserve plan`)")
    return made


def build_engine(options: EngineOptions) -> Engine:
    """Load, place, dispatch and wire up; the caller starts the engine (or serves it)."""
    path = resolve_model_path(options.model)
    device = resolve_device(options.device)
    if options.plan is not None and options.all_local:
        raise MoeServeError("give --plan or --all-local, not both")
    if options.expert_cache is not None and options.plan is not None:
        raise MoeServeError("--expert-cache serves every expert locally: give it without --plan")
    if options.expert_cache is not None:
        options.expert_cache.check(inspect_model(options.model).num_experts)  # before the model loads
    if options.backend not in BACKENDS or (options.ray_address and options.backend != "ray"):
        raise MoeServeError(f"--backend must be one of {', '.join(BACKENDS)} (--ray-address needs --backend ray)")
    if options.backend == "ray":
        require_ray()  # not installed: one line, before the model loads
    if options.dtype not in DTYPES:
        raise MoeServeError(f"unknown --dtype {options.dtype!r}: use {', '.join(DTYPES)}")
    if options.chat_template is not None:
        read_chat_template(options.chat_template)  # a missing file is refused before the model loads
    plan = _plan_for(options)
    if plan is not None and options.device == "auto" and plan.main.device == "cpu":
        device = torch.device("cpu")  # --device auto follows the plan: its main function runs on the CPU
    placement = placement_for_model(plan, options.model) if plan is not None else None  # before the model loads
    # the cost in /metrics: the profiles asked for, else the plan's, else the defaults
    prices = load_pricing(*(options.pricing or tuple((plan.inputs if plan else {}).get("pricing") or ())
                            or defaults.PRICING))
    if plan is not None:
        warn_absent_devices(plan, device)
    log.info("loading %s on %s", path, device)
    model = load_model(path, device=device, dtype=options.dtype)
    tokenizer = load_tokenizer(path)
    if options.chat_template is not None:
        tokenizer.chat_template = read_chat_template(options.chat_template)
    layers = require_moe_layers(model, str(options.model))
    placement = placement or ExpertPlacement.all_local([la.index for la in layers], layers[0].num_experts)
    remote = sum(len(placement.remote_experts(la.index)) for la in layers)
    backend = None
    if remote:
        log.info("plan: %d remote experts in %d functions", remote, len(placement.functions))
        if options.backend == "ray":
            # a Serve replica start takes 20-40 s here: the batch computes a cold function's pairs locally
            # meanwhile instead of waiting (docs/scale-out.md)
            settings = RaySettings(max_replicas=options.ray_max_replicas, target_ongoing_requests=options.ray_target)
            backend = RayBackend.from_model(model, str(path), placement, address=options.ray_address,
                                            settings=settings, wait_for_cold_start=False).start()
        else:
            backend = ProcessBackend.from_model(model, str(path), placement).start()
        log.info("expert functions started: %d", len(placement.functions))
    else:
        log.info("all experts local%s", " (plan)" if plan is not None else "")
    caches = ExpertCaches(layers, str(path), options.expert_cache) if options.expert_cache is not None else None
    dispatch = install_dispatch(model, placement, backend, release_remote_weights=backend is not None, caches=caches)
    name = "demo" if str(options.model) == "demo" else Path(path).name
    engine = Engine(model, tokenizer, options.config, model_name=name, model_path=str(path), dispatch=dispatch,
                    placement=placement, pricing=prices, served_names=options.served_names)
    if caches is not None:
        log.info("expert cache: %d of %d experts per layer resident, %s, prefetch %s, reads: %s",
                 caches.layers[layers[0].index].capacity, layers[0].num_experts, options.expert_cache.policy,
                 options.expert_cache.prefetch, caches.reader.mode)
        engine.add_shutdown_hook(caches.close)
    if backend is not None and options.sps_trace:
        engine.on_arrival = prewarmer_from_trace(options.sps_trace, options.model, [la.index for la in layers],
                                                 placement, backend)
    if backend is not None and options.replica_scaling:
        scaler = ReplicaScaler(dispatch, backend, window_s=options.scaling_window_s).start()
        engine.add_routing_listener(scaler.observe)
        engine.add_shutdown_hook(scaler.stop)
    return engine
