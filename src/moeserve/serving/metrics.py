"""Prometheus metrics of a serving engine, in its own registry (several engines may live in one process).

Event metrics (requests, tokens, TTFT/TPOT/latency histograms) are updated as requests finish; state
metrics (queue depth, routed-token counts, the expert pool's counters, resident memory, cost) are read
when /metrics is scraped, from the engine, `pool.metrics()` and `dispatch.stats()` when those exist.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from moeserve.serving.scheduler import FinishedStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GIB = float(1 << 30)

disable_created_metrics()  # `_created` series double the output and no dashboard here reads them


@dataclass(frozen=True)
class AccruedCost:
    """USD accrued under a pricing profile (Remoe [II] billing: memory x duration, plus per-request fees)."""

    main_usd: float
    functions_usd: float

    @property
    def total_usd(self) -> float:
        return self.main_usd + self.functions_usd


def accrued_cost(pricing, main_busy_s: float, main_host_bytes: float, main_gpu_bytes: float,
                 function_memory_bytes: np.ndarray, function_compute_s: np.ndarray,
                 function_calls: np.ndarray) -> AccruedCost:
    """Cost so far. The main function is billed for the time it spent computing (a serverless main
    function runs only while requests are in flight) at the GPU offering's price when it holds GPU memory,
    else at the CPU offering's; each expert function for its compute time at its memory size.

    function_*: [functions] arrays (bytes, seconds, call counts).
    """
    if main_gpu_bytes > 0:
        main_per_s = pricing.gpu.usd_per_second(main_gpu_bytes, main_host_bytes)
    else:
        main_per_s = main_host_bytes / GIB * pricing.cpu.usd_per_gb_second
    functions = (np.sum(np.asarray(function_memory_bytes, dtype=np.float64) / GIB
                        * np.asarray(function_compute_s, dtype=np.float64)) * pricing.cpu.usd_per_gb_second
                 + float(np.sum(function_calls)) * pricing.cpu.usd_per_request)
    return AccruedCost(main_busy_s * main_per_s, float(functions))


class ServingMetrics:
    """All of an engine's metrics. `observe_*` run on the scheduler thread; `render` on the HTTP side.

    state: () -> dict with waiting, running, busy_s (read at scrape time).
    moe_layers: decoder-layer index of each MoE layer, in routing order; num_experts: routed experts per layer.
    """

    def __init__(self, state: Callable[[], dict], moe_layers: list[int], num_experts: int, *, pool=None,
                 dispatch=None, pricing=None, device: torch.device | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.state, self.moe_layers, self.pool, self.dispatch = state, moe_layers, pool, dispatch
        self.pricing, self.device = pricing, device or torch.device("cpu")
        self.routed = np.zeros((len(moe_layers), max(num_experts, 1)), dtype=np.int64)
        self._routed_lock = threading.Lock()
        self._process = psutil.Process(os.getpid())
        r = self.registry
        self.requests = Counter("moeserve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("moeserve_finished_requests", "Generations finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("moeserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("moeserve_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("moeserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("moeserve_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("moeserve_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("moeserve_queue_time_seconds", "Arrival to admission into the batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_StateCollector(self))

    def observe_finished(self, s: FinishedStats) -> None:
        self.finished.labels(s.finish_reason).inc()
        self.prompt_tokens.inc(s.prompt_tokens)
        self.generation_tokens.inc(s.completion_tokens)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s)
        if s.tpot_s is not None:
            self.tpot.observe(s.tpot_s)
        self.e2e.observe(s.e2e_s)
        self.queue_time.observe(s.queue_s)

    def observe_routing(self, ids: torch.Tensor) -> None:
        """ids: [tokens, moe_layers, top_k] expert ids of one forward (negative ids = dropped, ignored)."""
        a, experts = ids.numpy(), self.routed.shape[1]
        counts = np.stack([np.bincount(a[:, i][(a[:, i] >= 0) & (a[:, i] < experts)], minlength=experts)
                           for i in range(a.shape[1])])
        with self._routed_lock:
            self.routed += counts

    def routed_counts(self) -> np.ndarray:
        """[moe_layers, experts] tokens routed to each expert since start."""
        with self._routed_lock:
            return self.routed.copy()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def cost(self) -> AccruedCost | None:
        if self.pricing is None:
            return None
        pool = self.pool.metrics() if self.pool is not None else {"functions": {}}
        specs = {f.id: f for f in getattr(getattr(self.pool, "placement", None), "functions", ())}
        fns = pool["functions"]
        memory = [specs[fid].memory_mb * 2**20 if fid in specs and specs[fid].memory_mb else f["rss_bytes"]
                  for fid, f in fns.items()]
        gpu_bytes = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        return accrued_cost(self.pricing, self.state()["busy_s"], self._process.memory_info().rss, gpu_bytes,
                            np.array(memory), np.array([f["compute_s"] for f in fns.values()]),
                            np.array([f["calls"] for f in fns.values()]))


class _StateCollector:
    """Metrics read at scrape time."""

    def __init__(self, metrics: ServingMetrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        m, state = self.m, self.m.state()
        yield GaugeMetricFamily("moeserve_queue_depth", "Requests waiting for a batch slot", value=state["waiting"])
        yield GaugeMetricFamily("moeserve_running_requests", "Requests in the running batch", value=state["running"])
        yield CounterMetricFamily("moeserve_busy_seconds", "Time spent in model steps", value=state["busy_s"])
        routed = CounterMetricFamily("moeserve_routed_tokens", "Tokens routed to each expert",
                                     labels=["layer", "expert"])
        for i, row in enumerate(m.routed_counts()):
            for e, n in enumerate(row):
                routed.add_metric([str(m.moe_layers[i]), str(e)], int(n))
        yield routed
        rss = GaugeMetricFamily("moeserve_resident_memory_bytes", "Resident memory per process", labels=["process"])
        rss.add_metric(["main"], m._process.memory_info().rss)
        if m.pool is not None:
            yield from _pool_metrics(m.pool.metrics(), rss)
        yield rss
        if m.dispatch is not None:
            yield from _dispatch_metrics(m.dispatch.stats())
        cost = m.cost()
        if cost is not None:
            c = CounterMetricFamily("moeserve_cost_usd", "Cost accrued under the pricing profile", labels=["component"])
            c.add_metric(["main"], cost.main_usd)
            c.add_metric(["functions"], cost.functions_usd)
            yield c


def _pool_metrics(stats: dict, rss: GaugeMetricFamily):
    fns = stats.get("functions", {})
    labels = ["function", "layer"]
    counters = {
        "calls": ("moeserve_remote_calls", "Calls to each expert function"),
        "failures": ("moeserve_remote_failures", "Failed calls (dead, hung or garbage) per function"),
        "restarts": ("moeserve_function_restarts", "Restarts of each expert function"),
        "cold_starts": ("moeserve_cold_starts", "Cold starts of each expert function"),
        "scaled_to_zero": ("moeserve_scaled_to_zero", "Times each function was stopped for being idle"),
    }
    for key, (name, doc) in counters.items():
        family = CounterMetricFamily(name, doc, labels=labels)
        for fid, f in fns.items():
            family.add_metric([fid, str(f["layer"])], f.get(key, 0))
        yield family
    latency = SummaryMetricFamily("moeserve_remote_call_latency_seconds", "Send-to-result time of remote calls",
                                  labels=labels)
    cold = SummaryMetricFamily("moeserve_cold_start_seconds", "Spawn-to-ready time of expert functions",
                               labels=labels)
    up = GaugeMetricFamily("moeserve_function_up", "1 if the expert function is ready", labels=labels)
    for fid, f in fns.items():
        latency.add_metric([fid, str(f["layer"])], count_value=f["calls"], sum_value=f["latency_s"])
        cold.add_metric([fid, str(f["layer"])], count_value=f["cold_starts"], sum_value=f["cold_start_s"])
        up.add_metric([fid, str(f["layer"])], 1.0 if f["state"] == "ready" else 0.0)
        rss.add_metric([fid], f["rss_bytes"])
    yield from (latency, cold, up)
    replicas = GaugeMetricFamily("moeserve_replicas_alive", "Ready functions holding each remote expert",
                                 labels=["layer", "expert"])
    for key, n in stats.get("replicas_alive", {}).items():
        layer, expert = key.split(":")
        replicas.add_metric([layer, expert], n)
    yield replicas
    yield CounterMetricFamily("moeserve_remote_fallback_pairs", "Remote (token, expert) pairs computed locally "
                              "after a failure", value=stats.get("fallback_pairs", 0))
    yield CounterMetricFamily("moeserve_remote_retries", "Remote calls retried on a replica",
                              value=stats.get("retries", 0))


def _dispatch_metrics(per_layer: dict[int, dict]):
    wall = CounterMetricFamily("moeserve_dispatch_wall_seconds", "Wall time of MoE layers with remote experts",
                               labels=["layer"])
    overhead = CounterMetricFamily("moeserve_dispatch_overhead_seconds", "Transport overhead of those layers "
                                   "over ideal parallel expert work", labels=["layer"])
    calls = CounterMetricFamily("moeserve_dispatch_layer_calls", "Layer calls with remote experts", labels=["layer"])
    for layer, s in per_layer.items():
        wall.add_metric([str(layer)], s.get("wall_s", 0.0))
        overhead.add_metric([str(layer)], s.get("overhead_s", 0.0))
        calls.add_metric([str(layer)], s.get("calls", 0))
    yield from (wall, overhead, calls)
