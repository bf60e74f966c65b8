"""The Ray Serve backend on a small multi-node Ray cluster on this host (one per module: two nodes, each
offering one MoEless device resource): greedy tokens equal transformers' generate with half the demo's
experts (and a tiny GPT-OSS's) in Serve deployments and with replicas; functions land on the nodes their
plan names; a replica killed mid-request and a node removed mid-request lose no request (the failure
policy retries on a replica or computes locally); a function idle past its keep-alive goes to zero
replicas and the next call starts it again (its cold start counted from Serve's replica start time)."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'moeserve[ray]')")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from moeserve.errors import MoeServeError  # noqa: E402
from moeserve.experts.dispatch import install_dispatch  # noqa: E402
from moeserve.experts.ray_backend import RayBackend, call_parts  # noqa: E402
from moeserve.experts.ray_config import SERVE_ENV, RaySettings  # noqa: E402
from moeserve.models.adapter import moe_layers  # noqa: E402
from moeserve.models.loading import DEMO_MODEL_DIR, load_model  # noqa: E402
from moeserve.plan.ids import device_function_id  # noqa: E402
from moeserve.plan.placement import ExpertFunction, ExpertPlacement  # noqa: E402

NEW_TOKENS = 8
SETTINGS = RaySettings(max_replicas=1, default_vcpus=0.05)


def generate(model, prompts):
    with torch.no_grad():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


def wait_until(condition, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture(scope="module")
def cluster():
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"moeserve_device_0": 100}})
    second = c.add_node(num_cpus=2, resources={"moeserve_device_1": 100})
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    serve.start(proxy_location="Disabled")
    yield c, {0: c.head_node.node_id, 1: second.node_id}, second
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


class Setup:
    """A model, its reference tokens, a placement with MoEless device functions, and a backend for it."""

    def __init__(self, tag: str, model_dir, prompt_shape, replica_layer: bool):
        self.model = load_model(model_dir)
        g = torch.Generator().manual_seed(7)
        self.prompts = torch.randint(3, self.model.config.vocab_size, prompt_shape, generator=g)
        self.reference = generate(self.model, self.prompts)
        layers = moe_layers(self.model)
        n = layers[0].num_experts
        # experts [0, n/2) local; [n/2, n) remote, on device 0 for even positions, device 1 for odd ones
        functions = [ExpertFunction(device_function_id(la.index, i % 2), la.index, tuple(range(n // 2, n)))
                     for i, la in enumerate(layers)]
        if replica_layer:  # the first layer's remote set also on device 1: two replicas
            functions.append(ExpertFunction(device_function_id(layers[0].index, 1), layers[0].index,
                                            tuple(range(n // 2, n))))
        self.placement = ExpertPlacement({la.index: tuple(range(n // 2)) for la in layers}, tuple(functions))
        self.backend = RayBackend.from_model(self.model, str(model_dir), self.placement, settings=replace(SETTINGS, app_prefix=f"{tag}-"),
                                             call_timeout_s=30.0, start_timeout_s=240.0)

    def run(self):
        handle = install_dispatch(self.model, self.placement, self.backend)
        try:
            return generate(self.model, self.prompts), handle.totals()
        finally:
            handle.remove()


@pytest.fixture(scope="module")
def setups(cluster, tiny_model_dirs):
    s = {"demo": Setup("demo", DEMO_MODEL_DIR, (1, 12), replica_layer=True),
         "gpt_oss": Setup("gpt_oss", tiny_model_dirs["gpt_oss"], (2, 6), replica_layer=False)}
    for setup in s.values():  # deploy all, then wait
        setup.backend.start(wait=False)
    for setup in s.values():
        setup.backend._await(lambda b=setup.backend: all(f.running for f in b.functions.values()), "not started")
    yield s
    for setup in s.values():
        setup.backend.stop()


@pytest.mark.parametrize("name", ["demo", "gpt_oss"])
def test_tokens_equal_transformers_with_functions_on_named_nodes(cluster, setups, name):
    _, nodes, _ = cluster
    s = setups[name]
    out, totals = s.run()
    assert torch.equal(out, s.reference)
    metrics = s.backend.metrics()
    assert metrics["failures"] == 0 and totals["fallback_pairs"] == 0
    assert all(metrics["functions"][f.id]["calls"] > 0 for f in s.placement.functions if f.id.endswith("-d0"))
    for f in s.placement.functions:  # L<l>-d<d> runs on the node offering moeserve_device_<d>
        device = int(f.id.rsplit("-d", 1)[1])
        assert {r["node_id"] for r in s.backend.replicas(f.id)} == {nodes[device]}, f.id


def test_replicas_share_the_work(setups):
    s = setups["demo"]
    first = s.placement.functions[0].layer
    replicas = [f.id for f in s.placement.functions if f.layer == first]
    assert len(replicas) == 2
    before = {fid: s.backend.metrics()["functions"][fid]["calls"] for fid in replicas}
    s.run()
    after = s.backend.metrics()["functions"]
    assert all(after[fid]["calls"] > before[fid] for fid in replicas)  # least busy first: both took calls


def test_call_parts_cover_the_tokens_once():
    assert call_parts(31, 4, 16) == [(0, 31)]  # under 2 x min: one part
    assert call_parts(40, 1, 16) == [(0, 20), (20, 40)]  # two parts even with one replica
    assert call_parts(40, 3, 16) == [(0, 20), (20, 40)]  # no part under min_tokens
    assert call_parts(100, 0, 0) == [(0, 100)]  # 0: never split
    for n, running in ((100, 3), (97, 5), (1000, 2)):
        parts = call_parts(n, running, 16)
        assert len(parts) == min(max(2, running), n // 16)
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        assert min(b - a for a, b in parts) >= 16


def test_big_calls_go_out_in_parts(setups):
    """Calls split over a function's replica(s) still give generate's tokens; Serve sees the parts."""
    s = setups["demo"]
    settings = s.backend.settings
    s.backend.settings = replace(settings, split_min_tokens=2)
    try:
        out, totals = s.run()
    finally:
        s.backend.settings = settings
    assert torch.equal(out, s.reference)
    metrics = s.backend.metrics()
    assert sum(f["split_parts"] for f in metrics["functions"].values()) > 0
    assert totals["fallback_pairs"] == 0


def _kill_on_call(backend, victim: str, nth: int, kill):
    """After sending `victim` its `nth` call (in flight), run `kill()`."""
    sent = {"n": 0}
    original = backend.call

    def call(function_id, *args):
        rc = original(function_id, *args)
        if function_id == victim:
            sent["n"] += 1
            if sent["n"] == nth:
                kill()
        return rc

    backend.call = call
    return lambda: setattr(backend, "call", original)


def test_replica_killed_mid_request_loses_nothing(setups):
    s = setups["demo"]
    victim = s.placement.functions[0].id  # L<first>-d0, replicated by L<first>-d1
    [replica] = s.backend.replicas(victim)
    handle = s.backend.functions[victim].handle
    failures = s.backend.metrics()["failures"]
    # the replica's process exits inside its third call of the request (a call in flight is lost)
    restore = _kill_on_call(s.backend, victim, 2, lambda: handle.options(method_name="fault").remote("exit").result())
    try:
        out, totals = s.run()
    finally:
        restore()
    assert torch.equal(out, s.reference)
    assert s.backend.metrics()["failures"] > failures and totals["retries"] >= 1
    # Serve replaces the replica; the function takes calls again
    assert wait_until(lambda: any(r.get("pid") != replica["pid"] and r["state"] == "RUNNING"
                                  for r in s.backend.replicas(victim)))
    calls = s.backend.metrics()["functions"][victim]["calls"]
    assert torch.equal(s.run()[0], s.reference)
    assert s.backend.metrics()["functions"][victim]["calls"] > calls


def test_scale_to_zero_and_back(cluster, setups):
    s = setups["gpt_oss"]
    layer = moe_layers(s.model)[0]
    spec = ExpertFunction(f"L{layer.index}-z", layer.index, (0, 1), keep_alive_s=4.0)
    backend = RayBackend.from_model(s.model, s.backend.model_dir,
                                    ExpertPlacement({la.index: tuple(range(la.num_experts))
                                                     for la in moe_layers(s.model)}, (spec,)),
                                    settings=replace(SETTINGS, app_prefix="zero-"), start_timeout_s=240.0)
    backend.start()
    try:
        from test_expert_pool import call, routing  # the process backend's helpers: the same calls

        x, idx, w = routing(layer, 6, seed=1)
        with torch.no_grad():
            reference = call(backend, spec.id, layer, x, idx, w, [0, 1])[0]
        assert reference is not None
        assert wait_until(lambda: backend.metrics()["functions"][spec.id]["replicas"] == 0, timeout=120)
        assert backend.metrics()["functions"][spec.id]["scaled_to_zero"] == 1
        cold = backend.metrics()["functions"][spec.id]["cold_starts"]
        backend.wait_for_cold_start = False  # what serving runs: the batch never waits for a replica start
        with torch.no_grad():
            assert call(backend, spec.id, layer, x, idx, w, [0, 1])[0] is None  # not sent: computed locally
        assert wait_until(lambda: backend.metrics()["functions"][spec.id]["replicas"] >= 1, timeout=120)
        with torch.no_grad():
            again = call(backend, spec.id, layer, x, idx, w, [0, 1])[0]  # the replica the wake-up call started
        assert again is not None and torch.allclose(again, reference)
        assert wait_until(lambda: backend.metrics()["functions"][spec.id]["cold_starts"] == cold + 1, timeout=30)
        assert backend.metrics()["functions"][spec.id]["last_cold_start_s"] > 0
    finally:
        backend.stop()


def test_node_removed_mid_request_loses_nothing(cluster, setups):
    """Last: the second node goes away while a request runs; its functions' pairs are computed locally."""
    c, _, second = cluster
    s = setups["demo"]
    victim = next(f.id for f in s.placement.functions if f.id.endswith("-d1"))
    restore = _kill_on_call(s.backend, victim, 2, lambda: c.remove_node(second, allow_graceful=False))
    try:
        out, totals = s.run()
    finally:
        restore()
    assert torch.equal(out, s.reference)
    assert s.backend.metrics()["failures"] >= 1 and totals["fallback_pairs"] + totals["retries"] >= 1


def test_a_start_timeout_says_why_serve_waits(monkeypatch):
    """Replicas that no node can schedule: the timeout quotes Serve's own message for the waiting function."""
    placement = ExpertPlacement({0: (0,)}, (ExpertFunction("L0-d1", 0, (1,)),))
    backend = RayBackend("unused", placement, {0: None}, 8, start_timeout_s=0.0)
    monkeypatch.setattr(backend, "poll", lambda: None)
    backend.functions["L0-d1"].serve_status = (
        "DEPLOYING", "Deployment 'experts' has 1 replicas that have taken more than 30s to be scheduled.\n"
        "Resources required for each replica: {\"CPU\": 1.0}")
    with pytest.raises(MoeServeError, match=r"did not start within 0 s on Ray Serve \(L0-d1: Deployment .* "
                                            r"Resources required for each replica"):
        backend._await(lambda: False, "expert functions did not start")
