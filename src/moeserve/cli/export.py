"""`moeserve export`: a plan's expert functions as a Ray Serve config or Kubernetes (KubeRay) objects."""

from __future__ import annotations

from pathlib import Path

import typer

from moeserve.atomic import check_output_file
from moeserve.cli.app import app
from moeserve.cli.common import console, emit_json
from moeserve.cli.validate import number

export_app = typer.Typer(help="Export a plan for a cluster.\n\n"
                         "Example: moeserve export ray-serve demo-plan.yaml --out serve.yaml", no_args_is_help=True)
app.add_typer(export_app, name="export")

_MODEL = typer.Option(None, "--model", help="The plan's model here, read for its experts' layout "
                      "(default: the plan's checkpoint path).")
_MAX_REPLICAS = typer.Option(2, "--max-replicas", parser=number(low=1, high=1000, integer=True),
                             help="Most replicas Serve's autoscaler may give one function.")
_JSON = typer.Option(False, "--json", help="Print a JSON summary on stdout.")


def _run(target: str, plan: Path, out: Path, json_out: bool, **kwargs) -> None:
    from moeserve.defaults import RAY_TARGET_ONGOING_REQUESTS
    from moeserve.experts.ray_config import RaySettings
    from moeserve.experts.ray_export import export_plan

    check_output_file(out, "--out")
    settings = RaySettings(max_replicas=int(kwargs.pop("max_replicas")),
                           target_ongoing_requests=RAY_TARGET_ONGOING_REQUESTS)
    with console.status(f"exporting {plan} ({target}, validating)"):
        summary = export_plan(target, str(plan), str(out), settings=settings, **kwargs)
    if json_out:
        emit_json(summary)
        return
    console.print(f"wrote {out}: {summary['applications']} Serve applications, {summary['objects']} object(s), "
                  f"validated with {summary['validated_with']}")


@export_app.command("ray-serve")
def ray_serve_cmd(
    plan: Path = typer.Argument(..., help="A plan written by `moeserve plan`."),
    out: Path = typer.Option(..., "--out", "-o", help="The Serve config file to write (YAML)."),
    model: str = _MODEL,
    model_dir: str = typer.Option(None, "--model-dir", help="Where the replicas find the model on the cluster's "
                                  "nodes (default: the same path as here)."),
    max_replicas: float = _MAX_REPLICAS,
    json_out: bool = _JSON,
) -> None:
    """A Ray Serve config (for `serve deploy`) with one application per expert function of the plan:
    keep-alive -> downscale delays, scale to zero -> min_replicas 0, vCPUs/memory -> ray_actor_options,
    MoEless devices -> node resources. Validated with Ray's ServeDeploySchema.

    Example: moeserve export ray-serve demo-plan.yaml --out serve.yaml && serve deploy serve.yaml
    """
    _run("ray-serve", plan, out, json_out, model=model, model_dir=model_dir, max_replicas=max_replicas)


@export_app.command("kubernetes")
def kubernetes_cmd(
    plan: Path = typer.Argument(..., help="A plan written by `moeserve plan`."),
    out: Path = typer.Option(..., "--out", "-o", help="The manifest to write (multi-document YAML)."),
    model: str = _MODEL,
    name: str = typer.Option("moeserve", "--name", help="Name of the RayService and the objects around it."),
    image: str = typer.Option("rayproject/ray:2.60.0-py311-cpu", "--image",
                              help="Container image with moeserve[ray] installed (main server and Ray nodes)."),
    claim: str = typer.Option("moeserve-models", "--models-claim", help="PersistentVolumeClaim holding the "
                              "model directory, mounted read-only at /models on every pod."),
    max_replicas: float = _MAX_REPLICAS,
    json_out: bool = _JSON,
) -> None:
    """A KubeRay RayService (serveConfigV2: the plan's Serve config; a worker group per MoEless device),
    the plan as a ConfigMap, and the main moeserve server as a Deployment + Service joining the Ray
    cluster. Validated offline: Ray's ServeDeploySchema and kubernetes-validate (strict).

    Example: moeserve export kubernetes demo-plan.yaml --out moeserve.yaml && kubectl apply -f moeserve.yaml
    """
    _run("kubernetes", plan, out, json_out, model=model, name=name, image=image, claim=claim,
         max_replicas=max_replicas)
