"""Capture routing where the final choice is made: the inputs of each MoE block's experts module.

Hooks on the experts modules see `(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K])` for
every forward call, after any bias, grouping or renormalisation, so this works for every family behind
transformers v5's experts interface and never needs `output_router_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeserve.models.adapter import MoELayer, router_probabilities


@dataclass
class ForwardCall:
    """Routing seen in one forward call of the model: per MoE layer, rows in flattened [B * S] order."""

    ids: list[torch.Tensor | None]
    weights: list[torch.Tensor | None]
    probs: list[torch.Tensor | None] = field(default_factory=list)


class RoutingCapture:
    """Context manager recording the routing of every forward call of `model`.

    with RoutingCapture(model, layers) as cap:
        model.generate(...)
    cap.calls[0] is the prefill, cap.calls[1:] the decode steps.
    """

    def __init__(self, model: nn.Module, layers: list[MoELayer], router_probs: bool = False):
        self.model, self.layers, self.want_probs = model, layers, router_probs
        self.calls: list[ForwardCall] = []
        self._handles: list = []

    def _new_call(self, module, args, kwargs):
        n = len(self.layers)
        self.calls.append(ForwardCall([None] * n, [None] * n, [None] * n if self.want_probs else []))

    def __enter__(self) -> RoutingCapture:
        self._handles.append(self.model.register_forward_pre_hook(self._new_call, with_kwargs=True))
        for pos, layer in enumerate(self.layers):
            def on_experts(module, args, kwargs, pos=pos):
                index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
                weights = args[2] if len(args) > 2 else next(v for k, v in kwargs.items() if "weight" in k)
                call = self.calls[-1]
                call.ids[pos] = index.detach()
                call.weights[pos] = weights.detach().float()

            self._handles.append(layer.experts.register_forward_pre_hook(on_experts, with_kwargs=True))
            if self.want_probs:
                def on_router(module, args, output, pos=pos, layer=layer):
                    logits = output[0] if isinstance(output, tuple) else output
                    self.calls[-1].probs[pos] = router_probabilities(layer, logits.detach()).half()

                self._handles.append(layer.router.register_forward_hook(on_router))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def stack_layers(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer [N, X] tensors -> [N, L, X] on the CPU (one device sync)."""
    return torch.stack(tensors, dim=1).cpu()
