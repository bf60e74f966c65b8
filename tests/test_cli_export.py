"""`moeserve export`: a plan's functions as a Serve config (Ray's own schema accepts the written file) and
as KubeRay objects whose serveConfigV2 is that config; the plan's fields land where docs/scale-out.md says."""

from __future__ import annotations

import json

import pytest
import yaml

from cli_run import run_cli

pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed (pip install 'moeserve[ray]')")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from moeserve.experts.ray_config import look_back_s  # noqa: E402
from moeserve.models.geometry import inspect_model  # noqa: E402
from moeserve.plan.placement import ExpertFunction  # noqa: E402
from moeserve.plan.schema import MainPlan, Plan  # noqa: E402


@pytest.fixture
def plan_path(tmp_path):
    """A demo plan: layer 0's experts 16-31 on MoEless device 0 and 1 (replicas), layer 1's on device 1."""
    g = inspect_model("demo").to_dict()
    local = {layer: list(range(32)) for layer in g["moe_layers"]}
    local[0], local[1] = list(range(16)), list(range(16))
    functions = [ExpertFunction("L0-d0", 0, tuple(range(16, 32)), memory_mb=1024, vcpus=0.5, keep_alive_s=60),
                 ExpertFunction("L0-d1", 0, tuple(range(16, 32)), memory_mb=1024, vcpus=0.5, keep_alive_s=60),
                 ExpertFunction("L1-d1", 1, tuple(range(16, 32)), memory_mb=512, keep_alive_s=8)]
    plan = Plan("moeless", "demo", g, MainPlan("cpu", local), functions, checkpoint={"path": "demo"})
    return plan.save(tmp_path / "plan.yaml")


def test_ray_serve_config(tmp_path, plan_path):
    out = tmp_path / "serve.yaml"
    r = run_cli("export", "ray-serve", plan_path, "--out", out, "--json", "--max-replicas", "3")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["applications"] == 3 and summary["target"] == "ray-serve"
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)  # the file as written, by Ray's own schema
    apps = {a["name"]: a for a in config["applications"]}
    assert sorted(apps) == ["moeserve-L0-d0", "moeserve-L0-d1", "moeserve-L1-d1"]
    d = apps["moeserve-L1-d1"]["deployments"][0]
    scaling, actor = d["autoscaling_config"], d["ray_actor_options"]
    assert scaling["min_replicas"] == 0 and scaling["initial_replicas"] == 1 and scaling["max_replicas"] == 3
    # keep-alive 8 s: Serve waits its look-back window, then the downscale delay
    assert scaling["look_back_period_s"] + scaling["downscale_to_zero_delay_s"] == pytest.approx(8.0)
    assert scaling["look_back_period_s"] == look_back_s(8.0)
    assert actor["resources"] == {"moeserve_device_1": pytest.approx(0.001)}
    assert actor["memory"] == 512 << 20 and actor["num_cpus"] == 1.0  # no vcpus in the plan: one
    a0 = apps["moeserve-L0-d0"]
    assert a0["deployments"][0]["ray_actor_options"]["num_cpus"] == 0.5
    assert a0["args"]["experts"] == list(range(16, 32)) and a0["args"]["layer"] == 0
    assert a0["args"]["layout"]["activation"] == "silu" and a0["args"]["hidden_size"] == 192


def test_kubernetes_objects(tmp_path, plan_path):
    serve_out, k8s_out = tmp_path / "serve.yaml", tmp_path / "k8s.yaml"
    assert run_cli("export", "ray-serve", plan_path, "--out", serve_out, "--model-dir", "/models/demo").code == 0
    r = run_cli("export", "kubernetes", plan_path, "--out", k8s_out, "--name", "demo", "--json")
    assert r.code == 0, r.err
    docs = list(yaml.safe_load_all(k8s_out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayService", "Deployment", "Service"]
    rayservice = docs[1]
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == yaml.safe_load(serve_out.read_text())
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert sorted(groups) == ["device-0", "device-1"]
    assert yaml.safe_load(groups["device-1"]["rayStartParams"]["resources"]) == {"moeserve_device_1": 1}
    command = docs[2]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--ray-address") + 1] == "ray://demo-head-svc:10001"
    assert "--backend" in command and yaml.safe_load(docs[0]["data"]["plan.yaml"])["functions"][0]["id"] == "L0-d0"


def test_export_errors(tmp_path, plan_path):
    r = run_cli("export", "ray-serve", tmp_path / "missing.yaml", "--out", tmp_path / "x.yaml")
    assert r.code == 2 and "plan not found" in r.err and "Traceback" not in r.err
    r = run_cli("export", "ray-serve", plan_path, "--out", tmp_path / "x.yaml", "--max-replicas", "0")
    assert r.code == 2 and "--max-replicas" in r.err
    assert not (tmp_path / "x.yaml").exists()
    for target in ("ray-serve", "kubernetes"):
        assert "Example:" in run_cli("export", target, "--help").out
