"""ExpertPlacement: where each routed expert runs while serving (what a plan's placement becomes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FunctionSpec:
    """One expert function (a separate OS process): the experts of one MoE layer it holds.

    Replicas are several functions holding the same expert; the engine spreads tokens over them.
    """

    id: str
    layer: int  # decoder-layer index (ModelGeometry.moe_layers / MoELayer.index)
    experts: tuple[int, ...]
    memory_mb: int = 0  # the function's memory size in the plan (0: unconstrained)
    keep_alive_s: float = 60.0  # stop the process after this long idle (scale to zero)


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts run in the main process and which in expert functions.

    local: decoder-layer index -> experts computed in the main process. An expert held by no function
    must be local; an expert may be both local and in functions (the engine then prefers local).
    """

    local: dict[int, tuple[int, ...]]
    functions: tuple[FunctionSpec, ...] = field(default_factory=tuple)

    def remote_experts(self, layer: int) -> set[int]:
        return {e for f in self.functions if f.layer == layer for e in f.experts} - set(self.local.get(layer, ()))

    def functions_for(self, layer: int, expert: int) -> list[FunctionSpec]:
        return [f for f in self.functions if f.layer == layer and expert in f.experts]

    @classmethod
    def all_local(cls, moe_layers: list[int], num_experts: int) -> ExpertPlacement:
        return cls({layer: tuple(range(num_experts)) for layer in moe_layers})

    def validate(self, moe_layers: list[int], num_experts: int) -> None:
        """Every expert of every MoE layer runs somewhere; ids are in range; function ids unique."""
        from moeserve.errors import MoeServeError

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
