"""The process backend: results equal the in-process reference; failures are survived (the failover policy
retries on a replica, else hands the pairs back) and counted; idle functions scale to zero and come back;
nothing is left behind on stop or on a signal; a cold start never blocks the backend's other callers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from moeserve.errors import MoeServeError
from moeserve.experts.backend import collect_with_failover
from moeserve.experts.process_backend import ProcessBackend
from moeserve.experts.process_function import SHM_PREFIX
from moeserve.models.adapter import moe_layers, routed_forward
from moeserve.models.loading import load_model
from moeserve.plan.placement import ExpertFunction, ExpertPlacement

FAMILY = "gpt_oss"  # transposed, interleaved, biased experts: the least forgiving layout


def shm_segments(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"{SHM_PREFIX}_{pid}_")]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    model_dir = tiny_model_dirs[FAMILY]
    model = load_model(model_dir)
    layer = moe_layers(model)[-1]
    placement = ExpertPlacement(
        {la.index: tuple(range(la.num_experts)) for la in moe_layers(model)},  # the functions hold copies
        (ExpertFunction("a", layer.index, (2, 3, 4, 5, 6, 7)), ExpertFunction("b", layer.index, (4, 5, 6, 7))),
    )
    pool = ProcessBackend.from_model(model, str(model_dir), placement, call_timeout_s=5.0, reap_interval_s=0.1)
    pool.start()
    yield model, layer, pool
    pool.stop()


def routing(layer, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layer.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(layer.num_experts, generator=g)[: layer.top_k] for _ in range(tokens)])
    w = torch.rand(tokens, layer.top_k, generator=g)
    return x, idx, w


def call(pool, fid, layer, x, idx, w, experts):
    """Send the pairs of `experts` to `fid` through the failover policy; -> (their weighted sum [T, H] or
    None, the RemoteCall, the failover counts)."""
    ids = idx.numpy()
    tok, slot = np.nonzero(np.isin(ids, experts))
    order = np.argsort(ids[tok, slot], kind="stable")
    tok, slot = tok[order], slot[order]
    rows, pair_rows = np.unique(tok, return_inverse=True)
    rc = pool.call(fid, x, torch.from_numpy(rows), pair_rows.astype(np.int32), ids[tok, slot].astype(np.int32),
                   w.numpy()[tok, slot].astype(np.float32))
    (y,), counts = collect_with_failover(pool, [rc], None)
    if y is None:
        return None, rc, counts
    out = torch.zeros_like(x)
    out.index_add_(0, rc.token_rows, y)
    return out, rc, counts


def test_calls_match_reference_and_metrics(setup):
    model, layer, pool = setup
    pairs_to_a = 0
    with torch.no_grad():
        # the second batch is bigger than the first buffers: they are replaced by larger ones
        for tokens, fid, experts in ((9, "a", [2, 3, 4, 5, 6, 7]), (9, "b", [4, 6]), (200, "a", [2, 5])):
            x, idx, w = routing(layer, tokens, seed=tokens)
            got, rc, _ = call(pool, fid, layer, x, idx, w, experts)
            assert got is not None and rc.compute_s > 0
            torch.testing.assert_close(got, routed_forward(layer, x, idx, w, experts=experts), rtol=1e-5, atol=1e-6)
            pairs_to_a += len(rc.pair_rows) if fid == "a" else 0
    m = pool.metrics()
    assert m["functions_alive"] == 2 and m["failures"] == 0
    assert m["replicas_alive"][f"{layer.index}:5"] == 2 and m["replicas_alive"][f"{layer.index}:2"] == 1
    a = m["functions"]["a"]
    assert a["calls"] == 2 and a["pairs"] == pairs_to_a
    assert a["cold_starts"] == 1 and a["last_cold_start_s"] > 0
    weights_bytes = 6 * sum(t.numel() * 4 for t in (layer.experts.gate_up_proj[0], layer.experts.down_proj[0],
                                                    layer.experts.gate_up_proj_bias[0], layer.experts.down_proj_bias[0]))
    assert a["weights_bytes"] == weights_bytes
    assert a["rss_bytes"] > 10 * 2**20  # a process with torch loaded


def test_assign_spreads_replicas(setup):
    _, layer, pool = setup
    chosen, unplaced = pool.assign(layer.index, {4: 10, 5: 9, 2: 1, 0: 3})
    where = {e: fid for fid, es in chosen.items() for e in es}
    assert unplaced == [0]  # held by no function
    assert where[2] == "a" and where[4] != where[5]


@pytest.mark.parametrize("mode, target, experts, replica", [
    ("nan", "b", [4, 5], "a"),  # garbage -> retried on the replica
    ("hang", "b", [6, 7], "a"),  # no answer -> timeout, retried on the replica
    ("exit", "a", [2, 3], None),  # dies mid-call, no replica holds experts 2 and 3 -> caller computes
])
def test_failures_are_survived_and_counted(setup, mode, target, experts, replica):
    _, layer, pool = setup
    pool.prewarm(["a", "b"], wait=True)
    before = pool.metrics()
    old_pid = pool.pids()[target]
    x, idx, w = routing(layer, tokens=12, seed=3)
    pool.functions[target].proc.inject_fault(mode)
    pool.call_timeout_s = 1.0
    try:
        with torch.no_grad():
            got, _, counts = call(pool, target, layer, x, idx, w, experts)
    finally:
        pool.call_timeout_s = 5.0
    after = pool.metrics()
    assert after["functions"][target]["failures"] == before["functions"][target]["failures"] + 1
    assert after["functions"][target]["restarts"] == before["functions"][target]["restarts"] + 1
    assert not alive(old_pid)
    if replica is None:
        assert got is None
        assert counts.fallback_pairs == int(np.isin(idx.numpy(), experts).sum()) and counts.retries == 0
    else:
        assert counts.retries == 1 and counts.fallback_pairs == 0
        assert after["functions"][replica]["calls"] == before["functions"][replica]["calls"] + 1
        with torch.no_grad():
            torch.testing.assert_close(got, routed_forward(layer, x, idx, w, experts=experts), rtol=1e-5, atol=1e-6)
    pool.prewarm([target], wait=True)  # restarted in the background: a fresh, working process
    assert pool.pids()[target] != old_pid
    with torch.no_grad():
        got, _, _ = call(pool, target, layer, x, idx, w, experts)
        torch.testing.assert_close(got, routed_forward(layer, x, idx, w, experts=experts), rtol=1e-5, atol=1e-6)


def test_scale_to_zero_and_cold_start_on_demand(setup):
    _, layer, pool = setup
    pool.add_function(ExpertFunction("c", layer.index, (0, 1), keep_alive_s=0.3), wait=True)
    first_pid = pool.pids()["c"]
    assert wait_until(lambda: pool.functions["c"].state == "stopped")
    m = pool.metrics()["functions"]["c"]
    assert m["scaled_to_zero"] == 1 and m["cold_starts"] == 1 and m["rss_bytes"] == 0
    assert wait_until(lambda: not alive(first_pid), 5.0)
    # a call for expert 0 starts it again (measured as a second cold start) and is served by it
    chosen, unplaced = pool.assign(layer.index, {0: 1})
    assert chosen == {"c": [0]} and unplaced == []
    x, idx, w = routing(layer, tokens=6, seed=4)
    with torch.no_grad():
        got, _, _ = call(pool, "c", layer, x, idx, w, [0])
        torch.testing.assert_close(got, routed_forward(layer, x, idx, w, experts=[0]), rtol=1e-5, atol=1e-6)
    m = pool.metrics()["functions"]["c"]
    assert m["cold_starts"] == 2 and m["cold_start_s"] >= m["last_cold_start_s"] > 0
    pid = pool.pids()["c"]
    pool.remove_function("c")
    assert "c" not in pool.metrics()["functions"]
    assert wait_until(lambda: not alive(pid), 5.0)


def test_a_function_that_cannot_load_fails_start(setup, tiny_model_dirs):
    _, layer, _ = setup
    placement = ExpertPlacement({layer.index: (0,)}, (ExpertFunction("x", layer.index, (1,)),))
    pool = ProcessBackend(str(tiny_model_dirs["dense"]), placement, {layer.index: layer.layout}, layer.hidden_size)
    try:
        with pytest.raises(MoeServeError, match="did not start: .*no routed experts for layer"):
            pool.start()
    finally:
        pool.stop()
    assert pool.metrics()["functions"]["x"]["failures"] == 1


def test_stop_leaves_no_processes_or_shared_memory(setup):
    _, _, pool = setup
    pids = list(pool.pids().values())
    assert pids and shm_segments(os.getpid())
    pool.stop()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert not children & set(pids)
    assert shm_segments(os.getpid()) == []
    assert pool.metrics()["functions_alive"] == 0


_POOL_SCRIPT = """
import json, sys, time
from moeserve.experts.process_backend import ProcessBackend
from moeserve.models.expert_ffn import ExpertLayout
from moeserve.plan.placement import ExpertPlacement, ExpertFunction

