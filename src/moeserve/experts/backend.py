"""ExpertBackend: what the dispatch needs from wherever expert functions run, and the failure policy.

A backend owns the expert functions of a placement (OS processes on this machine: `ProcessBackend`; Ray
Serve deployments: `RayBackend`) and moves one MoE layer's remote work to them and back:

    chosen, unplaced = backend.assign(layer, {expert: pairs}, allowed)   # which replica takes each expert
    calls = [backend.call(function_id, x, rows, pair_rows, pair_experts, pair_weights), ...]   # all in flight
    results = backend.collect(calls)                                      # y [U, H] per call, or None

The failure policy is not the backend's: `collect_with_failover` retries a failed call once on another
ready replica holding all its experts, and what still fails comes back as None for the dispatch to
compute locally. A backend only reports failures (a dead, hung or garbage-answering function) and
repairs itself (restarts) in the background.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from moeserve.plan.placement import ExpertFunction


@dataclass
class RemoteCall:
    """One call in flight: `token_rows` [U] index the dispatcher's x [T, H]; pairs are sorted by expert."""

    function_id: str
    layer: int
    x: torch.Tensor  # [T, H] on the CPU
    token_rows: torch.Tensor  # [U] int64
    pair_rows: np.ndarray  # [P] int32, into token_rows
    pair_experts: np.ndarray  # [P] int32
    pair_weights: np.ndarray  # [P] float32
    sent_at: float = 0.0
    compute_s: float = 0.0  # as reported by the function
    failed: bool = False
    handle: object = field(default=None, repr=False)  # the backend's own in-flight state

    @property
    def experts(self) -> set[int]:
        return set(self.pair_experts.tolist())


class ExpertBackend(Protocol):
    """Expert functions of one placement, started, kept warm, scaled and repaired by the backend."""

    model_dir: str

    def start(self, wait: bool = True) -> ExpertBackend: ...

    def stop(self) -> None: ...

    def specs(self) -> dict[str, ExpertFunction]:
        """Every function the backend holds (the placement's and replicas added since), by id."""

    def assign(self, layer: int, expert_loads: dict[int, int], allowed: frozenset[str] | None = None,
               ) -> tuple[dict[str, list[int]], list[int]]:
        """Per expert a ready replica: (function id -> its experts, experts no function can take now)."""

    def call(self, function_id: str, x: torch.Tensor, token_rows: torch.Tensor, pair_rows: np.ndarray,
             pair_experts: np.ndarray, pair_weights: np.ndarray) -> RemoteCall:
        """Send one call without waiting (a call the function cannot take comes back `failed`)."""

    def collect(self, calls: list[RemoteCall]) -> list[torch.Tensor | None]:
        """Wait for the calls: y [U, H] each (valid until that function's next call), None if it failed."""

    def ready_replicas(self, layer: int, experts: set[int], exclude: str,
                       allowed: frozenset[str] | None = None) -> list[str]:
        """Ready functions of `layer` holding all of `experts`, other than `exclude`, least busy first."""

    def prewarm(self, function_ids: list[str], wait: bool = False) -> None:
        """Start the given functions if they are stopped (scaled to zero)."""

    def add_function(self, spec: ExpertFunction, wait: bool = False) -> None: ...

    def remove_function(self, function_id: str) -> None: ...

    def metrics(self) -> dict:
        """Plain counters per function and in total (see `ProcessBackend.metrics` for the keys)."""


@dataclass
class FailoverCounts:
    """What `collect_with_failover` did for one layer call."""

    retries: int = 0  # calls resent to another replica
    fallback_pairs: int = 0  # (token, expert) pairs handed back to be computed locally


def collect_with_failover(backend: ExpertBackend, calls: list[RemoteCall], allowed: frozenset[str] | None
                          ) -> tuple[list[torch.Tensor | None], FailoverCounts]:
    """The failure policy, in one place: collect; retry each failed call once on another ready replica
    holding all its experts (within `allowed`); what still fails is None (computed locally by the caller).
    -> per call y [U, H] or None, and the counts."""
    counts = FailoverCounts()
    results = backend.collect(calls) if calls else []
    if not any(y is None for y in results):
        return results, counts
    # a retry may land on a replica whose result buffer holds one of these results: keep copies
    results = [None if y is None else y.clone() for y in results]
    for i, rc in enumerate(calls):
        if results[i] is not None:
            continue
        replicas = backend.ready_replicas(rc.layer, rc.experts, rc.function_id, allowed)
        if replicas:
            counts.retries += 1
            retry = backend.call(replicas[0], rc.x, rc.token_rows, rc.pair_rows, rc.pair_experts, rc.pair_weights)
            results[i] = None if retry.failed else backend.collect([retry])[0]
            rc.compute_s = retry.compute_s
        if results[i] is None:
            counts.fallback_pairs += len(rc.pair_rows)
    return results, counts
