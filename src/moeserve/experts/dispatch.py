"""Per-layer expert dispatch: local experts in the main process, remote ones through an ExpertBackend.

Plugs into transformers v5's experts interface (models/experts_interface.py): an experts implementation
named "moeserve" is registered, each experts module gets its layer's `LayerDispatch`, and the model is
switched to it. The model's own forward/generate are unchanged; `DispatchHandle.remove()` switches back.

Per MoE layer call `experts(x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`:
0. the routing is recorded (`RoutingRecorder`: what the engine reports per token and the metrics count;
   no separate capture hook while serving);
1. a layer with no remote experts runs the model's previous implementation, except for a single token
   (decode at batch 1): its k experts only, one FFN each (`_one_token`), without the grouped path's
   sort, histogram, gathers and reorder (same sums, possibly in another order; same greedy tokens in
   the suite's comparisons with `generate`);
2. otherwise the (token, expert, weight) pairs are split into local and remote; remote pairs are grouped
   per function (replica chosen by the backend) and all of the layer's calls are sent at once;
3. local experts compute meanwhile (on the model's device); then the partial sums are gathered and added,
   through the failure policy (`backend.collect_with_failover`: a replica retry, then local compute).
On CUDA, x and the routing go to pinned host buffers (non-blocking copies + an event) before the
transport, and the remote results return through one pinned buffer and one H2D copy per layer.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from moeserve.errors import MoeServeError
from moeserve.experts.backend import ExpertBackend, collect_with_failover
from moeserve.experts.expert_cache import ExpertCaches, LayerExpertCache
from moeserve.models import experts_interface
from moeserve.models.adapter import MoELayer, expert_weights, require_moe_layers
from moeserve.models.checkpoint import CheckpointExperts
from moeserve.models.expert_ffn import ExpertWeights, activation, expert_forward
from moeserve.plan.placement import ExpertPlacement

EXPERTS_IMPLEMENTATION = "moeserve"
_ATTR = "_moeserve_dispatch"
_HANDLE_ATTR = "_moeserve_dispatch_handle"


@dataclass
class LayerStats:
    """Cumulative timings (seconds) and counts of one layer's dispatch.

    overhead_s: wall time of the mixed-layer calls minus max(local compute, slowest remote compute) per
    call, i.e. what the transport (planning, shared-memory copies, messages, waits, gathering) added
    over an ideal parallel execution of the same expert work.
    """

    calls: int = 0  # layer calls with remote experts
    remote_calls: int = 0  # messages to functions
    remote_pairs: int = 0
    local_pairs: int = 0
    fallback_pairs: int = 0  # remote pairs computed locally after a failure or with no function ready
    retries: int = 0  # calls resent to another replica after a failure
    plan_s: float = 0.0
    send_s: float = 0.0
    local_s: float = 0.0
    wait_s: float = 0.0
    gather_s: float = 0.0
    remote_compute_s: float = 0.0  # slowest function's compute per call, summed
    wall_s: float = 0.0
    overhead_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class RoutingRecorder:
    """The routing of each forward, as the experts modules saw it: `take()` after a forward ->
    [tokens, moe_layers, top_k] int64 on the CPU (negative ids dropped by nobody: as the router chose)."""

    def __init__(self, num_layers: int):
        self._ids: list[torch.Tensor | None] = [None] * num_layers
        # set by the caller around a padded forward: the token rows [T_real] (into the flattened [B * L]
        # batch) that are real; the experts then see only those, and only those are recorded
        self.real_rows: torch.Tensor | None = None

    def record(self, slot: int, top_k_index: torch.Tensor) -> None:
        self._ids[slot] = top_k_index

    def take(self) -> torch.Tensor | None:
        """The last forward's routing, then forget it; None if some MoE layer did not run."""
        ids, self._ids = self._ids, [None] * len(self._ids)
        if any(t is None for t in ids):
            return None
        return torch.stack(ids, dim=1).to("cpu", torch.int64)


