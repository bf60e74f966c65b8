"""Prometheus metrics of a serving engine, in its own registry (several engines may live in one process).

Event metrics (requests, tokens, TTFT/TPOT/latency histograms) are updated as requests finish; state
metrics (queue depth, routed-token counts, the expert backend's counters, resident memory, cost) are read
when /metrics is scraped, from the engine, `backend.metrics()` and `dispatch.stats()`.
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

from moeserve.engine.sequence import FinishedStats
from moeserve.pricing.billing import function_usd, main_usd
from moeserve.units import MIB

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

disable_created_metrics()  # `_created` series double the output and no dashboard here reads them


@dataclass(frozen=True)
class AccruedCost:
    """USD accrued under a pricing profile, by the planner's billing rule (pricing/billing.py): each expert
    function call is an invocation billed for its compute time, rounded up to the billing granularity, at
    its memory (the plan's size, else its measured RSS rounded up to a configurable size); the main function
    for its busy time at its GPU and host memory, plus the per-request fee of every finished request."""

    main_usd: float
    functions_usd: float

    @property
    def total_usd(self) -> float:
        return self.main_usd + self.functions_usd


class ServingMetrics:
    """All of an engine's metrics. `observe_*` run on the scheduler thread; `render` on the HTTP side.

    state: () -> dict with waiting, running, busy_s (read at scrape time).
    moe_layers: decoder-layer index of each MoE layer, in routing order; num_experts: routed experts per layer.
    """

    def __init__(self, state: Callable[[], dict], moe_layers: list[int], num_experts: int, *, backend=None,
                 dispatch=None, pricing=None, device: torch.device | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.state, self.moe_layers, self.backend, self.dispatch = state, moe_layers, backend, dispatch
        self.pricing, self.device = pricing, device or torch.device("cpu")
        self._function_memory_mb: dict[str, int] = {}
        self._functions_usd = 0.0
        if backend is not None:
            backend.add_call_listener(self.observe_call)
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

    def observe_call(self, function_id: str, compute_s: float) -> None:
        """A remote call answered (the backend's call listener): bill it as one invocation."""
        if self.pricing is None:
            return
        memory_mb = self._function_memory_mb.get(function_id)
        if memory_mb is None:
            spec = self.backend.specs().get(function_id)
            rss = self.backend.metrics()["functions"].get(function_id, {}).get("rss_bytes", 0)
            memory_mb = spec.memory_mb if spec is not None and spec.memory_mb else \
                self.pricing.cpu.round_memory_up(rss / MIB)
            self._function_memory_mb[function_id] = memory_mb
        usd = float(function_usd(self.pricing.cpu, memory_mb, compute_s))
        with self._routed_lock:
            self._functions_usd += usd

    def cost(self) -> AccruedCost | None:
        if self.pricing is None:
            return None
        gpu_bytes = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        requests = sum(sample.value for metric in self.finished.collect() for sample in metric.samples
                       if sample.name.endswith("_total"))
        main = main_usd(self.pricing, self.state()["busy_s"], gpu_bytes, self._process.memory_info().rss, requests)
        with self._routed_lock:
            return AccruedCost(main, self._functions_usd)


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
        if m.backend is not None:
            yield from _backend_metrics(m.backend.metrics(), m.dispatch.totals(), rss)
        yield rss
        if m.dispatch is not None and m.dispatch.caches is not None:
            yield from _expert_cache_metrics(m.dispatch.cache_stats())
        if m.dispatch is not None:
            yield from _dispatch_metrics(m.dispatch.stats())
        cost = m.cost()
        if cost is not None:
            c = CounterMetricFamily("moeserve_cost_usd", "Cost accrued under the pricing profile", labels=["component"])
            c.add_metric(["main"], cost.main_usd)
            c.add_metric(["functions"], cost.functions_usd)
            yield c


def _backend_metrics(stats: dict, failover: dict, rss: GaugeMetricFamily):
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
    running = GaugeMetricFamily("moeserve_function_replicas", "Running replicas of each expert function (Ray "
                                "Serve's autoscaler sets them; a process-backend function has one)", labels=labels)
    for fid, f in fns.items():
        running.add_metric([fid, str(f["layer"])], float(f.get("replicas", 1 if f["state"] == "ready" else 0)))
        latency.add_metric([fid, str(f["layer"])], count_value=f["calls"], sum_value=f["latency_s"])
        cold.add_metric([fid, str(f["layer"])], count_value=f["cold_starts"], sum_value=f["cold_start_s"])
        up.add_metric([fid, str(f["layer"])], 1.0 if f["state"] == "ready" else 0.0)
        rss.add_metric([fid], f["rss_bytes"])
    yield from (latency, cold, up, running)
    replicas = GaugeMetricFamily("moeserve_replicas_alive", "Ready functions holding each remote expert",
                                 labels=["layer", "expert"])
    for key, n in stats.get("replicas_alive", {}).items():
        layer, expert = key.split(":")
        replicas.add_metric([layer, expert], n)
    yield replicas
    yield CounterMetricFamily("moeserve_remote_fallback_pairs", "Remote (token, expert) pairs computed locally "
                              "after a failure", value=failover["fallback_pairs"])
    yield CounterMetricFamily("moeserve_remote_retries", "Remote calls retried on a replica",
                              value=failover["retries"])


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


_CACHE_COUNTERS = {
    "hits": ("moeserve_expert_cache_hits", "Experts a forward needed that were resident"),
    "misses": ("moeserve_expert_cache_misses", "Experts a forward needed that had to be read"),
    "evictions": ("moeserve_expert_cache_evictions", "Residents evicted by the policy"),
    "bytes_read": ("moeserve_expert_cache_read_bytes", "Bytes the misses read from the checkpoint"),
    "stall_s": ("moeserve_expert_cache_stall_seconds", "Time forwards waited for expert weights"),
    "prefetch_reads": ("moeserve_expert_cache_prefetch_reads", "Experts read ahead for the next layer"),
    "prefetch_bytes": ("moeserve_expert_cache_prefetch_bytes", "Bytes read ahead"),
    "prefetch_used": ("moeserve_expert_cache_prefetch_used", "Misses served by a read-ahead"),
    "prefetch_wasted_bytes": ("moeserve_expert_cache_prefetch_wasted_bytes", "Read-ahead bytes the layer did not use"),
}


def _expert_cache_metrics(per_layer: dict[int, dict]):
    """Per-layer expert-cache counters and residency gauges (experts/expert_cache.py)."""
    for key, (name, doc) in _CACHE_COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=["layer"])
        for layer, s in per_layer.items():
            family.add_metric([str(layer)], s[key])
        yield family
    resident = GaugeMetricFamily("moeserve_expert_cache_resident_experts", "Experts resident", labels=["layer"])
    resident_bytes = GaugeMetricFamily("moeserve_expert_cache_resident_bytes", "Bytes of resident experts",
                                       labels=["layer"])
    for layer, s in per_layer.items():
        resident.add_metric([str(layer)], s["resident"])
        resident_bytes.add_metric([str(layer)], s["resident_bytes"])
    yield from (resident, resident_bytes)
