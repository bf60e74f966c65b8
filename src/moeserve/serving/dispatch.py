"""Per-layer expert dispatch: local experts in the main process, remote ones in expert functions.

Plugs into transformers v5's experts interface: an experts implementation named "moeserve" is
registered in `ALL_EXPERTS_FUNCTIONS`, each experts module gets its layer's `_LayerDispatch`, and the
model is switched to it with `set_experts_implementation`. The model's own forward/generate are
unchanged; `DispatchHandle.remove()` switches back.

Per MoE layer call `experts(x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`:
1. a layer with no remote experts runs the model's previous implementation (bit-identical, no overhead);
2. otherwise the (token, expert, weight) pairs are split into local and remote; remote pairs are grouped
   per function (replica chosen by the pool) and all of the layer's calls are sent at once;
3. local experts compute meanwhile (on the model's device); then the partial sums are gathered and added.
On CUDA, x and the routing go to pinned host buffers (non-blocking copies + an event) before the
shared-memory copy, and the remote results return through one pinned buffer and one H2D copy per layer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from moeserve.errors import MoeServeError
from moeserve.models.adapter import (
    ExpertWeights,
    MoELayer,
    expert_forward,
    expert_weights,
    require_moe_layers,
)
from moeserve.serving.placement import ExpertPlacement

EXPERTS_IMPLEMENTATION = "moeserve"
_ATTR = "_moeserve_dispatch"


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


class _LayerDispatch:
    """The experts implementation of one MoE layer (see the module docstring)."""

    def __init__(self, layer: MoELayer, local: set[int], remote: set[int], pool, functions: frozenset[str],
                 base: Callable, local_weights: dict[int, ExpertWeights],
                 fallback_weights: Callable[[int], ExpertWeights]):
        self.layer, self.local, self.remote, self.pool, self.base = layer, local, remote, pool, base
        self.functions = functions  # the placement's functions: the pool may hold more
        self.local_weights = local_weights
        self.fallback_weights = fallback_weights
        self.is_remote = np.zeros(layer.num_experts, dtype=bool)  # [E]
        self.is_remote[sorted(remote)] = True
        self.stats = LayerStats()
        self._staging = _PinnedStaging() if torch.cuda.is_available() else None

    def weights_of(self, e: int) -> ExpertWeights:
        return self.local_weights[e] if e in self.local_weights else self.fallback_weights(e)

    def __call__(self, module: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        if not self.remote:
            return self.base(module, x, top_k_index, top_k_weights)
        st = self.stats
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
        chosen, unplaced = self.pool.assign(self.layer.index, {int(e): int(n) for e, n in loads.items()},
                                            self.functions)
        t1 = time.perf_counter()

        calls = []
        for fid, experts in chosen.items():
            sel = np.isin(r_exp, experts)
            tok, slot, exp = r_tok[sel], r_slot[sel], r_exp[sel]
            order = np.argsort(exp, kind="stable")
            tok, slot, exp = tok[order], slot[order], exp[order]
            rows, pair_rows = np.unique(tok, return_inverse=True)
            calls.append(self.pool.call(fid, x_host, torch.from_numpy(rows), pair_rows.astype(np.int32),
                                        exp.astype(np.int32), w32[tok, slot], self.functions))
        t2 = time.perf_counter()

        out = torch.zeros_like(x)
        l_tok, l_slot = np.nonzero(~remote | np.isin(idx, unplaced))
        self._accumulate(out, x, l_tok, idx[l_tok, l_slot], top_k_weights[_index(l_tok, device), _index(l_slot, device)])
        t3 = time.perf_counter()

        results = self.pool.collect(calls) if calls else []
        t4 = time.perf_counter()

        done = [(rc, y) for rc, y in zip(calls, results, strict=True) if y is not None]
        if done:
            rows = torch.cat([rc.token_rows for rc, _ in done])
            if device.type == "cuda":
                ys = self._staging.to_device([y for _, y in done], device, out.dtype)
                out.index_put_((rows.to(device, non_blocking=True),), ys, accumulate=True)
            else:
                for rc, y in done:
                    out.index_put_((rc.token_rows,), y.to(out.dtype), accumulate=True)
        failed_pairs = 0
        for rc, y in zip(calls, results, strict=True):
            if y is None:  # the pool gave these pairs back: compute them here
                tok = rc.token_rows.numpy()[rc.pair_rows]
                weights = torch.from_numpy(rc.pair_weights).to(device=device, dtype=top_k_weights.dtype)
                self._accumulate(out, x, tok, rc.pair_experts, weights)
                failed_pairs += len(tok)
        t5 = time.perf_counter()

        st.calls += 1
        st.remote_calls += len(calls)
        st.remote_pairs += len(r_tok)
        st.local_pairs += len(l_tok)
        st.fallback_pairs += failed_pairs + int(np.isin(r_exp, unplaced).sum())
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

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, tok: np.ndarray, experts: np.ndarray,
                    weights: torch.Tensor) -> None:
        """out[tok[p]] += weights[p] * expert_{experts[p]}(x[tok[p]]) for every pair p; tok, experts: [P]."""
        if len(tok) == 0:
            return
        experts = np.asarray(experts)
        for e in np.unique(experts):
            sel = np.flatnonzero(experts == e)
            rows = _index(tok[sel], out.device)
            y = expert_forward(x[rows], self.weights_of(int(e)), self.layer.layout)
            out.index_put_((rows,), (y * weights[_index(sel, out.device), None]).to(out.dtype), accumulate=True)


# Sums go through index_put_(accumulate=True), not index_add_: on a busy CPU with 2+ threads this torch's
# index_add_ took milliseconds per call for a [1, H] row (measured), and on CUDA it is not deterministic.


def _index(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _moeserve_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    dispatch = getattr(self, _ATTR, None)
    if dispatch is None:  # an experts module of a model without an installed dispatch
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return dispatch(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Make "moeserve" a valid `experts_implementation` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, _moeserve_experts_forward)


def _base_implementation(experts: nn.Module, name: str) -> Callable:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    original = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    return ALL_EXPERTS_FUNCTIONS.get_interface(name, original)


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
    """What `install_dispatch` returns: per-layer stats, and `remove()` to restore the model."""

    def __init__(self, model: nn.Module, layers: dict[int, _LayerDispatch], previous: str, released: bool):
        self.model, self.layers, self.previous, self.released = model, layers, previous, released

    def stats(self) -> dict[int, dict]:
        """decoder-layer index -> `LayerStats` as a dict (layers with remote experts only)."""
        return {i: d.stats.to_dict() for i, d in self.layers.items() if d.remote}

    def reset_stats(self) -> None:
        for d in self.layers.values():
            d.stats = LayerStats()

    def remove(self) -> None:
        """Switch the model back to its previous experts implementation."""
        if self.released:
            raise MoeServeError("remote experts' weights were released from this model: reload it instead")
        for d in self.layers.values():
            if getattr(d.layer.experts, _ATTR, None) is d:
                delattr(d.layer.experts, _ATTR)
        self.model.set_experts_implementation(self.previous)
        self.layers = {}


def install_dispatch(model: nn.Module, placement: ExpertPlacement, pool=None, *,
                     release_remote_weights: bool = False) -> DispatchHandle:
    """Route `model`'s MoE layers through the placement: local experts here, the rest via `pool`.

    release_remote_weights: free the main process's copy of experts that only run remotely (the memory
    saving of a remote-heavy plan); failed remote work is then computed from the checkpoint (memory
    mapped) instead, and `remove()` is no longer possible.
    """
    from moeserve.models.adapter import text_config

    layers = require_moe_layers(model)
    placement.validate([la.index for la in layers], layers[0].num_experts)
    config = text_config(model)
    previous = config._experts_implementation
    if previous == EXPERTS_IMPLEMENTATION:
        raise MoeServeError("a moeserve dispatch is already installed on this model")
    if pool is None and any(placement.remote_experts(la.index) for la in layers):
        raise MoeServeError("the placement has remote experts but no expert pool was given")
    functions = frozenset(f.id for f in placement.functions)
    if pool is not None and not functions <= set(pool.functions):
        raise MoeServeError(f"the pool lacks functions of the placement: {sorted(functions - set(pool.functions))}")
    register_experts_implementation()

    checkpoint = None
    dispatches: dict[int, _LayerDispatch] = {}
    for la in layers:
        remote = placement.remote_experts(la.index)
        local = set(range(la.num_experts)) - remote
        if remote and release_remote_weights:
            from moeserve.serving.checkpoint import CheckpointExperts

            checkpoint = checkpoint or CheckpointExperts(pool.model_dir)
            local_weights = _release_experts(la, sorted(local))
            fallback = _checkpoint_fallback(checkpoint, la)
        else:
            local_weights = {e: expert_weights(la, e) for e in local} if remote else {}
            fallback = functools.partial(expert_weights, la)
        base = _base_implementation(la.experts, previous)
        dispatches[la.index] = _LayerDispatch(la, local, remote, pool, functions, base, local_weights, fallback)
        setattr(la.experts, _ATTR, dispatches[la.index])
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if config._experts_implementation != EXPERTS_IMPLEMENTATION:
        for d in dispatches.values():
            delattr(d.layer.experts, _ATTR)
        raise MoeServeError(f"{type(model).__name__} does not accept a custom experts implementation")
    return DispatchHandle(model, dispatches, previous, released=release_remote_weights and checkpoint is not None)


def _checkpoint_fallback(checkpoint, layer: MoELayer) -> Callable[[int], ExpertWeights]:
    dtype, device = layer.experts.down_proj.dtype, layer.experts.down_proj.device

    def read(e: int) -> ExpertWeights:
        w = checkpoint.read(layer.index, e, layer.layout, dtype)
        return ExpertWeights(**{k: None if t is None else t.to(device) for k, t in w.__dict__.items()})

    return read