layer, hidden, layout = json.loads(sys.argv[2])
placement = ExpertPlacement({layer: (0,)}, (ExpertFunction("f", layer, (1, 2, 3, 4, 5, 6, 7)),))
pool = ProcessBackend(sys.argv[1], placement, {layer: ExpertLayout(**layout)}, hidden).start()
pool.functions["f"].proc._ensure_rows(8)  # a shared-memory segment exists
print(json.dumps(pool.pids()), flush=True)
time.sleep(120)
"""


def test_signals_leave_nothing_behind(setup, tiny_model_dirs):
    """SIGTERM and SIGINT stop the pool (signal handler / atexit); after SIGKILL the functions see their
    pipe close and exit, and the resource tracker unlinks the segments. Three main processes at once."""
    _, layer, _ = setup
    spec = json.dumps([layer.index, layer.hidden_size, layer.layout.to_dict()])
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
    procs = [subprocess.Popen([sys.executable, "-c", _POOL_SCRIPT, str(tiny_model_dirs[FAMILY]), spec],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in signals]
    try:
        pids = {}
        for proc, sig in zip(procs, signals, strict=True):
            pids[sig] = list(json.loads(proc.stdout.readline()).values())
            assert pids[sig] and all(alive(p) for p in pids[sig]) and shm_segments(proc.pid)
        for proc, sig in zip(procs, signals, strict=True):
            proc.send_signal(sig)
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
    for proc, sig in zip(procs, signals, strict=True):
        gone = pids[sig]
        assert wait_until(lambda: not any(alive(p) for p in gone), 10.0), sig.name  # noqa: B023
        assert wait_until(lambda: shm_segments(proc.pid) == [], 10.0), sig.name  # noqa: B023


def test_a_cold_start_does_not_block_metrics_or_prewarming(setup, tiny_model_dirs):
    """A call waiting for a function's cold start (8 s here) used to hold the backend's lock: /metrics and
    request-arrival pre-warming waited with it. Now they answer while the start is still under way."""
    import threading

    model, layer, _ = setup
    placement = ExpertPlacement({la.index: tuple(range(la.num_experts)) for la in moe_layers(model)},
                                (ExpertFunction("slow", layer.index, (0, 1)), ExpertFunction("other", layer.index, (2,))))
    backend = ProcessBackend.from_model(model, str(tiny_model_dirs[FAMILY]), placement, start_delay_s=8.0)
    try:
        assigned = {}
        waiter = threading.Thread(target=lambda: assigned.update(result=backend.assign(layer.index, {0: 3})))
        t0 = time.perf_counter()
        waiter.start()  # launches "slow" and waits for it to be ready
        assert wait_until(lambda: backend.metrics()["functions"]["slow"]["state"] == "starting", 5.0)
        t1 = time.perf_counter()
        metrics = backend.metrics()
        backend.prewarm(["other"], wait=False)
        answered_s = time.perf_counter() - t1
        assert waiter.is_alive()  # still waiting for the cold start
        assert metrics["functions"]["slow"]["state"] == "starting" and answered_s < 1.0
        waiter.join(60)
        chosen, unplaced = assigned["result"]
        assert chosen == {"slow": [0]} and unplaced == [] and time.perf_counter() - t0 >= 8.0
    finally:
        backend.stop()
