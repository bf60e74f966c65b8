"""A plan's expert functions as Ray Serve configuration: pure dictionaries, no Ray import.

Each `ExpertFunction` becomes one Serve application holding one deployment ("experts") whose replicas
load only that function's experts (`experts/ray_replica.py`). The plan's fields map onto Serve's:

| plan field | Serve |
| --- | --- |
| a function | an application `moeserve-<id>` of one deployment; a plan's replicas (several functions holding the same experts) stay separate applications, so the failure policy can retry on another one |
| keep_alive_s | `downscale_delay_s` and `downscale_to_zero_delay_s` (minus the look-back window, which Serve waits too) |
| scale to zero | `min_replicas: 0`; `initial_replicas: 1` (warm at start, as the process backend starts every function) |
| load | `max_replicas` (defaults.RAY_MAX_REPLICAS), `target_ongoing_requests` (defaults.RAY_TARGET_ONGOING_REQUESTS); a call of >= 2 x `split_min_tokens` tokens goes out in max(2, replicas) parts, so a function busy with big calls shows Serve more than one request per replica |
| vcpus, memory_mb | `ray_actor_options.num_cpus`, `.memory` (bytes), scaled by `resource_scale` to fit a small local Ray |
| MoEless device d (id `L<l>-d<d>`) | a custom resource `moeserve_device_<d>` the node offering device d declares |

Serve's default policy cannot see millisecond calls (it samples requests in flight a few times per
window): `policy` names moeserve's own (`ray_policy`), fed each replica's time-integrated concurrency and
call count.

Why the look-back matters (issue 12's "still one replica after 25 s idle"): Serve's default policy
averages ongoing requests over `look_back_period_s` (default 30 s), and a deployment only counts as idle
once that window holds no request; only then does `downscale_to_zero_delay_s` start. The window is
therefore set from the keep-alive (`look_back_s`), and the handle's metrics push interval is shortened
(`SERVE_ENV`; default 10 s) so that a short keep-alive is honoured.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.defaults import RAY_MAX_REPLICAS, RAY_SPLIT_MIN_TOKENS, RAY_TARGET_ONGOING_REQUESTS
from moeserve.experts.ray_policy import POLICY
from moeserve.plan.ids import device_of
from moeserve.plan.placement import ExpertFunction

APP_PREFIX = "moeserve-"
DEPLOYMENT = "experts"
IMPORT_PATH = "moeserve.experts.ray_replica:build_app"
DEVICE_RESOURCE = "moeserve_device_{}"
MIB = 1 << 20
# Serve's autoscaling metrics pushed every second (default 10 s: a keep-alive under ~15 s was not honoured);
# read by Serve at import, so set in the driver's environment and the replicas' runtime_env.
METRICS_PUSH_S = 1.0
SERVE_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": f"{METRICS_PUSH_S:g}",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": f"{METRICS_PUSH_S:g}",
}


@dataclass(frozen=True)
class RaySettings:
    """How plan functions become Serve deployments. resource_scale: multiplies every CPU and memory
    request (a local Ray smaller than the plan's fleet); default_vcpus: a function whose plan gives none."""

    max_replicas: int = RAY_MAX_REPLICAS
    target_ongoing_requests: float = RAY_TARGET_ONGOING_REQUESTS
    resource_scale: float = 1.0
    default_vcpus: float = 1.0
    num_threads: int = 1
    max_ongoing_requests: int = 8
    split_min_tokens: int = RAY_SPLIT_MIN_TOKENS  # 0: never split a call over replicas
    app_prefix: str = APP_PREFIX  # application names: prefix + function id (two engines on one cluster differ)


def app_name(function_id: str, prefix: str = APP_PREFIX) -> str:
    return prefix + function_id


def device_resource(function_id: str) -> str | None:
    """The node resource a MoEless device function needs (None: any node)."""
    device = device_of(function_id)
    return None if device is None else DEVICE_RESOURCE.format(device)


def look_back_s(keep_alive_s: float) -> float:
    """Serve's averaging window for a function kept `keep_alive_s` after its last call: half of it, within
    [2, 30] s (Serve waits this window plus the downscale delay before a replica goes)."""
    return min(30.0, max(2.0, keep_alive_s / 2))


def autoscaling_config(spec: ExpertFunction, settings: RaySettings) -> dict:
    """keep-alive -> downscale delays, scale to zero -> min_replicas 0 (see the module docstring)."""
    window = look_back_s(spec.keep_alive_s)
    delay = max(0.0, spec.keep_alive_s - window)
    return {
        "min_replicas": 0, "initial_replicas": 1, "max_replicas": settings.max_replicas,
        "target_ongoing_requests": settings.target_ongoing_requests,
        "look_back_period_s": window, "upscale_delay_s": 0.0,
        "downscale_delay_s": delay, "downscale_to_zero_delay_s": delay,
        "policy": {"policy_function": POLICY},
        # how often replicas push their (custom) metrics; Serve's default, 10 s, left a look-back of a few
        # seconds without data (the env var in SERVE_ENV covers the handles and ongoing requests only)
        "metrics_interval_s": METRICS_PUSH_S,
    }


def actor_options(spec: ExpertFunction, settings: RaySettings) -> dict:
    """vcpus and memory_mb -> num_cpus and memory; a MoEless device -> its node resource; Serve's env."""
    vcpus = spec.vcpus or settings.default_vcpus
    options: dict = {"num_cpus": round(vcpus * settings.resource_scale, 4),
                     "runtime_env": {"env_vars": dict(SERVE_ENV)}}
    if spec.memory_mb:
        options["memory"] = int(spec.memory_mb * MIB * settings.resource_scale)
    resource = device_resource(spec.id)
    if resource is not None:
        options["resources"] = {resource: 0.001}
    return options


def deployment_config(spec: ExpertFunction, settings: RaySettings) -> dict:
    """The Serve deployment options of one function (also its entry in a Serve config file)."""
    return {
        "name": DEPLOYMENT,
        "autoscaling_config": autoscaling_config(spec, settings),
        "ray_actor_options": actor_options(spec, settings),
        "max_ongoing_requests": settings.max_ongoing_requests,
        "health_check_period_s": 2.0, "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 2.0, "graceful_shutdown_wait_loop_s": 0.5,
    }


def replica_args(model_dir: str, spec: ExpertFunction, layout: dict, hidden_size: int, dtype: str,
                 num_threads: int) -> dict:
    """What a replica needs to load its experts (JSON: also the `args` of a Serve config application)."""
    return {"model_dir": str(model_dir), "function_id": spec.id, "layer": spec.layer,
            "experts": list(spec.experts), "layout": dict(layout), "hidden_size": hidden_size, "dtype": dtype,
            "num_threads": num_threads}


def application_config(model_dir: str, spec: ExpertFunction, layout: dict, hidden_size: int, dtype: str,
                       settings: RaySettings) -> dict:
    """One function as a Serve config application (no HTTP route: only the engine's handles call it)."""
    return {"name": app_name(spec.id, settings.app_prefix), "route_prefix": None, "import_path": IMPORT_PATH,
            "args": replica_args(model_dir, spec, layout, hidden_size, dtype, settings.num_threads),
            "deployments": [deployment_config(spec, settings)]}


def fit_scale(functions: list[ExpertFunction], settings: RaySettings, cpus: float, memory_bytes: float) -> float:
    """The largest resource_scale <= 1 at which every function's `max_replicas` replicas fit in `cpus` CPUs
    and `memory_bytes` (a local Ray on one small machine running a plan made for a fleet)."""
    want_cpu = sum(f.vcpus or settings.default_vcpus for f in functions) * settings.max_replicas
    want_mem = sum(f.memory_mb * MIB for f in functions) * settings.max_replicas
    scale = 1.0
    if want_cpu > 0:
        scale = min(scale, 0.9 * cpus / want_cpu)
    if want_mem > 0:
        scale = min(scale, 0.5 * memory_bytes / want_mem)
    return scale
