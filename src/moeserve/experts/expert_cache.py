"""Serving with an expert cache: per MoE layer at most C experts in fast memory, the rest read on a miss.

ReMoE (Zhu et al., arXiv 2605.27081: its memory-constrained expert-offloading setting) and the
expert caches of llama.cpp / vLLM offloading: a layer's non-resident experts live only in the checkpoint
(slow memory); a forward that routes a token to one reads its tensors from the safetensors file for real
(models/direct_read.py: O_DIRECT, else the page cache dropped) and evicts a resident by the policy.

- The policy is the simulator's (`cache.online.OnlinePolicy`: LRU or LFU, the same state machine as
  `simulate_cache`), and a forward's experts enter the cache as `cache.steps.split_step` orders them, so
  the engine's hits and misses equal `simulate_cache(chunked_step_sets(step sets, C), warm=True)` on the
  routing the engine recorded (tests/test_expert_cache.py).
- The experts modules' own weights are released when the caches are installed (experts/dispatch.py):
  only the residents' tensors are held, at most C per layer (plus, with prefetch, the next layer's
  staged reads).
- Prefetch "router": while layer l computes, the router of layer l+1 is run on layer l's input and the
  experts it picks that are not resident are read on a background thread. A later miss on a staged
  expert takes it from there (waiting for the read if it is still running) instead of reading again;
  hit/miss counts are unchanged (the policy sees the same steps), only the stall shrinks, and reads of
  experts the next layer did not use are counted as wasted bytes.
- On CUDA the fast memory is the GPU: a miss reads into pinned host memory and copies to the GPU on a
  side stream; the layer's stream waits for that copy's event before computing.
Stall = time the layer's forward waited for expert weights (reads, or staged reads still running).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moeserve import defaults
from moeserve.cache.online import ONLINE_POLICIES, OnlinePolicy
from moeserve.cache.steps import split_step
from moeserve.errors import MoeServeError
from moeserve.models.adapter import MoELayer, route
from moeserve.models.direct_read import DirectExpertReader
from moeserve.models.expert_ffn import ExpertWeights

PREFETCH = defaults.EXPERT_CACHE_PREFETCHES


@dataclass(frozen=True)
class ExpertCacheOptions:
    """`--expert-cache C --cache-policy P --prefetch F`: C experts resident per MoE layer."""

    capacity: int
    policy: str = defaults.EXPERT_CACHE_POLICY
    prefetch: str = defaults.EXPERT_CACHE_PREFETCH
    read_mode: str = "auto"  # models/direct_read.py MODES

    def check(self, num_experts: int) -> None:
        if not isinstance(self.capacity, int) or not 1 <= self.capacity <= num_experts:
            raise MoeServeError(f"--expert-cache {self.capacity}: give 1 to {num_experts} experts per layer "
                                f"(this model has {num_experts} per MoE layer)")
        if self.policy not in ONLINE_POLICIES:
            raise MoeServeError(f"--cache-policy {self.policy!r}: use {', '.join(ONLINE_POLICIES)} (belady needs "
                                "the future: it is the simulator's ceiling)")
        if self.prefetch not in PREFETCH:
            raise MoeServeError(f"--prefetch {self.prefetch!r}: use {', '.join(PREFETCH)}")


@dataclass
class ExpertCacheStats:
    """Cumulative counts of one layer's cache."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0  # demand reads (what the misses read)
    stall_s: float = 0.0
    prefetch_reads: int = 0
    prefetch_bytes: int = 0
    prefetch_used: int = 0  # misses served by a staged read
    prefetch_wasted_bytes: int = 0  # staged reads the layer did not use
    resident: int = 0
    resident_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class LayerExpertCache:
    """One MoE layer's resident experts, its policy and its reads (see the module docstring)."""

    def __init__(self, layer: MoELayer, options: ExpertCacheOptions, reader: DirectExpertReader, dtype: torch.dtype,
                 device: torch.device, pool: ThreadPoolExecutor | None):
        self.layer, self.options, self.reader, self.dtype, self.device, self.pool = \
            layer, options, reader, dtype, device, pool
        self.capacity = min(options.capacity, layer.num_experts)
        self.policy = OnlinePolicy(layer.num_experts, self.capacity, options.policy)
        self.weights: dict[int, ExpertWeights] = {}
        self.ready: dict[int, torch.cuda.Event] = {}
        self.staged: dict[int, Future] = {}
        self.next: LayerExpertCache | None = None  # the following MoE layer, for prefetch
        self.stats = ExpertCacheStats()
        self._lock = threading.Lock()  # stats written by the prefetch thread too
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _read(self, expert: int) -> tuple[ExpertWeights, torch.cuda.Event | None, int]:
        """Read one expert now -> (weights in fast memory, the CUDA event that marks them copied, bytes)."""
        if self._stream is None:
            w, n = self.reader.read(self.layer.index, expert, self.layer.layout, self.dtype)
            return w, None, n
        host, n = self.reader.read(self.layer.index, expert, self.layer.layout, None, pin=True)
        with torch.cuda.stream(self._stream):
            w = ExpertWeights(**{k: None if t is None else t.to(self.device, non_blocking=True).to(self.dtype)
                                 for k, t in host.__dict__.items()})
            done = torch.cuda.Event()
            done.record(self._stream)
        return w, done, n

    def _staged_read(self, expert: int):
        result = self._read(expert)
        with self._lock:
            self.stats.prefetch_reads += 1
            self.stats.prefetch_bytes += result[2]
        return result

    def experts_of(self, top_k_index: np.ndarray) -> list[np.ndarray]:
        """top_k_index: [T, k] of one forward -> the cache steps it takes (`split_step` of its distinct experts)."""
        ids = np.unique(top_k_index)
        return split_step(ids[ids >= 0], self.capacity)

    def acquire(self, experts: np.ndarray) -> dict[int, ExpertWeights]:
        """One cache step: make `experts` resident (evict, then read the misses) -> expert -> weights."""
        outcome = self.policy.access(experts)
        freed = 0
        for e in outcome.evicted:
            freed += self.weights.pop(e).nbytes()  # the tensors are freed: nothing else refers to them
            self.ready.pop(e, None)
        t0 = time.perf_counter()
        demand = used = admitted = 0
        for e in outcome.misses:
            future = self.staged.pop(e, None)
            if future is not None:
                w, event, _ = future.result()
                used += 1
            else:
                w, event, n = self._read(e)
                demand += n
            self.weights[e] = w
            admitted += w.nbytes()
            if event is not None:
                self.ready[e] = event
        if self._stream is not None:  # the layer's stream waits for the side stream's copies, and owns them
            stream = torch.cuda.current_stream(self.device)
            for e in experts.tolist():
                if e in self.ready:
                    stream.wait_event(self.ready.pop(e))
                    for t in self.weights[e].tensors().values():
                        t.record_stream(stream)
        with self._lock:
            s = self.stats
            s.hits += len(outcome.hits)
            s.misses += len(outcome.misses)
            s.evictions += len(outcome.evicted)
            s.bytes_read += demand
            s.prefetch_used += used
            s.resident += len(outcome.misses) - len(outcome.evicted)
            s.resident_bytes += admitted - freed
            if outcome.misses:
                s.stall_s += time.perf_counter() - t0
        return {e: self.weights[e] for e in experts.tolist()}

    def end_forward(self) -> None:
        """After the layer's forward: staged reads it did not use are dropped (their bytes were wasted)."""
        staged, self.staged = self.staged, {}
        for future in staged.values():
            if not future.cancel():
                n = future.result()[2]
                with self._lock:
                    self.stats.prefetch_wasted_bytes += n

    def prefetch_next(self, x: torch.Tensor) -> None:
        """With prefetch "router": the next layer's router on this layer's input x [T, H] picks experts;
        those not resident there are read on the background thread (at most its capacity, most picked first)."""
        nxt = self.next
        if nxt is None or self.pool is None:
            return
        _, _, picked = route(nxt.layer, x)
        ids, counts = np.unique(picked.cpu().numpy(), return_counts=True)
        order = np.argsort(-counts, kind="stable")
        for e in ids[order][: nxt.capacity].tolist():
            if e >= 0 and not nxt.policy.is_resident(e) and e not in nxt.staged:
                nxt.staged[e] = self.pool.submit(nxt._staged_read, e)

    def snapshot(self) -> dict:
        """The counts so far (safe to call from another thread while the engine serves)."""
        with self._lock:
            return self.stats.to_dict()


class ExpertCaches:
    """Every MoE layer's cache, the reader and the prefetch thread they share."""

    def __init__(self, layers: list[MoELayer], model_dir: str, options: ExpertCacheOptions):
        options.check(layers[0].num_experts)
        self.options = options
        self.reader = DirectExpertReader(model_dir, options.read_mode)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moeserve-prefetch") \
            if options.prefetch == "router" else None
        self.layers: dict[int, LayerExpertCache] = {}
        for la in layers:
            dtype, device = la.experts.down_proj.dtype, la.experts.down_proj.device
            self.layers[la.index] = LayerExpertCache(la, options, self.reader, dtype, device, self.pool)
        ordered = list(self.layers.values())
        for a, b in zip(ordered, ordered[1:], strict=False):
            a.next = b

    def stats(self) -> dict[int, dict]:
        """decoder-layer index -> `ExpertCacheStats` as a dict."""
        return {i: c.snapshot() for i, c in self.layers.items()}

    def totals(self) -> dict:
        per = list(self.stats().values())
        out = {k: sum(p[k] for p in per) for k in per[0]}
        accesses = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / accesses if accesses else 0.0
        out["read_mode"] = self.reader.mode
        out["read_s"] = self.reader.read_s
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()
