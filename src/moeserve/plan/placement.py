"""ExpertPlacement: where each routed expert runs while serving (what a plan's placement becomes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.defaults import KEEP_ALIVE_S
from moeserve.errors import MoeServeError


@dataclass(frozen=True)
class ExpertFunction:
    """One expert function (a separate OS process, a serverless function, a Ray Serve deployment): the
    experts of one MoE layer it holds. Replicas are several functions holding the same expert; the
    engine spreads tokens over them. Plans store these (docs/plan-format.md); serving executes them.
    """

    id: str
    layer: int  # decoder-layer index (ModelGeometry.moe_layers / MoELayer.index)
    experts: tuple[int, ...]
    memory_mb: int = 0  # the function's memory size in the plan (0: unconstrained)
    vcpus: float = 0.0  # vCPUs it is given (serverless providers: proportional to memory)
    keep_alive_s: float = KEEP_ALIVE_S  # stop it after this long idle (scale to zero)
    group: str = ""  # replicas of the same remote set share a group (Remoe: one group per layer)

    def __post_init__(self):
        object.__setattr__(self, "experts", tuple(self.experts))


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts run in the main process and which in expert functions.

    local: decoder-layer index -> experts computed in the main process. An expert held by no function
    must be local; an expert may be both local and in functions (the engine then prefers local).
    """

    local: dict[int, tuple[int, ...]]
    functions: tuple[ExpertFunction, ...] = field(default_factory=tuple)

    def remote_experts(self, layer: int) -> set[int]:
        return {e for f in self.functions if f.layer == layer for e in f.experts} - set(self.local.get(layer, ()))

    def functions_for(self, layer: int, expert: int) -> list[ExpertFunction]:
        return [f for f in self.functions if f.layer == layer and expert in f.experts]

    @classmethod
    def all_local(cls, moe_layers: list[int], num_experts: int) -> ExpertPlacement:
        return cls({layer: tuple(range(num_experts)) for layer in moe_layers})

    def validate(self, moe_layers: list[int], num_experts: int) -> None:
        """Every expert of every MoE layer runs somewhere; ids are in range; function ids unique."""
        ids = [f.id for f in self.functions]
        if len(ids) != len(set(ids)):
            raise MoeServeError("placement has duplicate function ids")
        for f in self.functions:
            if f.layer not in moe_layers:
                raise MoeServeError(f"function {f.id} is for layer {f.layer}, which is not a MoE layer")
            if any(not 0 <= e < num_experts for e in f.experts) or not f.experts:
                raise MoeServeError(f"function {f.id} holds no or out-of-range experts")
        for layer in moe_layers:
            covered = set(self.local.get(layer, ())) | {e for f in self.functions if f.layer == layer
                                                        for e in f.experts}
            missing = set(range(num_experts)) - covered
            if missing:
                raise MoeServeError(f"layer {layer}: experts {sorted(missing)[:8]} run nowhere")