class _PinnedStaging:
    """Pinned host buffers for one layer's CUDA <-> CPU transfers, grown when needed."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.h2d_done: torch.cuda.Event | None = None

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype, pin_memory=True)
            self.buffers[name] = buf
        return buf[:numel].view(shape)

    def to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Non-blocking D2H copies into pinned buffers, then wait for exactly those copies."""
        if self.h2d_done is not None:  # the previous call's H2D copy may still read these buffers
            self.h2d_done.synchronize()
        out = [self.get(f"in{i}", tuple(t.shape), t.dtype).copy_(t, non_blocking=True) for i, t in enumerate(tensors)]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensors[0].device))
        done.synchronize()
        return out

    def to_device(self, parts: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Concatenate CPU tensors [U_i, H] into one pinned buffer and start one H2D copy -> [sum U_i, H]."""
        rows = sum(p.shape[0] for p in parts)
        host = self.get("out", (rows, parts[0].shape[1]), dtype)
        torch.cat([p.to(dtype) for p in parts], out=host)
        dev = host.to(device, non_blocking=True)
        self.h2d_done = torch.cuda.Event()
        self.h2d_done.record(torch.cuda.current_stream(device))
        return dev


class LayerDispatch:
    """The experts implementation of one MoE layer (see the module docstring)."""

    def __init__(self, layer: MoELayer, slot: int, remote: set[int], backend: ExpertBackend | None,
                 allowed: frozenset[str], base: Callable, local_weights: dict[int, ExpertWeights],
                 fallback_weights: Callable[[int], ExpertWeights], recorder: RoutingRecorder):
        self.layer, self.slot, self.remote, self.backend, self.base = layer, slot, remote, backend, base
        self.local = set(range(layer.num_experts)) - remote
        self._allowed = allowed  # the functions this layer may call: the placement's, plus live replicas
        self._allowed_lock = threading.Lock()
        self.local_weights = local_weights
        self.fallback_weights = fallback_weights
        self.recorder = recorder
        self.is_remote = np.zeros(layer.num_experts, dtype=bool)  # [E]
        self.is_remote[sorted(remote)] = True
        self.stats = LayerStats()
        self._staging = _PinnedStaging() if torch.cuda.is_available() else None
        self.cache: LayerExpertCache | None = None  # with an expert cache: every expert goes through it
        layout = layer.layout
        self._act = None if layout.activation == "gptoss_swiglu" else activation(layout.activation)
        self._own: dict[int, ExpertWeights] = {}  # views into the experts module's weights, for `_one_token`

    @property
    def allowed(self) -> frozenset[str]:
        return self._allowed

    def allow(self, function_id: str) -> None:
        """Let this layer send work to `function_id` (a replica added while serving)."""
        with self._allowed_lock:
            self._allowed = self._allowed | {function_id}  # one reference swap: a call sees old or new

    def disallow(self, function_id: str) -> None:
        """Send no new work to `function_id` (before it is retired; a call in flight is retried elsewhere)."""
        with self._allowed_lock:
            self._allowed = self._allowed - {function_id}

    def weights_of(self, e: int) -> ExpertWeights:
        return self.local_weights[e] if e in self.local_weights else self.fallback_weights(e)

    def __call__(self, module: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        real = self.recorder.real_rows
        if real is None:
            return self._route(module, x, top_k_index, top_k_weights)
        if real.shape[0] and int(real[-1]) >= x.shape[0]:
            raise MoeServeError(f"real token rows up to {int(real[-1])} for a layer input of {x.shape[0]} rows")
        out = torch.zeros_like(x)  # pad rows: no expert output
        out.index_copy_(0, real, self._route(module, x.index_select(0, real), top_k_index.index_select(0, real),
                                             top_k_weights.index_select(0, real)))
        return out

    def _route(self, module: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
        self.recorder.record(self.slot, top_k_index)
        if self.cache is not None:
            return self._through_cache(x, top_k_index, top_k_weights)
        if not self.remote:
            if x.shape[0] == 1:
                return self._one_token(x, top_k_index, top_k_weights)
            return self.base(module, x, top_k_index, top_k_weights)
        st = self.stats
        allowed = self._allowed
        t0 = time.perf_counter()
        device = x.device
        if device.type == "cuda":
            x_host, idx_host, w_host = self._staging.to_host(x, top_k_index, top_k_weights)
        else:
            x_host, idx_host, w_host = x.detach(), top_k_index, top_k_weights
        idx = idx_host.numpy()
        w32 = w_host.detach().float().numpy()
        remote = self.is_remote[idx]  # [T, k] bool
        r_tok, r_slot = np.nonzero(remote)
        r_exp = idx[r_tok, r_slot]
        loads = dict(zip(*np.unique(r_exp, return_counts=True), strict=True))
        chosen, unplaced = self.backend.assign(self.layer.index, {int(e): int(n) for e, n in loads.items()},
                                               allowed)
        t1 = time.perf_counter()

        calls = []
        for fid, experts in chosen.items():
            sel = np.isin(r_exp, experts)
            tok, slot, exp = r_tok[sel], r_slot[sel], r_exp[sel]
            order = np.argsort(exp, kind="stable")
            tok, slot, exp = tok[order], slot[order], exp[order]
            rows, pair_rows = np.unique(tok, return_inverse=True)
            calls.append(self.backend.call(fid, x_host, torch.from_numpy(rows), pair_rows.astype(np.int32),
                                           exp.astype(np.int32), w32[tok, slot]))
        t2 = time.perf_counter()

        out = torch.zeros_like(x)
        l_tok, l_slot = np.nonzero(~remote | np.isin(idx, unplaced))
        self._accumulate(out, x, l_tok, idx[l_tok, l_slot], top_k_weights[_index(l_tok, device), _index(l_slot, device)])
        t3 = time.perf_counter()

        results, failover = collect_with_failover(self.backend, calls, allowed)
        t4 = time.perf_counter()

        done = [(rc, y) for rc, y in zip(calls, results, strict=True) if y is not None]
        if done:
            if device.type == "cuda":
                rows = torch.cat([rc.token_rows for rc, _ in done])
                ys = self._staging.to_device([y for _, y in done], device, out.dtype)
                out.index_put_((rows.to(device, non_blocking=True),), ys, accumulate=True)
            else:
                for rc, y in done:
                    out.index_put_((rc.token_rows,), y.to(out.dtype), accumulate=True)
        for rc, y in zip(calls, results, strict=True):
            if y is None:  # the failure policy gave these pairs back: compute them here
                tok = rc.token_rows.numpy()[rc.pair_rows]
                weights = torch.from_numpy(rc.pair_weights).to(device=device, dtype=top_k_weights.dtype)
                self._accumulate(out, x, tok, rc.pair_experts, weights)
        t5 = time.perf_counter()

        st.calls += 1
        st.remote_calls += len(calls)
        st.remote_pairs += len(r_tok)
        st.local_pairs += len(l_tok)
        st.fallback_pairs += failover.fallback_pairs + int(np.isin(r_exp, unplaced).sum())
        st.retries += failover.retries
        st.plan_s += t1 - t0
        st.send_s += t2 - t1
        st.local_s += t3 - t2
        st.wait_s += t4 - t3
        st.gather_s += t5 - t4
        remote_compute = max((rc.compute_s for rc in calls), default=0.0)
        st.remote_compute_s += remote_compute
        st.wall_s += t5 - t0
        st.overhead_s += max(0.0, (t5 - t0) - max(t3 - t2, remote_compute))
        return out

    def _through_cache(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Every expert from the layer's cache (experts/expert_cache.py), one cache step at a time."""
        cache = self.cache
        cache.prefetch_next(x)  # no-op without --prefetch router
        idx = top_k_index.cpu().numpy()
        out = torch.zeros_like(x)
        for chunk in cache.experts_of(idx):
            resident = cache.acquire(chunk)
            tok, slot = np.nonzero(np.isin(idx, chunk))
            self._accumulate(out, x, tok, idx[tok, slot],
                             top_k_weights[_index(tok, x.device), _index(slot, x.device)], resident.__getitem__)
        cache.end_forward()
        return out
    def _one_token(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """x [1, H], top_k_index/weights [1, k] -> [1, H]: sum_j weight_j * expert_{index_j}(x). Only the k
        chosen experts run; ids outside [0, E) (a sentinel) contribute nothing, as in the grouped path."""
        out = None
        for j, e in enumerate(top_k_index[0].tolist()):
            if not 0 <= e < self.layer.num_experts:
                continue
            w = self._own.get(e)
            if w is None:
                w = self._own[e] = expert_weights(self.layer, e)
            y = expert_forward(x, w, self.layer.layout, self._act) * top_k_weights[0, j]
            out = y if out is None else out.add_(y)
        return torch.zeros_like(x) if out is None else out.to(x.dtype)

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, tok: np.ndarray, experts: np.ndarray,
                    weights: torch.Tensor, weights_of: Callable[[int], ExpertWeights] | None = None) -> None:
        """out[tok[p]] += weights[p] * expert_{experts[p]}(x[tok[p]]) for every pair p; tok, experts: [P]."""
        if len(tok) == 0:
            return
        experts = np.asarray(experts)
        weights_of = weights_of or self.weights_of
        for e in np.unique(experts):
            sel = np.flatnonzero(experts == e)
            rows = _index(tok[sel], out.device)
            y = expert_forward(x[rows], weights_of(int(e)), self.layer.layout)
            out.index_put_((rows,), (y * weights[_index(sel, out.device), None]).to(out.dtype), accumulate=True)


# Sums go through index_put_(accumulate=True), not index_add_: on a busy CPU with 2+ threads this torch's
# index_add_ took milliseconds per call for a [1, H] row (measured), and on CUDA it is not deterministic.


def _index(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _moeserve_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    dispatch = getattr(self, _ATTR, None)
    if dispatch is None:  # an experts module of another model switched to "moeserve": do what it would
        return experts_interface.implementation(self, "grouped_mm")(self, hidden_states, top_k_index, top_k_weights)
    return dispatch(self, hidden_states, top_k_index, top_k_weights)


def _release_experts(layer: MoELayer, keep: list[int]) -> dict[int, ExpertWeights]:
    """Shrink the experts module's fused `[E, ...]` parameters to the `keep` experts (freeing the others);
    -> expert id -> its weights (views into the shrunk parameters)."""
    ex = layer.experts
    keep_index = torch.tensor(keep, dtype=torch.long, device=ex.down_proj.device)
    for name, param in list(ex.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == layer.num_experts:
            setattr(ex, name, nn.Parameter(param.data.index_select(0, keep_index), requires_grad=False))
    return {e: expert_weights(layer, slot) for slot, e in enumerate(keep)}


class DispatchHandle:
    """What `install_dispatch` returns: the routing recorder, per-layer stats, and `remove()`."""

    def __init__(self, model: nn.Module, layers: dict[int, LayerDispatch], previous: dict, released: bool,
                 recorder: RoutingRecorder, backend: ExpertBackend | None, caches: ExpertCaches | None = None):
        self.model, self.layers, self.previous, self.released = model, layers, previous, released
        self.recorder, self.backend, self.caches = recorder, backend, caches

    @property
    def all_local(self) -> bool:
        return self.backend is None and self.caches is None and not any(d.remote for d in self.layers.values())

    def stats(self) -> dict[int, dict]:
        """decoder-layer index -> `LayerStats` as a dict (layers with remote experts only)."""
        return {i: d.stats.to_dict() for i, d in self.layers.items() if d.remote}

    def totals(self) -> dict[str, int]:
        """Failure-policy counts over every layer: retries and pairs computed locally."""
        return {"retries": sum(d.stats.retries for d in self.layers.values()),
                "fallback_pairs": sum(d.stats.fallback_pairs for d in self.layers.values())}

    def cache_stats(self) -> dict[int, dict]:
        """decoder-layer index -> expert-cache counts (`ExpertCacheStats`), {} without an expert cache."""
        return self.caches.stats() if self.caches is not None else {}

    def reset_stats(self) -> None:
        for d in self.layers.values():
            d.stats = LayerStats()

    def remove(self) -> None:
        """Switch the model back to its previous experts implementation."""
        if self.released:
            raise MoeServeError("experts' weights were released from this model (remote experts or an expert "
                                "cache): reload it instead")
        for d in self.layers.values():
            if getattr(d.layer.experts, _ATTR, None) is d:
                delattr(d.layer.experts, _ATTR)
        experts_interface.restore(self.model, self.previous)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.layers = {}


def install_dispatch(model: nn.Module, placement: ExpertPlacement | None = None, backend: ExpertBackend | None = None,
                     *, release_remote_weights: bool = False, caches: ExpertCaches | None = None) -> DispatchHandle:
    """Route `model`'s MoE layers through the placement (default: every expert local): local experts here,
    the rest via `backend`; every layer records its routing.

    release_remote_weights: free the main process's copy of experts that only run remotely (the memory
    saving of a remote-heavy plan); failed remote work is then computed from the checkpoint (memory
    mapped) instead, and `remove()` is no longer possible.
    caches: an expert cache per MoE layer (experts/expert_cache.py; every expert local): each layer's experts
    then run from its cache, the experts modules' own weights are released, `remove()` is no longer possible.
    """
    layers = require_moe_layers(model)
    placement = placement or ExpertPlacement.all_local([la.index for la in layers], layers[0].num_experts)
    placement.validate([la.index for la in layers], layers[0].num_experts)
    if EXPERTS_IMPLEMENTATION in experts_interface.current(model).values():
        raise MoeServeError("a moeserve dispatch is already installed on this model")
    if backend is None and any(placement.remote_experts(la.index) for la in layers):
        raise MoeServeError("the placement has remote experts but no expert backend was given")
    if caches is not None and any(placement.remote_experts(la.index) for la in layers):
        raise MoeServeError("an expert cache serves every expert locally: give no plan with remote experts")
    functions = frozenset(f.id for f in placement.functions)
    if backend is not None and not functions <= set(backend.specs()):
        raise MoeServeError(f"the backend lacks functions of the placement: {sorted(functions - set(backend.specs()))}")
    experts_interface.register(EXPERTS_IMPLEMENTATION, _moeserve_experts_forward)
    previous = experts_interface.current(model)
    previous_name = next(iter(previous.values()))

    recorder = RoutingRecorder(len(layers))
    checkpoint = None
    dispatches: dict[int, LayerDispatch] = {}
    for slot, la in enumerate(layers):
        remote = placement.remote_experts(la.index)
        local = sorted(set(range(la.num_experts)) - remote)
        if remote and release_remote_weights:
            checkpoint = checkpoint or CheckpointExperts(backend.model_dir)
            local_weights = _release_experts(la, local)
            fallback = _checkpoint_fallback(checkpoint, la)
        else:
            local_weights = {e: expert_weights(la, e) for e in local} if remote else {}
            fallback = functools.partial(expert_weights, la)
        base = experts_interface.implementation(la.experts, previous_name)
        dispatches[la.index] = LayerDispatch(la, slot, remote, backend, functions, base, local_weights, fallback,
                                             recorder)
        setattr(la.experts, _ATTR, dispatches[la.index])
    if caches is not None:
        for la in layers:
            dispatches[la.index].cache = caches.layers[la.index]
            _release_experts(la, [])  # only the caches hold expert weights from now on
    try:
        experts_interface.switch(model, EXPERTS_IMPLEMENTATION)
    except MoeServeError:
        for d in dispatches.values():
            delattr(d.layer.experts, _ATTR)
        raise
    handle = DispatchHandle(model, dispatches, previous,
                            (release_remote_weights and checkpoint is not None) or caches is not None,
                            recorder, backend, caches)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def local_dispatch(model: nn.Module) -> tuple[DispatchHandle, bool]:
    """An all-local dispatch for `model` (it records routing for an engine given no dispatch): the one
    already installed if it is all-local (engines sharing one model, as tests do), else a new one.
    -> (handle, whether this call installed it)."""
    existing = getattr(model, _HANDLE_ATTR, None)
    if existing is not None and existing.all_local and existing.layers:
        return existing, False
    return install_dispatch(model), True


def _checkpoint_fallback(checkpoint, layer: MoELayer) -> Callable[[int], ExpertWeights]:
    dtype, device = layer.experts.down_proj.dtype, layer.experts.down_proj.device

    def read(e: int) -> ExpertWeights:
        w = checkpoint.read(layer.index, e, layer.layout, dtype)
        return ExpertWeights(**{k: None if t is None else t.to(device) for k, t in w.__dict__.items()})

    return read
