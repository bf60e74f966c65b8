"""A plan's expert functions exported for Ray Serve and for Kubernetes (KubeRay), validated offline.

- `serve_config(plan, layouts, ...)`: the Serve config file (`serve deploy`), one application per
  function (`ray_config`); validated with Ray's own `ray.serve.schema.ServeDeploySchema`.
- `kubernetes_objects(plan, serve, ...)`: a KubeRay `RayService` whose `serveConfigV2` is that config,
  with a worker group per MoEless device (nodes offering `moeserve_device_<d>`) or one group for a Remoe
  plan, plus the plain objects around it: the plan as a ConfigMap, the main moeserve server as a
  Deployment joining the Ray cluster (`--backend ray --ray-address`), and its Service. The plain
  objects and the RayService's pod templates are validated with `kubernetes-validate` (Kubernetes'
  own OpenAPI schemas, offline); the RayService itself is a custom resource those schemas lack.

The model is read on the meta device (no weights) for the experts' layout; the exported configs name
the model directory as the cluster sees it (`model_dir`, e.g. a volume mounted on every node).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from moeserve.atomic import write_text_atomic
from moeserve.errors import MoeServeError
from moeserve.experts.ray_config import DEVICE_RESOURCE, RaySettings, application_config
from moeserve.models.adapter import require_moe_layers
from moeserve.models.loading import load_config, resolve_model_path
from moeserve.plan.ids import device_of
from moeserve.plan.schema import Plan, load_plan

KUBERNETES_VERSION = "1.37.0"
RAY_VERSION = "2.60.0"
MODEL_MOUNT = "/models"


def expert_layouts(model: str) -> tuple[dict[int, dict], int]:
    """Per MoE layer its experts' layout (as a dict), and the hidden size, from the config alone."""
    config = load_config(model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layers = require_moe_layers(meta, str(model))
    return {la.index: la.layout.to_dict() for la in layers}, layers[0].hidden_size


def serve_config(plan: Plan, layouts: dict[int, dict], hidden_size: int, model_dir: str,
                 settings: RaySettings, dtype: str = "float32") -> dict:
    """The Serve config of the plan's functions, checked with Ray's ServeDeploySchema."""
    if not plan.functions:
        raise MoeServeError("the plan has no expert functions: nothing runs on Ray Serve (all experts local)")
    config = {"proxy_location": "Disabled",
              "applications": [application_config(model_dir, f, layouts[f.layer], hidden_size, dtype, settings)
                               for f in plan.functions]}
    validate_serve_config(config)
    return config


def validate_serve_config(config: dict) -> None:
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        raise MoeServeError("exports are validated with Ray's own schema: pip install 'moeserve[ray]'") from None
    with warnings.catch_warnings():  # the deprecated metrics_interval_s: see ray_config
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ServeDeploySchema.model_validate(config)
        except ValueError as exc:
            raise MoeServeError("the Serve config does not validate: " + " ".join(str(exc).split("\n")[1:3])) from None


def _container(name: str, image: str, cpus: float, memory_mb: int, **extra) -> dict:
    resources = {"cpu": f"{max(cpus, 0.1):g}", "memory": f"{max(memory_mb, 512)}Mi"}
    return {"name": name, "image": image, "resources": {"requests": resources, "limits": resources}, **extra}


def _models_volume(claim: str) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    return volumes, [{"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True}]


def _worker_groups(plan: Plan, image: str, claim: str, settings: RaySettings) -> list[dict]:
    """One worker group per MoEless device (its nodes offer the device resource); one for other plans.
    Each is sized for its functions' replicas at `max_replicas`."""
    groups: dict[str, list] = {}
    for f in plan.functions:
        device = device_of(f.id)
        groups.setdefault("experts" if device is None else f"device-{device}", []).append((device, f))
    volumes, mounts = _models_volume(claim)
    out = []
    for name, members in sorted(groups.items()):
        device = members[0][0]
        cpus = sum((f.vcpus or settings.default_vcpus) for _, f in members) * settings.max_replicas
        memory = sum(max(f.memory_mb, 512) for _, f in members) * settings.max_replicas
        start = {"num-cpus": str(math.ceil(cpus))}
        if device is not None:
            start["resources"] = yaml.safe_dump({DEVICE_RESOURCE.format(device): 1}, default_flow_style=True).strip()
        out.append({
            "groupName": name, "replicas": 1, "minReplicas": 0, "maxReplicas": 1, "rayStartParams": start,
            "template": {"spec": {"containers": [_container("ray-worker", image, math.ceil(cpus), memory,
                                                            volumeMounts=mounts)], "volumes": volumes}},
        })
    return out


def kubernetes_objects(plan: Plan, serve: dict, name: str, image: str, claim: str, model_dir: str,
                       settings: RaySettings) -> list[dict]:
    """The RayService (serveConfigV2 = `serve`) and the plain objects around it (module docstring)."""
    labels = {"app.kubernetes.io/name": "moeserve", "app.kubernetes.io/instance": name}
    volumes, mounts = _models_volume(claim)
    head = {"rayStartParams": {"num-cpus": "0", "dashboard-host": "127.0.0.1"},
            "template": {"spec": {"containers": [_container("ray-head", image, 1, 2048, volumeMounts=mounts,
                                                            ports=[{"containerPort": 10001, "name": "client"}])],
                                  "volumes": volumes}}}
    rayservice = {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name, "labels": labels},
        "spec": {"serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
                 "rayClusterConfig": {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": True,
                                      "headGroupSpec": head,
                                      "workerGroupSpecs": _worker_groups(plan, image, claim, settings)}},
    }
    plan_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-plan", "labels": labels},
                "data": {"plan.yaml": plan.to_yaml()}}
    main_cmd = ["moeserve", "serve", model_dir, "--plan", "/plan/plan.yaml", "--backend", "ray",
                "--ray-address", f"ray://{name}-head-svc:10001", "--host", "0.0.0.0", "--port", "8000",
                "--api-key", "$(MOESERVE_API_KEY)"]
    main = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{name}-main", "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [_container(
                "moeserve", image, 2, max(plan.main.cpu_memory_mb, 2048), command=main_cmd,
                ports=[{"containerPort": 8000, "name": "http"}],
                env=[{"name": "MOESERVE_API_KEY", "valueFrom": {"secretKeyRef": {"name": f"{name}-api-key",
                                                                                 "key": "key"}}}],
                readinessProbe={"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 5},
                volumeMounts=[*mounts, {"name": "plan", "mountPath": "/plan", "readOnly": True}])],
                "volumes": [*volumes, {"name": "plan", "configMap": {"name": f"{name}-plan"}}]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}
    objects = [plan_map, rayservice, main, service]
    validate_kubernetes(objects)
    return objects


def validate_kubernetes(objects: list[dict]) -> None:
    """Plain objects against Kubernetes' schemas; a RayService's pod templates as PodTemplates."""
    try:
        import kubernetes_validate
    except ImportError:
        raise MoeServeError("Kubernetes objects are validated offline with kubernetes-validate: "
                            "pip install 'moeserve[dev]'") from None
    for obj in objects:
        if obj["kind"] == "RayService":
            cluster = obj["spec"]["rayClusterConfig"]
            templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
            checks = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{obj['metadata']['name']}-{i}"},
                       "template": t} for i, t in enumerate(templates)]
        else:
            checks = [obj]
        for check in checks:
            try:
                kubernetes_validate.validate(check, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise MoeServeError(f"{check['kind']} {check['metadata']['name']} does not validate: "
                                    f"{exc.message}") from None


def export_plan(target: str, plan_path: str, out: str, *, model: str | None = None, model_dir: str | None = None,
                name: str = "moeserve", image: str = f"rayproject/ray:{RAY_VERSION}-py311-cpu",
                claim: str = "moeserve-models", settings: RaySettings | None = None, dtype: str = "float32") -> dict:
    """`moeserve export ray-serve|kubernetes`: read the plan and its model's geometry, write `out` (YAML;
    several documents for kubernetes), return a summary. model: where to read the model's config here
    (default: the plan's checkpoint path); model_dir: where replicas find it (default: the same path, or
    under /models for kubernetes)."""
    if target not in ("ray-serve", "kubernetes"):
        raise MoeServeError(f"unknown export target {target!r}: use ray-serve or kubernetes")
    plan = load_plan(plan_path)
    model = model or plan.checkpoint.get("path") or plan.model
    local = resolve_model_path(model)
    settings = settings or RaySettings()
    if model_dir is None:
        model_dir = str(local) if target == "ray-serve" else f"{MODEL_MOUNT}/{Path(local).name}"
    layouts, hidden = expert_layouts(model)
    missing = sorted({f.layer for f in plan.functions} - set(layouts))
    if missing:
        raise MoeServeError(f"the plan's layers {missing} are not MoE layers of {model}: a plan for another model?")
    serve = serve_config(plan, layouts, hidden, model_dir, settings, dtype)
    if target == "ray-serve":
        text, objects = yaml.safe_dump(serve, sort_keys=False), 1
    else:
        docs = kubernetes_objects(plan, serve, name, image, claim, model_dir, settings)
        text, objects = yaml.safe_dump_all(docs, sort_keys=False), len(docs)
    write_text_atomic(out, text)
    return {"target": target, "out": str(out), "plan": str(plan_path), "functions": len(plan.functions),
            "applications": len(serve["applications"]), "objects": objects, "model_dir": model_dir,
            "validated_with": "ray.serve.schema.ServeDeploySchema" + (
                "" if target == "ray-serve" else f", kubernetes-validate {KUBERNETES_VERSION} (strict)")}
